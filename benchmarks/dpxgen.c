/*
 * dpxgen: benchmarks/dataplane.py's frame generator for `--generator xdp`.
 *
 * Loads dpxgen.bpf.o (compiled with clang by dataplane.py) through libbpf and runs
 * its program with BPF_PROG_TEST_RUN in live-frames mode on IFNAME (gen0): every run
 * makes terminal i's packet (dpgen.c's layout and addresses) and sends it out of
 * IFNAME as a raw frame -- an xdp_frame, as a NIC's driver hands one over -- instead
 * of a socket buffer (see dpxgen.bpf.c for why).  The kernel runs the program in
 * batches of 64 frames; the peer (lbc) needs a NAPI context (an XDP program or GRO),
 * else veth drops the frames.
 *
 * usage: dpxgen OBJECT IFNAME DSTMAC SRCMAC COA_PREFIX HOA_PREFIX VIP PORT TERMINALS
 *               SECONDS
 * Prints one JSON line: {"sent":..,"errors":..,"elapsed":..} ("sent": frames the
 * program made and the kernel transmitted or dropped at the peer's full ring;
 * dataplane.py reads what arrived from lbc's counters).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dpcommon.h"

#define REPEAT 65536

static int mac(const char *text, uint8_t *out) {
    unsigned m[6];
    if (sscanf(text, "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6)
        return -1;
    for (int k = 0; k < 6; k++) out[k] = (uint8_t)m[k];
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 11) {
        fprintf(stderr, "usage: dpxgen OBJECT IFNAME DSTMAC SRCMAC COA HOA VIP PORT TERMINALS"
                        " SECONDS\n");
        return 2;
    }
    uint8_t frame[14 + PKT] = {0};
    uint8_t coa[16], hoa[16], vip[16];
    if (mac(argv[3], frame) || mac(argv[4], frame + 6)) {
        fprintf(stderr, "bad MAC\n");
        return 2;
    }
    if (inet_pton(AF_INET6, argv[5], coa) != 1 || inet_pton(AF_INET6, argv[6], hoa) != 1 ||
        inet_pton(AF_INET6, argv[7], vip) != 1) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    int port = atoi(argv[8]);
    uint64_t terminals = strtoull(argv[9], NULL, 10);
    double seconds = atof(argv[10]);
    int ifindex = (int)if_nametoindex(argv[2]);
    if (!ifindex || terminals < 1 || seconds <= 0) {
        fprintf(stderr, "bad interface or numbers\n");
        return 2;
    }
    frame[12] = 0x86;
    frame[13] = 0xdd;
    uint8_t *p = frame + 14;
    uint16_t c = (uint16_t)~fold(terminal_packet(p, coa, hoa, vip, port, 1));
    if (!c) c = 0xffff;
    uint8_t *u = p + 64;
    u[6] = (uint8_t)(c >> 8);
    u[7] = (uint8_t)c;

    struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
    if (!obj || bpf_object__load(obj)) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct bpf_program *prog = bpf_object__find_program_by_name(obj, "dpxgen");
    int state = bpf_object__find_map_fd_by_name(obj, "dpx_state");
    int template = bpf_object__find_map_fd_by_name(obj, "dpx_frame");
    if (!prog || state < 0 || template < 0) {
        fprintf(stderr, "%s: no program dpxgen or map dpx_state, dpx_frame\n", argv[1]);
        return 1;
    }
    uint32_t key = 0;
    uint64_t zero = 0;
    if (bpf_map_update_elem(template, &key, frame, BPF_ANY)) {
        perror("dpx_frame");
        return 1;
    }
    if (bpf_map_update_elem(state, &key, &terminals, BPF_ANY)) {
        perror("dpx_state");
        return 1;
    }
    key = 1;
    bpf_map_update_elem(state, &key, &zero, BPF_ANY);

    /* The kernel wants the context to say where the data ends (the whole frame). */
    struct xdp_md ctx = {.data_end = sizeof frame, .ingress_ifindex = (uint32_t)ifindex};
    LIBBPF_OPTS(bpf_test_run_opts, opts,
        .data_in = frame,
        .data_size_in = sizeof frame,
        .ctx_in = &ctx,
        .ctx_size_in = sizeof ctx,
        .repeat = REPEAT,
        .flags = BPF_F_TEST_XDP_LIVE_FRAMES,
        .batch_size = 64,
    );
    uint64_t sent = 0, errors = 0, start = now_ns(CLOCK_MONOTONIC), stop = start + (uint64_t)(seconds * 1e9);
    while (now_ns(CLOCK_MONOTONIC) < stop) {
        if (bpf_prog_test_run_opts(bpf_program__fd(prog), &opts)) {
            perror("BPF_PROG_TEST_RUN");
            errors++;
            break;
        }
        sent += REPEAT;
    }
    double elapsed = (double)(now_ns(CLOCK_MONOTONIC) - start) / 1e9;
    printf("{\"sent\": %llu, \"errors\": %llu, \"elapsed\": %.6f}\n", (unsigned long long)sent,
           (unsigned long long)errors, elapsed);
    bpf_object__close(obj);
    return errors ? 1 : 0;
}
