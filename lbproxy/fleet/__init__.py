"""Several balancers, one answer: the exceptions to Maglev shared through a store.

See ``docs/fleet.md``.  `lbproxy.fleet.service.FleetService` is the entry point;
`lbproxy.fleet.replica.Replica` answers `lbproxy.core.balancer.ISharedBindings` for the
data path; `lbproxy.fleet.sync.Sync` decides what to publish and applies what the fleet
published; `lbproxy.fleet.store.RedisStore` is the connection; `lbproxy.fleet.codec`
checks everything read from the store.  (Nothing is imported here, so the configuration
can read `lbproxy.fleet.codec` without the store client.)
"""
