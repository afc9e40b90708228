"""The operator's ring: what an operator or a supervisor talks to.

The runtime API and ``lbproxyctl`` (`control`, `ctl`), the SSH manhole (`manhole`),
Prometheus metrics (`metrics`), backend health checks (`health`) and the table's
persistence across restarts (`persistence`).
"""
