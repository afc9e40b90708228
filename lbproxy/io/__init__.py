"""The I/O ring: the Twisted edges that move packets between the kernel and the core.

The raw-socket port (`rawsocket`), batched ``recvmmsg``/``sendmmsg`` I/O (`mmsg`), the
fast-path executor (`fastpath`) and the forwarding service that joins them to the core
(`forwarder`).
"""
