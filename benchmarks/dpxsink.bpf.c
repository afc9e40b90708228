// SPDX-License-Identifier: GPL-2.0
/*
 * dpxsink.bpf.c: the frame sink of benchmarks/dataplane.py (`--generator frames`).
 *
 * Why: with two CPUs the generator and the sink share one (the "other machines"), and
 * the frame generator offers a million packets a second.  dpsink (AF_PACKET behind the
 * kernel's receive path) then costs more per packet than the forwarders under test, and
 * the sink, not the forwarder, sets the delivered rate.  This program, on sink0, counts
 * what arrives where the driver hands it over, before any socket buffer is made:
 *
 *   dpx_counts[0]: IPv6 frames; [1]: the good ones -- UDP to the benchmark's port whose
 *   payload starts with "LBDP" and whose checksum is valid, the pseudo-header's source
 *   being the Home Address Option's address when the packet still has one (the kernel's
 *   DNAT forwards it untouched; lbproxy in translate mode removes it) -- as dpsink.c
 *   counts them.
 *
 * Then XDP_DROP, or XDP_PASS when dpx_config[0] says so (the latency runs, whose
 * dpsink takes timestamps from the kernel's receive path).  The port is dpx_config[1].
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} dpx_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} dpx_counts SEC(".maps");

#define PAYLOAD 64
#define UDP_LEN (8 + PAYLOAD)

static __always_inline void count(__u32 index)
{
	__u64 *cell = bpf_map_lookup_elem(&dpx_counts, &index);

	if (cell)
		*cell += 1;
}

static __always_inline __u32 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u32)((s & 0xffff) + (s >> 16));
}

/* Is the UDP datagram at `udp` (UDP_LEN bytes, inside the frame) ours, with a valid
 * checksum over the pseudo-header of `src` and `dst`? */
static __always_inline int good(__u8 *udp, __u8 *src, __u8 *dst, __u16 port)
{
	__u8 tail[8] = {0, 0, 0, UDP_LEN, 0, 0, 0, 17};
	__s64 s;

	if (udp[2] != (port >> 8) || udp[3] != (port & 0xff) || udp[8] != 'L' ||
	    udp[9] != 'B' || udp[10] != 'D' || udp[11] != 'P')
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)src, 16, 0);
	if (s < 0)
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)dst, 16, (__wsum)s);
	if (s < 0)
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)tail, 8, (__wsum)s);
	if (s < 0)
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)udp, UDP_LEN, (__wsum)s);
	return s >= 0 && fold((__u64)(__u32)s) == 0xffff;
}

SEC("xdp")
int dpxsink(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *end = (void *)(long)ctx->data_end;
	__u8 *ip = data + ETH_HLEN;
	__u32 k0 = 0, k1 = 1, *pass, *port;
	int ok = 0;

	pass = bpf_map_lookup_elem(&dpx_config, &k0);
	port = bpf_map_lookup_elem(&dpx_config, &k1);
	if (!pass || !port || ip + 40 > end || ((struct ethhdr *)data)->h_proto !=
	    bpf_htons(ETH_P_IPV6))
		return XDP_PASS;
	count(0);
	if (ip[6] == 17 && ip + 40 + UDP_LEN <= end && ip[4] == 0 && ip[5] == UDP_LEN) {
		ok = good(ip + 40, ip + 8, ip + 24, (__u16)*port);
	} else if (ip[6] == 60 && ip + 40 + 24 + UDP_LEN <= end && ip[4] == 0 &&
		   ip[5] == 24 + UDP_LEN && ip[40] == 17 && ip[41] == 2 && ip[46] == 0xC9 &&
		   ip[47] == 16) {
		ok = good(ip + 64, ip + 48, ip + 24, (__u16)*port);
	}
	if (ok)
		count(1);
	return *pass ? XDP_PASS : XDP_DROP;
}
