"""lbproxy: a load balancer that keeps mobile IPv6 terminals on one backend.

A mobile IPv6 terminal keeps its home address while its care-of address
(the packet's source) changes.  lbproxy extracts a terminal-specific identity
from each packet (home address option, interface ID, ESP SPI, or source
address), keeps a sticky table from that identity to a backend, follows
care-of address change notifications, and forwards by rewriting addresses.

The package has three rings (see docs/architecture.md):

* ``lbproxy.wire``: bytes to views and back, pure;
* ``lbproxy.core`` (and ``notify.machine``): decisions, pure except for an injected
  clock;
* the edges: ``lbproxy.io`` (raw sockets, batched I/O, the executors, the forwarding
  service), ``lbproxy.notify`` (TLS clients and servers), ``lbproxy.ops`` (control
  socket, manhole, metrics, health, persistence), ``tap`` (twistd).
"""

__version__ = "0.1.0.dev0"
