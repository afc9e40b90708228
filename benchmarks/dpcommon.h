/*
 * dpcommon.h: what dpgen.c, dpsink.c and dpxgen.c (benchmarks/dataplane.py's C
 * helpers) share: a clock read, the Internet checksum's 16-bit sum, and the layout of
 * a terminal's packet.
 */
#ifndef DPCOMMON_H
#define DPCOMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define PAYLOAD 64
/* IPv6, Destination Options (PadN(2) + Home Address Option), UDP, payload. */
#define PKT (40 + 24 + 8 + PAYLOAD)

static inline uint64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The ones' complement sum (unfolded) of `n` bytes at `p`, big-endian words, added to
 * `s`; an odd last byte is padded with a zero (RFC 1071). */
static inline uint32_t sum16(const uint8_t *p, size_t n, uint32_t s) {
    for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) s += (uint32_t)p[n - 1] << 8;
    return s;
}

static inline uint16_t fold(uint32_t s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* `prefix` with `i` in its last 32 bits. */
static inline void with_index(uint8_t *addr, const uint8_t *prefix, uint32_t i) {
    memcpy(addr, prefix, 16);
    addr[12] = (uint8_t)(i >> 24);
    addr[13] = (uint8_t)(i >> 16);
    addr[14] = (uint8_t)(i >> 8);
    addr[15] = (uint8_t)i;
}

/* Terminal `i`'s packet (PKT bytes at `p`): care-of (source) `coa`::i, home address
 * `hoa`::i, to `vip`, UDP 4000 -> `port`, a payload starting "LBDP".  The checksum,
 * sequence and timestamp fields are left zero; returns the unfolded sum of the rest,
 * pseudo-header included (its source: the home address, RFC 6275). */
static inline uint32_t terminal_packet(uint8_t *p, const uint8_t *coa, const uint8_t *hoa,
                                       const uint8_t *vip, int port, uint32_t i) {
    memset(p, 0, PKT);
    p[0] = 0x60;
    p[4] = (PKT - 40) >> 8;
    p[5] = (PKT - 40) & 0xff;
    p[6] = 60; /* Destination Options */
    p[7] = 64;
    with_index(p + 8, coa, i);
    memcpy(p + 24, vip, 16);
    uint8_t *d = p + 40; /* NH, len 2 (24 bytes), PadN(2), HAO type 0xC9 len 16 */
    d[0] = 17; d[1] = 2; d[2] = 1; d[3] = 2; d[4] = 0; d[5] = 0; d[6] = 0xC9; d[7] = 16;
    with_index(d + 8, hoa, i);
    uint8_t *u = p + 64;
    u[0] = 4000 >> 8; u[1] = 4000 & 0xff;
    u[2] = (uint8_t)(port >> 8); u[3] = (uint8_t)port;
    u[4] = 0; u[5] = 8 + PAYLOAD;
    memcpy(u + 8, "LBDP", 4);
    for (int k = 24; k < PAYLOAD; k++) u[8 + k] = (uint8_t)k;
    uint32_t s = sum16(d + 8, 16, 0);
    s = sum16(vip, 16, s);
    s += 8 + PAYLOAD + 17;
    return sum16(u, 8 + PAYLOAD, s);
}

#endif
