# Two commands matter (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test unit lint typecheck bench clean system-deps

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# Debian tools the network test bed and the demo drive (root only; harmless if present).
system-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 || ! command -v ethtool >/dev/null 2>&1 || ! command -v tcpdump >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables ethtool tcpdump iproute2 >/dev/null; \
	  else echo "note: nftables/ethtool/tcpdump missing and not root; network tests will skip"; fi; \
	fi

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check lbproxy tests benchmarks twisted/plugins
	$(VENV)/bin/mypy
	$(VENV)/bin/trial --temp-directory=.trial_temp tests
	$(VENV)/bin/twistd --help | grep -q lbproxy

unit: $(STAMP)
	$(VENV)/bin/trial --temp-directory=.trial_temp tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lbproxy tests benchmarks twisted/plugins

typecheck: $(STAMP)
	$(VENV)/bin/mypy

demo: $(STAMP) system-deps
	$(PY) -m lbproxy.demo

bench: $(STAMP)
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) .trial_temp _trial_temp .mypy_cache .ruff_cache build *.egg-info twisted/plugins/dropin.cache
