# Two commands matter (README.md): `make demo` and `make test`.
# The distribution's interpreter when it is new enough: Debian builds CPython with PGO and
# LTO, which makes the per-packet path 25-40% faster than a plain source build
# (docs/performance.md).  Override with `make PYTHON=...`.
SHELL  := /bin/bash
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
	  if $$p -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; \
	  then echo $$p; break; fi; done)
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# `make bench`'s baseline revision; empty = the one in benchmarks/BASELINE.
BASELINE ?=

.PHONY: demo test unit lint typecheck bench bench-dataplane bench-notify bench-fleet clean \
	system-deps \
	xdp bpf-deps lab lab-down changelog

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# Debian tools the network test bed and the demo drive, and the fleet's store (redis-server:
# the fleet tests start their own on a UNIX socket in a temporary directory).  Root only;
# harmless if present.
system-deps:
	@missing=""; \
	for tool in nft ethtool tcpdump ip gcc redis-server; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "note: missing$$missing and not root: network tests will skip"; exit 0; fi; \
	echo "installing Debian packages for:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  nftables ethtool tcpdump iproute2 gcc redis-server >/dev/null
	@# The operator kit's checks (tests/test_systemd.py, tests/test_kit.py): systemd-analyze
	@# (verify, security) for the unit files, strace for the balancer's system calls against
	@# their filter, promtool for the alert rules (prometheus, without its recommends).
	@missing=""; \
	for pair in systemd-analyze:systemd strace:strace promtool:prometheus; do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "note: missing$$missing and not root: their checks will skip"; exit 0; fi; \
	echo "installing Debian packages:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends $$missing >/dev/null

# The XDP program (lbproxy/xdp/, docs/xdp.md): compiled with clang for the BPF target,
# loaded at run time through the distribution's libbpf.so.1.  Rebuilt when its source
# changes; without clang and libbpf-dev (and not root to install them) it is not built
# and the XDP tests skip, saying why.
XDP_SRC    := lbproxy/xdp/lbproxy.bpf.c
XDP_OBJ    := lbproxy/xdp/lbproxy.bpf.o
BPF_CFLAGS := -O2 -g -Wall -target bpf -I/usr/include/$(shell uname -m)-linux-gnu

$(XDP_OBJ): $(XDP_SRC)
	clang $(BPF_CFLAGS) -c $< -o $@

xdp: bpf-deps
	@if command -v clang >/dev/null 2>&1 && [ -e /usr/include/bpf/bpf_helpers.h ]; then \
	  $(MAKE) --no-print-directory $(XDP_OBJ); \
	else echo "note: no clang or libbpf-dev: $(XDP_OBJ) not built, XDP tests will skip"; fi

# Debian packages the XDP program is built and inspected with (root only).
bpf-deps:
	@missing=""; \
	command -v clang >/dev/null 2>&1 || missing="$$missing clang"; \
	[ -e /usr/include/bpf/bpf_helpers.h ] || missing="$$missing libbpf-dev"; \
	command -v bpftool >/dev/null 2>&1 || missing="$$missing bpftool"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "note: missing$$missing and not root: XDP tests will skip"; exit 0; fi; \
	echo "installing Debian packages:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  $$missing >/dev/null

test: $(STAMP) system-deps xdp
	$(VENV)/bin/ruff check lbproxy tests benchmarks twisted/plugins
	$(VENV)/bin/mypy
	$(VENV)/bin/twistd --help | grep -q lbproxy
	set -o pipefail; $(VENV)/bin/trial --temp-directory=.trial_temp tests 2>&1 | tee .trial.log
	@# trial's own summary, restated as the plain "N passed, N failed" line CI reads
	@$(PY) -c 'import re; t = open(".trial.log").read(); \
	  ran = int(re.findall(r"^Ran (\d+) tests?", t, re.M)[-1]); \
	  bad = sum(int(n) for n in re.findall(r"(?:failures|errors|unexpectedSuccesses)=(\d+)", t.rsplit("Ran ", 1)[-1])); \
	  skip = sum(int(n) for n in re.findall(r"skips=(\d+)", t.rsplit("Ran ", 1)[-1])); \
	  print(f"{ran - bad - skip} passed, {bad} failed, {skip} skipped")' 

unit: $(STAMP)
	$(VENV)/bin/trial --temp-directory=.trial_temp tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lbproxy tests benchmarks twisted/plugins

typecheck: $(STAMP)
	$(VENV)/bin/mypy

demo: $(STAMP) system-deps
	$(PY) -m lbproxy.demo

# A namespace lab that stays up (lbproxy/lab.py; docs/tutorial.md): the test bed's
# terminals, home agent and backends, the balancer under twistd, lbproxy-homeagent.
# Root.  It prints how to use it and the command that tears it down: make lab-down.
lab: $(STAMP) system-deps
	$(PY) -m lbproxy.lab up

lab-down:
	$(PY) -m lbproxy.lab down

# CHANGELOG.md from the fragments in changelog.d/ (towncrier, configured in pyproject.toml).
# `make changelog` rewrites the file's "unreleased" section (between its two markers) from
# the fragments, leaving them in place; `make changelog RELEASE=1.0.0` first makes the
# release: towncrier writes the 1.0.0 section below it and removes the fragments.
RELEASE ?=
changelog: $(STAMP)
	$(if $(RELEASE),$(VENV)/bin/towncrier build --yes --version $(RELEASE))
	$(VENV)/bin/towncrier build --draft --date unreleased \
	  --version "$$($(PY) -c 'import lbproxy; print(lbproxy.__version__)')" 2>/dev/null \
	  > CHANGELOG.md.draft
	awk '/<!-- unreleased end -->/ {skip = 0} !skip {print} \
	  /<!-- unreleased start -->/ {while ((getline line < "CHANGELOG.md.draft") > 0) print line; skip = 1}' \
	  CHANGELOG.md > CHANGELOG.md.new
	mv CHANGELOG.md.new CHANGELOG.md
	rm -f CHANGELOG.md.draft

# The core's figures, then this tree's fast and general paths against the revision in
# benchmarks/BASELINE (or `make bench BASELINE=<rev>`), in alternating rounds.
bench: $(STAMP)
	$(PY) benchmarks/core.py
	$(PY) benchmarks/compare.py $(if $(BASELINE),--baseline $(BASELINE))

# Floods of forged identities (docs/performance.md, "Memory and floods"): in-process at
# 1,000,000 identities, then (root: network namespaces, gcc) a scaled-down flood through
# the real `twistd -n lbproxy` in the test bed.  A few minutes each.
bench-flood: $(STAMP) system-deps
	$(PY) benchmarks/flood.py
	$(PY) benchmarks/flood_bed.py

# Needs root: network namespaces, C generator and sink (gcc), kernel nft DNAT baseline.
bench-dataplane: $(STAMP) system-deps xdp
	$(PY) benchmarks/dataplane.py

bench-notify: $(STAMP) system-deps
	$(PY) benchmarks/notify.py
	$(PY) benchmarks/notify_bed.py

# The fleet (docs/fleet.md): propagation between two balancers through redis-server, then
# (root: network namespaces, gcc) delivered packets/s through 1 and 3 balancers behind ECMP.
bench-fleet: $(STAMP) system-deps
	$(PY) benchmarks/fleet.py
	$(PY) benchmarks/fleet_bed.py

clean:
	rm -rf $(VENV) .trial_temp _trial_temp .mypy_cache .ruff_cache build *.egg-info twisted/plugins/dropin.cache
	rm -f $(XDP_OBJ)
