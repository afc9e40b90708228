// SPDX-License-Identifier: GPL-2.0
/*
 * dpxgen.bpf.c: the frame generator of benchmarks/dataplane.py (`--generator xdp`).
 *
 * Why: an AF_PACKET generator on a veth hands the balancer's link socket buffers,
 * which veth must copy into fresh pages before an XDP program may run on them; the
 * copy (and the socket buffer) then dominates the XDP executor's cost, which a real
 * NIC never pays -- its driver runs XDP on the raw frame.  dpxgen runs this program
 * with BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES): each run
 * turns its frame into terminal i's packet and returns XDP_TX, which the kernel
 * carries out as a redirect out of gen0, so the balancer's lbc receives raw frames
 * (xdp_frame) as from a NIC: the XDP executor runs on them in place, the kernel and
 * the Python paths get socket buffers built from them, as a NIC driver builds them.
 *
 * dpxgen.c writes terminal 1's frame into dpx_frame (benchmarks/dpgen.c's layout:
 * Ethernet to lbc, IPv6, Destination Options with PadN(2) and the Home Address Option,
 * UDP 4000 -> port, 64-byte payload, a valid checksum).  Each run copies it whole into
 * its frame -- the kernel recycles a frame's page without copying the data in again,
 * and whoever had the frame last (the kernel's NAT and neighbour output, say) may have
 * rewritten it in place -- then writes the terminal number into the low 32 bits of the
 * care-of (source) and home addresses and fixes the UDP checksum incrementally (RFC
 * 1624).  The payload's timestamp stays 0: the throughput runs take no latency.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

/* [0]: the number of terminals; [1]: the next terminal's index (0-based). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} dpx_state SEC(".maps");

#define FRAME (14 + 40 + 24 + 8 + 64)

/* [0]: terminal 1's frame. */
struct frame {
	__u8 bytes[FRAME];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct frame);
} dpx_frame SEC(".maps");

#define ETH 14
#define COA_LOW (ETH + 8 + 12)        /* the source's last 4 bytes */
#define HOA_LOW (ETH + 40 + 8 + 12)   /* the Home Address Option's last 4 bytes */
#define UDP_CSUM (ETH + 40 + 24 + 6)

SEC("xdp")
int dpxgen(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *end = (void *)(long)ctx->data_end;
	__u32 k0 = 0, k1 = 1, id, old = 1, s;
	__u64 *terminals, *next;
	struct frame *frame;
	__u16 csum;

	if (data + FRAME > end)
		return XDP_ABORTED;
	terminals = bpf_map_lookup_elem(&dpx_state, &k0);
	next = bpf_map_lookup_elem(&dpx_state, &k1);
	frame = bpf_map_lookup_elem(&dpx_frame, &k0);
	if (!terminals || !next || !frame || !*terminals)
		return XDP_ABORTED;
	id = (__u32)*next + 1;
	*next = id >= *terminals ? 0 : id;

	__builtin_memcpy(data, frame->bytes, FRAME);
	__builtin_memcpy(&csum, data + UDP_CSUM, 2);  /* terminal 1's (old = 1) */
	/* RFC 1624: HC' = ~(~HC + ~m + m'), two 16-bit words replaced. */
	s = (__u16)~bpf_ntohs(csum);
	s += (__u16)~(old >> 16) + (__u16)~old;
	s += (id >> 16) + (id & 0xffff);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	csum = (__u16)~s;
	if (!csum)
		csum = 0xffff;
	csum = bpf_htons(csum);
	__builtin_memcpy(data + UDP_CSUM, &csum, 2);
	id = bpf_htonl(id);
	__builtin_memcpy(data + COA_LOW, &id, 4);
	__builtin_memcpy(data + HOA_LOW, &id, 4);
	return XDP_TX;
}
