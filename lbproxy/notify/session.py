"""AMP for an untrusted peer: bounded, timed calls; input that cannot raise into the reactor.

Both ends of a notification connection (the balancer's ``BalancerProtocol``, an agent's
``AgentSession``) are :class:`GuardedAMP`:

* **the TLS handshake has a deadline** (``handshake_timeout``): a peer that connects and never
  completes it (or whose identity check never ends) is dropped and counted ``timeout``;
* **every remote call has a deadline** (``call_timeout``): a peer that does not answer in time
  is silent or too slow; it is dropped (which fails every call still outstanding on it, so
  nothing waits forever) and counted ``timeout``;
* **outstanding calls per connection are bounded** (``max_outstanding``): :meth:`call`
  returns ``None`` instead of sending when the bound is reached, and the caller decides (the
  balancer keeps the work queued, bounded by its subscription registry; an agent coalesces);
* **malformed input is refused, counted and never raised**: a box whose arguments do not
  parse is answered ``BAD_ARGUMENT`` and counted ``bad_argument``; an unknown command is
  answered ``UNHANDLED`` and counted ``protocol``; anything that makes AMP's parser raise (an
  empty box, say) ends the connection, counted ``protocol``.

So memory per peer is bounded by ``max_outstanding`` calls, whatever the peer does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols import amp
from twisted.python.failure import Failure

from lbproxy.notify.policy import Refusal

DEFAULT_CALL_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_OUTSTANDING = 512


class GuardedAMP(amp.AMP):
    """AMP with deadlines, a bound on outstanding calls, and refusals instead of exceptions.

    ``refuse(reason, detail)`` counts (and logs) a refusal concerning this peer.
    """

    def __init__(
        self,
        clock: IReactorTime,
        refuse: Callable[[Refusal, str], object],
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__()
        self.clock = clock
        self._count = refuse
        self.call_timeout = call_timeout
        self.max_outstanding = max_outstanding
        self.handshake_timeout = handshake_timeout
        self.outstanding = 0  # calls sent and not yet answered (or failed)
        self.answers = 0  # calls the peer answered (a result or a protocol error)
        self.dropped: Refusal | None = None  # why we ended this connection, if we did
        self._handshake_timer: IDelayedCall | None = None

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.handshake_timeout > 0:
            self._handshake_timer = self.clock.callLater(
                self.handshake_timeout, self._handshake_expired
            )

    def handshake_verified(self) -> None:
        """The TLS handshake finished and the peer was verified: stop the deadline."""
        self._stop_handshake_timer()

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self.drop(Refusal.TIMEOUT, f"no verified TLS handshake in {self.handshake_timeout:g} s")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_handshake_timer()
        super().connectionLost(reason)

    def drop(self, reason: Refusal, detail: str) -> None:
        """Count ``reason`` and end the connection now (once)."""
        if self.dropped is not None:
            return
        self.dropped = reason
        self._count(reason, detail)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- calls to the peer --------------------------------------------------------------

    @property
    def can_call(self) -> bool:
        """Whether :meth:`call` would send now."""
        return self.outstanding < self.max_outstanding and self.dropped is None

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[Any] | None:
        """``callRemote`` with a deadline; ``None`` (nothing sent) when ``max_outstanding``
        calls are already waiting for an answer or the connection was dropped."""
        if not self.can_call:
            return None
        self.outstanding += 1
        d: Deferred[Any] = self.callRemote(command, **arguments)
        timer = self.clock.callLater(self.call_timeout, self._call_expired, command)

        def answered(result: object) -> object:
            self.outstanding -= 1
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure) or result.check(ConnectionClosed) is None:
                self.answers += 1
            return result

        d.addBoth(answered)
        return d

    def _call_expired(self, command: type[amp.Command]) -> None:
        self.drop(Refusal.TIMEOUT, f"no answer to {command.__name__} in {self.call_timeout:g} s")

    # -- input from the peer ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """AMP's parser, which raises on some malformed input (an empty box): refused."""
        try:
            super().dataReceived(data)
        except Exception as e:
            self.drop(Refusal.PROTOCOL, f"malformed AMP: {e!r}")

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Deferred[Any]]:
        """Responders whose argument parsing cannot raise into AMP; unknown commands counted."""
        responder = super().locateResponder(name)
        if responder is None:

            def unknown(box: amp.AmpBox) -> Deferred[Any]:
                self._count(Refusal.PROTOCOL, f"unknown command {name!r}")
                return fail(amp.RemoteAmpError(amp.UNHANDLED_ERROR_CODE, "Unhandled Command"))

            return unknown

        def guarded(box: amp.AmpBox) -> Deferred[Any]:
            try:
                return responder(box)
            except Exception as e:  # the arguments did not parse
                self._count(Refusal.BAD_ARGUMENT, f"malformed {name!r}: {e!r}")
                return fail(amp.RemoteAmpError(b"BAD_ARGUMENT", "malformed arguments"))

        return guarded
