/*
 * dpsink: the counting sink of benchmarks/dataplane.py.
 *
 * Why C and AF_PACKET: the sink must count whatever the balancer (lbproxy or
 * kernel nftables DNAT) delivers, faster than either can deliver it, and the
 * two deliver different packets: lbproxy in translate mode sends plain UDP
 * from the home address, DNAT keeps the Home Address Option, which this
 * kernel (no CONFIG_IPV6_MIP6) would reject.  An AF_PACKET socket sees both
 * before the kernel's own processing (the benchmark drops them there with
 * nftables so no ICMPv6 errors flow back).  recvmmsg(2) drains up to 256
 * packets per call.
 *
 * Counts: every IPv6 packet, and the "good" ones: UDP to the given port whose
 * payload starts with "LBDP" and whose checksum is valid (the pseudo-header
 * source is the HAO's home address when there is one).  Latency: the kernel's
 * receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME) minus the generator's
 * timestamp in the payload, per good packet.
 *
 * usage: dpsink IFNAME PORT SECONDS   (stops at SECONDS or on SIGINT/SIGTERM)
 * Prints one JSON line with counts and latency percentiles in microseconds.
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

#define BATCH 256
#define SNAP 256
#define MAXSAMPLES (8u << 20)

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* 1 if the packet is one of ours with a valid UDP checksum; *stamp gets its timestamp. */
static int good(const uint8_t *p, size_t n, int port, uint64_t *stamp) {
    if (n < 48 || p[0] >> 4 != 6) return 0;
    size_t end = 40 + (size_t)(p[4] << 8 | p[5]);
    if (end > n) return 0;
    const uint8_t *src = p + 8;
    uint8_t nh = p[6];
    size_t off = 40;
    while (nh == 60 || nh == 0) {
        if (off + 8 > end) return 0;
        size_t hend = off + ((size_t)p[off + 1] + 1) * 8;
        if (hend > end) return 0;
        for (size_t i = off + 2; i < hend;) {
            if (p[i] == 0) { i++; continue; }
            if (i + 2 > hend) return 0;
            if (p[i] == 0xC9 && p[i + 1] == 16 && i + 18 <= hend) src = p + i + 2;
            i += 2 + p[i + 1];
        }
        nh = p[off];
        off = hend;
    }
    if (nh != 17 || off + 8 + 16 > end) return 0;
    const uint8_t *u = p + off;
    if ((u[2] << 8 | u[3]) != port || memcmp(u + 8, "LBDP", 4) != 0) return 0;
    size_t ulen = end - off;
    uint32_t s = sum16(src, 16, 0);
    s = sum16(p + 24, 16, s);
    s += (uint32_t)ulen + 17;
    s = sum16(u, ulen, s);
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    if (s != 0xffff) return 0;
    uint64_t t = 0;
    for (int b = 0; b < 8; b++) t = t << 8 | u[16 + b];
    *stamp = t;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: dpsink IFNAME PORT SECONDS\n");
        return 2;
    }
    int port = atoi(argv[2]);
    double seconds = atof(argv[3]);
    int fd = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IPV6));
    if (fd < 0) { perror("socket"); return 1; }
    int rcvbuf = 32 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_ll ll = {0};
    ll.sll_family = AF_PACKET;
    ll.sll_protocol = htons(ETH_P_IPV6);
    ll.sll_ifindex = (int)if_nametoindex(argv[1]);
    if (!ll.sll_ifindex) { perror(argv[1]); return 1; }
    if (bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) { perror("bind"); return 1; }

    static uint8_t bufs[BATCH][SNAP];
    static char ctl[BATCH][64];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    uint32_t *lat = malloc(MAXSAMPLES * sizeof(uint32_t));
    if (!lat) return 1;
    size_t samples = 0;

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("ready\n");
    fflush(stdout);
    uint64_t total = 0, ok = 0, first = 0, last = 0;
    uint64_t end = now_ns(CLOCK_MONOTONIC) + (uint64_t)(seconds * 1e9);
    while (!stop && now_ns(CLOCK_MONOTONIC) < end) {
        for (int k = 0; k < BATCH; k++) {
            iov[k].iov_base = bufs[k];
            iov[k].iov_len = SNAP;
            memset(&msgs[k].msg_hdr, 0, sizeof msgs[k].msg_hdr);
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            msgs[k].msg_hdr.msg_control = ctl[k];
            msgs[k].msg_hdr.msg_controllen = sizeof ctl[k];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            perror("recvmmsg");
            break;
        }
        uint64_t fallback = now_ns(CLOCK_REALTIME);
        for (int k = 0; k < n; k++) {
            uint64_t stamp;
            total++;
            if (!good(bufs[k], msgs[k].msg_len, port, &stamp)) continue;
            ok++;
            uint64_t at = fallback;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[k].msg_hdr); c;
                 c = CMSG_NXTHDR(&msgs[k].msg_hdr, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof ts);
                    at = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
                }
            }
            if (!first) first = at;
            last = at;
            if (samples < MAXSAMPLES) {
                uint64_t d = at > stamp ? (at - stamp) / 1000 : 0;
                lat[samples++] = d > 0xffffffffu ? 0xffffffffu : (uint32_t)d;
            }
        }
    }
    struct tpacket_stats st;
    socklen_t sl = sizeof st;
    unsigned drops = 0;
    if (getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &sl) == 0) drops = st.tp_drops;
    qsort(lat, samples, sizeof *lat, cmp_u32);
#define PCT(q) (samples ? lat[(size_t)((double)(samples - 1) * (q))] : 0)
    printf("{\"received\": %llu, \"good\": %llu, \"sink_drops\": %u, \"span\": %.6f, "
           "\"lat_p50_us\": %u, \"lat_p90_us\": %u, \"lat_p99_us\": %u, \"lat_p999_us\": %u, "
           "\"lat_max_us\": %u}\n",
           (unsigned long long)total, (unsigned long long)ok, drops,
           (double)(last - first) / 1e9, PCT(0.5), PCT(0.9), PCT(0.99), PCT(0.999),
           samples ? lat[samples - 1] : 0);
    return 0;
}
