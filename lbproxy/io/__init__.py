"""The I/O ring: the Twisted edges that move packets between the kernel and the core.

The raw-socket port (`rawsocket`: a protocol bound to a transport, as ``twisted.pair``
does it), batched ``recvmmsg``/``sendmmsg`` I/O (`mmsg`), the kernel's neighbour table
(`neighbours`), the executors of the core's decisions -- the Python fast path
(`fastpath`) and the XDP program's loader (`xdp`) -- and the forwarding service that
joins them to the core (`forwarder`).
"""
