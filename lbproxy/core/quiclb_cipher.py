"""QUIC-LB's encrypted connection IDs: the server ID and nonce under AES-128-ECB.

Why a module of its own: the ``quic`` strategy (`lbproxy.core.quiclb`) reads server IDs
in clear or encrypted; the cipher is the part with its own rules and its own test vectors.
draft-ietf-quic-load-balancers encrypts the octets after the first one
(``server ID || nonce``, ``n`` octets) with the configuration's 16-octet key:

* ``n == 16``: one AES-128-ECB block (single pass);
* otherwise a four-pass Feistel network over two halves of ``ceil(n / 2)`` octets -- for
  odd ``n`` the middle octet is split, its high nibble in the left half (whose last
  octet's low nibble is then zero) and its low nibble in the right half (whose first
  octet's high nibble is zero).  Pass ``i`` (1 to 4) encrypts ``expand(half, i)`` =
  ``half || zeros || n || i`` (16 octets) and XORs the first ``ceil(n / 2)`` octets of
  the result, masked the same way, into the other half::

      encrypt:  right_1 = right_0 ^ T(E(expand(left_0, 1)))
                left_1  = left_0  ^ T(E(expand(right_1, 2)))
                right_2 = right_1 ^ T(E(expand(left_1, 3)))
                left_2  = left_1  ^ T(E(expand(right_2, 4)))

  and the reverse to decrypt; a balancer stops after three passes when the server ID
  lies within the left half's whole octets.

The draft's test vectors (its appendix B, draft-19) are in tests/test_quiclb.py.  The
cipher is the ``cryptography`` package's AES, a dependency of pyOpenSSL and so always
installed with lbproxy; a context is made once per key and reused (ECB has no state).
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["KEY_LENGTH", "SINGLE_PASS", "ServerIdCipher"]

#: AES-128's key length, the only one the draft uses.
KEY_LENGTH: Final = 16
#: ``server ID || nonce`` of exactly this many octets is one AES block.
SINGLE_PASS: Final = 16


class ServerIdCipher:
    """Encrypts ``server ID || nonce`` and reads the server ID back, for one key and one
    pair of lengths.  The halves are handled as integers of ``ceil(n / 2)`` octets (the
    masks clear the nibble an odd length leaves to the other half)."""

    __slots__ = ("_decrypt", "_encrypt", "_half", "_left_mask", "_length", "_odd", "_passes",
                 "_right_mask", "_sid", "_suffix")  # fmt: skip

    def __init__(self, key: bytes, server_id_length: int, nonce_length: int) -> None:
        if len(key) != KEY_LENGTH:
            raise ValueError(f"a QUIC-LB key is {KEY_LENGTH} octets, not {len(key)}")
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        self._encrypt = cipher.encryptor().update
        self._decrypt = cipher.decryptor().update
        self._sid = server_id_length
        self._length = n = server_id_length + nonce_length
        self._half = h = (n + 1) // 2
        self._odd = n % 2 == 1
        full = (1 << (8 * h)) - 1
        self._left_mask = full ^ 0x0F if self._odd else full
        self._right_mask = full >> 4 if self._odd else full
        # expand(half, i) = half || zeros || n || i: the part after the half, per pass.
        self._suffix = {i: bytes(SINGLE_PASS - 2 - h) + bytes((n, i)) for i in (1, 2, 3, 4)}
        # Three passes give the left half; the server ID needs the right one too when it
        # reaches past the left half's whole octets.
        self._passes = 3 if server_id_length <= n // 2 else 4

    def _f(self, half: int, index: int) -> int:
        """The first `h` octets of AES(expand(half, index)), as an integer."""
        h = self._half
        return int.from_bytes(self._encrypt(half.to_bytes(h, "big") + self._suffix[index])[:h],
                              "big")  # fmt: skip

    def _split(self, text: bytes) -> tuple[int, int]:
        h = self._half
        return (int.from_bytes(text[:h], "big") & self._left_mask,
                int.from_bytes(text[self._length - h :], "big") & self._right_mask)  # fmt: skip

    def _join(self, left: int, right: int) -> bytes:
        h = self._half
        if self._odd:
            return ((left >> 4) << (8 * h - 4) | right).to_bytes(self._length, "big")
        return left.to_bytes(h, "big") + right.to_bytes(h, "big")

    def encrypt(self, plaintext: bytes) -> bytes:
        """``server ID || nonce`` (`n` octets) as the connection ID carries it."""
        if len(plaintext) != self._length:
            raise ValueError(f"{len(plaintext)} octets, not server ID + nonce = {self._length}")
        if self._length == SINGLE_PASS:
            return bytes(self._encrypt(plaintext))
        lm, rm = self._left_mask, self._right_mask
        left, right = self._split(plaintext)
        right ^= self._f(left, 1) & rm
        left ^= self._f(right, 2) & lm
        right ^= self._f(left, 3) & rm
        left ^= self._f(right, 4) & lm
        return self._join(left, right)

    def server_id(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """The server ID from the `n` octets after a connection ID's first octet."""
        text = bytes(ciphertext)
        if self._length == SINGLE_PASS:
            return bytes(self._decrypt(text))[: self._sid]
        lm, rm = self._left_mask, self._right_mask
        left, right = self._split(text)
        left ^= self._f(right, 4) & lm
        right ^= self._f(left, 3) & rm
        left ^= self._f(right, 2) & lm
        if self._passes == 3:
            return left.to_bytes(self._half, "big")[: self._sid]
        right ^= self._f(left, 1) & rm
        return self._join(left, right)[: self._sid]
