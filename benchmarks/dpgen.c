/*
 * dpgen: the traffic generator of benchmarks/dataplane.py.
 *
 * Why C: the benchmark measures the balancer, so the ends must not be the
 * bottleneck.  This sends IPv6/UDP packets carrying a Home Address Option
 * (RFC 6275 section 6.3) with sendmmsg(2) on an AF_PACKET socket straight to
 * the next hop's MAC address (no routing, no neighbour discovery on the
 * generator side), cycling through N terminals:
 *
 *   terminal i: source (care-of) = <coa prefix>::<i+1>, HAO = <hoa prefix>::<i+1>
 *   destination = the virtual address, UDP 4000 -> <port>, 64-byte payload
 *
 * The payload starts with "LBDP", a sequence number and CLOCK_REALTIME in
 * nanoseconds, so the sink can compute one-way latency (both ends run on the
 * same host).  The UDP checksum is valid (pseudo-header source = home address,
 * as RFC 6275 wants); the varying payload words are added incrementally.
 *
 * usage: dpgen IFNAME DSTMAC COA_PREFIX HOA_PREFIX VIP PORT TERMINALS
 *              RATE SECONDS BATCH [REPEAT [SPREAD]]
 *   RATE 0 = as fast as possible; otherwise packets/s, paced per batch.
 *   REPEAT (benchmarks/flood_bed.py): each terminal sends REPEAT packets back to
 *   back, and the run ends after one pass over the terminals (or SECONDS) --
 *   TERMINALS forged identities sending REPEAT packets each.  Without it, the
 *   terminals take turns, one packet each, until SECONDS.
 *   SPREAD 1: terminal i's source also carries a scatter of i in its third
 *   group (bits 32-47), so consecutive identities come from different /48s of
 *   the prefix's /32 (a spoofed flood, still inside 2001:db8::/32).
 * Prints one JSON line: {"sent":..,"errors":..,"elapsed":..}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64
#define PKT (40 + 24 + 8 + PAYLOAD)
#define MAXBATCH 1024

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s) {
    for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) s += (uint32_t)p[n - 1] << 8;
    return s;
}

static uint16_t fold(uint32_t s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static void with_index(uint8_t *addr, const uint8_t *prefix, uint32_t i) {
    memcpy(addr, prefix, 16);
    addr[12] = (uint8_t)(i >> 24);
    addr[13] = (uint8_t)(i >> 16);
    addr[14] = (uint8_t)(i >> 8);
    addr[15] = (uint8_t)i;
}

int main(int argc, char **argv) {
    if (argc < 11 || argc > 13) {
        fprintf(stderr, "usage: dpgen IFNAME DSTMAC COA HOA VIP PORT TERMINALS RATE SECONDS BATCH"
                        " [REPEAT [SPREAD]]\n");
        return 2;
    }
    const char *ifname = argv[1];
    unsigned mac[6];
    if (sscanf(argv[2], "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4],
               &mac[5]) != 6) {
        fprintf(stderr, "bad MAC %s\n", argv[2]);
        return 2;
    }
    uint8_t coa[16], hoa[16], vip[16];
    if (inet_pton(AF_INET6, argv[3], coa) != 1 || inet_pton(AF_INET6, argv[4], hoa) != 1 ||
        inet_pton(AF_INET6, argv[5], vip) != 1) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    int port = atoi(argv[6]);
    uint32_t terminals = (uint32_t)strtoul(argv[7], NULL, 10);
    double rate = atof(argv[8]);
    double seconds = atof(argv[9]);
    int batch = atoi(argv[10]);
    int repeat = argc > 11 ? atoi(argv[11]) : 0;
    int spread = argc > 12 ? atoi(argv[12]) : 0;
    if (terminals < 1 || batch < 1 || batch > MAXBATCH || seconds <= 0 || repeat < 0) {
        fprintf(stderr, "bad numbers\n");
        return 2;
    }

    /* One template per terminal, with the checksum sum of its fixed part. */
    uint8_t *templates = calloc(terminals, PKT);
    uint32_t *base = calloc(terminals, sizeof(uint32_t));
    if (!templates || !base) return 1;
    for (uint32_t i = 0; i < terminals; i++) {
        uint8_t *p = templates + (size_t)i * PKT;
        p[0] = 0x60;
        p[4] = (PKT - 40) >> 8;
        p[5] = (PKT - 40) & 0xff;
        p[6] = 60; /* Destination Options */
        p[7] = 64;
        with_index(p + 8, coa, i + 1);
        if (spread) { /* an odd multiplier: a permutation of the 16-bit group */
            uint16_t g = (uint16_t)((i + 1) * 40503u);
            p[12] = (uint8_t)(g >> 8);
            p[13] = (uint8_t)g;
        }
        memcpy(p + 24, vip, 16);
        uint8_t *d = p + 40; /* NH, len 2 (24 bytes), PadN(2), HAO type 0xC9 len 16 */
        d[0] = 17; d[1] = 2; d[2] = 1; d[3] = 2; d[4] = 0; d[5] = 0; d[6] = 0xC9; d[7] = 16;
        with_index(d + 8, hoa, i + 1);
        uint8_t *u = p + 64;
        u[0] = 4000 >> 8; u[1] = 4000 & 0xff;
        u[2] = (uint8_t)(port >> 8); u[3] = (uint8_t)port;
        u[4] = 0; u[5] = 8 + PAYLOAD;
        memcpy(u + 8, "LBDP", 4);
        for (int k = 24; k < PAYLOAD; k++) u[8 + k] = (uint8_t)k;
        /* Pseudo-header: home address, VIP, length, 17; then the UDP header and payload
         * with the checksum, sequence and timestamp fields zero. */
        uint32_t s = sum16(d + 8, 16, 0);
        s = sum16(vip, 16, s);
        s += 8 + PAYLOAD + 17;
        s = sum16(u, 8 + PAYLOAD, s);
        base[i] = s;
    }

    int fd = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IPV6));
    if (fd < 0) { perror("socket"); return 1; }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
    struct sockaddr_ll ll = {0};
    ll.sll_family = AF_PACKET;
    ll.sll_protocol = htons(ETH_P_IPV6);
    ll.sll_ifindex = (int)if_nametoindex(ifname);
    if (!ll.sll_ifindex) { perror(ifname); return 1; }
    ll.sll_halen = 6;
    for (int k = 0; k < 6; k++) ll.sll_addr[k] = (unsigned char)mac[k];

    static uint8_t bufs[MAXBATCH][PKT];
    static struct iovec iov[MAXBATCH];
    static struct mmsghdr msgs[MAXBATCH];
    for (int k = 0; k < batch; k++) {
        iov[k].iov_base = bufs[k];
        iov[k].iov_len = PKT;
        msgs[k].msg_hdr.msg_name = &ll;
        msgs[k].msg_hdr.msg_namelen = sizeof ll;
        msgs[k].msg_hdr.msg_iov = &iov[k];
        msgs[k].msg_hdr.msg_iovlen = 1;
    }

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    uint64_t sent = 0, errors = 0, seq = 0;
    uint32_t next = 0;
    int again = 0; /* packets of terminal `next` sent so far (REPEAT) */
    uint64_t total = repeat ? (uint64_t)terminals * (uint64_t)repeat : 0;
    uint64_t start = now_ns(CLOCK_MONOTONIC);
    uint64_t end = start + (uint64_t)(seconds * 1e9);
    for (;;) {
        uint64_t t = now_ns(CLOCK_MONOTONIC);
        if (t >= end || stop || (total && seq >= total)) break;
        if (rate > 0) {
            uint64_t due = start + (uint64_t)((double)seq * 1e9 / rate);
            if (due > t) {
                uint64_t wait = due - t;
                if (wait > 20000) {
                    struct timespec ts = {0, (long)(wait - 10000)};
                    nanosleep(&ts, NULL);
                }
                continue;
            }
        }
        uint64_t stamp = now_ns(CLOCK_REALTIME);
        int count = batch;
        if (total && seq + (uint64_t)count > total) count = (int)(total - seq);
        for (int k = 0; k < count; k++) {
            uint8_t *p = bufs[k];
            memcpy(p, templates + (size_t)next * PKT, PKT);
            uint8_t *pay = p + 72;
            uint32_t sq = (uint32_t)(seq + (uint64_t)k);
            pay[4] = (uint8_t)(sq >> 24); pay[5] = (uint8_t)(sq >> 16);
            pay[6] = (uint8_t)(sq >> 8); pay[7] = (uint8_t)sq;
            for (int b = 0; b < 8; b++) pay[8 + b] = (uint8_t)(stamp >> (56 - 8 * b));
            uint32_t s = sum16(pay + 4, 12, base[next]);
            uint16_t c = (uint16_t)~fold(s);
            if (c == 0) c = 0xffff;
            p[70] = (uint8_t)(c >> 8);
            p[71] = (uint8_t)c;
            if (repeat && ++again < repeat) continue;
            again = 0;
            if (++next == terminals) next = 0;
        }
        int n = sendmmsg(fd, msgs, (unsigned)count, 0);
        if (n < 0) {
            errors += (uint64_t)count;
            if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("sendmmsg"); break; }
        } else {
            sent += (uint64_t)n;
            errors += (uint64_t)(count - n);
        }
        seq += (uint64_t)count;
    }
    double elapsed = (double)(now_ns(CLOCK_MONOTONIC) - start) / 1e9;
    printf("{\"sent\": %llu, \"errors\": %llu, \"elapsed\": %.6f}\n", (unsigned long long)sent,
           (unsigned long long)errors, elapsed);
    return 0;
}
