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

#include "dpcommon.h"

#define MAXBATCH 1024

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

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
        base[i] = terminal_packet(p, coa, hoa, vip, port, i + 1);
        if (spread) { /* an odd multiplier: a permutation of the 16-bit group */
            uint16_t g = (uint16_t)((i + 1) * 40503u);
            p[12] = (uint8_t)(g >> 8);
            p[13] = (uint8_t)g;
        }
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
