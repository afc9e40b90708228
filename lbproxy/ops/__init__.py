"""The operator's ring: what an operator or a supervisor talks to.

The runtime API and ``lbproxyctl`` (`control`, `ctl`), the SSH manhole (`manhole`),
Prometheus metrics and ``/healthz`` (`metrics`), backend health checks (`health`), the
table's persistence across restarts (`persistence`), an honest reload (`reload`), audit
lines for every change (`audit`), the log's format (`logs`) and systemd's readiness and
watchdog (`systemd`).
"""
