"""The home-agent agent's local command socket: home-agent software pushes bindings.

A home agent implementation that knows its binding cache need not be observed: it (or a
hook script) writes one JSON object per line to a UNIX socket, e.g.
``{"home": "2001:db8:1::16", "care_of": "2001:db8:a::16", "seq": 7, "lifetime": 420}``,
and reads one JSON answer per line: ``{"ok": true, "changed": true}`` or
``{"error": "..."}``.  ``{"command": "bindings"}`` lists the cache.  The socket's file
permissions are the access control; the agent's entitlement still applies.  A malformed
request (not JSON, not an object, a bad address, a sequence number that is not an integer in
0..65535, a lifetime that is not an integer in 0..262,140 s) is answered with an error and
changes nothing; nothing a client sends raises out of the reactor.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from lbproxy.notify.cache import BindingCache, CacheFull
from lbproxy.notify.policy import IEntitlement


class CommandProtocol(LineOnlyReceiver):
    """One client of the command socket."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, cache: BindingCache, entitlement: IEntitlement, clock: IReactorTime):
        self.cache = cache
        self.entitlement = entitlement
        self.clock = clock

    def lineReceived(self, line: bytes) -> None:
        try:
            answer = self.handle(json.loads(line))
        except (ValueError, TypeError, KeyError) as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # deeply nested JSON (RecursionError), ...
            answer = {"error": f"{type(e).__name__}"}
        self.sendLine(json.dumps(answer).encode())

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than ``MAX_LENGTH``: answered, then the connection is closed."""
        self.sendLine(json.dumps({"error": "line too long"}).encode())
        super().lineLengthExceeded(line)

    def handle(self, request: Any) -> dict[str, Any]:
        """Apply one request; raises ValueError/TypeError/KeyError for bad ones."""
        if not isinstance(request, dict):
            raise TypeError("expected a JSON object")
        if request.get("command") == "bindings":
            return {"bindings": [
                {"home": str(ipaddress.IPv6Address(b.home)),
                 "care_of": str(ipaddress.IPv6Address(b.care_of)),
                 "seq": b.seq, "lifetime": b.lifetime,
                 "remaining": round(b.expires - self.clock.seconds(), 1)}
                for b in self.cache
            ]}
        home = ipaddress.IPv6Address(request["home"]).packed
        care_of = ipaddress.IPv6Address(request["care_of"]).packed
        seq, lifetime = request["seq"], request["lifetime"]
        if type(seq) is not int or type(lifetime) is not int:
            raise TypeError("seq and lifetime must be integers")
        if not self.entitlement.allows(home):
            raise ValueError("home address outside this agent's prefixes")
        try:
            change = self.cache.update(home, care_of, seq, lifetime, self.clock.seconds())
        except CacheFull:
            return {"error": "binding cache full"}
        return {"ok": True, "changed": change is not None}


def command_factory(
    cache: BindingCache, entitlement: IEntitlement, clock: IReactorTime
) -> Factory:
    """Factory for the command socket."""
    return Factory.forProtocol(lambda: CommandProtocol(cache, entitlement, clock))
