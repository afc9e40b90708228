// SPDX-License-Identifier: MIT
/*
 * lbproxy's XDP executor: the usual packets of established bindings, in the driver.
 *
 * It decides nothing.  Python's core (lbproxy.core.balancer) owns every decision and
 * lbproxy/io/xdp.py mirrors what this program needs into maps:
 *
 *   lb_config      the policy: virtual address, mode, whether each direction may be
 *                  served here, the table's lifetime and rounding, the clock
 *   lb_backends    backend index -> address, usable/configured, checksum constants,
 *                  and the next hop when user space resolved it (link, MACs, MTU)
 *   lb_backend_ix  backend address -> index (is a reply's source a backend?)
 *   lb_ports       destination ports served (when the policy restricts them)
 *   lb_own         this host's addresses (server-link packets to them are not replies)
 *   lb_bindings    home address -> backend index, table expiry, care-of address
 *                  (user space writes), and the stamps of the hits (this program
 *                  writes): last seen, the expiry it gave, hits, stale passes -- one
 *                  entry, so a packet costs one hash lookup (two missed the caches
 *                  with 100,000 terminals)
 *   lb_stale       home addresses whose packets went up as stale (a set): user space
 *                  writes their entries again from the table, and empties it
 *   lb_confirmed   home address -> confirmed care-of address (replies get a Type 2
 *                  Routing Header to it)
 *   lb_counters    per-CPU totals; lb_backend_packets per-CPU packets per backend
 *
 * Inbound (client link): IPv6, one Destination Options header laid out as PadN(2) + Home
 * Address Option (24 bytes), UDP or TCP, to the virtual address, from a home address
 * with a live binding to a usable backend: translate mode removes the Destination
 * Options header (bpf_xdp_adjust_head) and makes source := home address, destination :=
 * backend; transparent mode makes destination := backend.  Hop limit - 1, transport
 * checksum by the backend's constant (RFC 1624), exactly as lbproxy/io/fastpath.py does.
 *
 * Replies (server link): IPv6 straight to UDP or TCP, from a backend, to a terminal:
 * source := virtual address, hop limit - 1, checksum by the backend's reply constant;
 * with a confirmed care-of address a Type 2 Routing Header (the home address) is
 * inserted and the packet goes to the care-of address (RFC 6275 section 6.4).
 *
 * Anything else -- another layout, a fragment, ICMPv6, a miss, an expired binding, a
 * hop limit of 1 or less, no route or neighbour for the next hop -- is XDP_PASS,
 * untouched: the raw-socket path (the general path) decides.  This program never
 * creates a binding.  Claim 10 (lifetimes refreshed by traffic) survives: every hit
 * stamps its entry, and user space folds a binding's stamps into the table when the table
 * needs them: before it expires the binding or chooses it for eviction.
 *
 * Unattached (LB_DRY: BPF_PROG_TEST_RUN in the tests) a rewritten packet is XDP_TX
 * with its Ethernet header untouched; attached, it is redirected to its next hop: for a
 * terminal's packet the backend's, as user space resolved it from the neighbour table
 * (LB_NEXT_HOP; a sixth of the cost per packet was the lookup), else -- and for
 * replies -- the kernel's FIB and neighbour table (bpf_fib_lookup).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define LB_INBOUND 1u   /* the policy lets this program take terminals' packets */
#define LB_REPLIES 2u   /* ... and backends' replies */
#define LB_TRANSLATE 4u /* translate mode (else transparent) */
#define LB_PORTS 8u     /* only the ports in lb_ports are served */
#define LB_DRY 16u      /* unattached: XDP_TX, no FIB lookup (BPF_PROG_TEST_RUN) */
#define LB_FIXED_CLOCK 32u /* the table clock is fixed_now_ns (tests) */

#define LB_USABLE 1u     /* a binding to this backend may keep its packets */
#define LB_CONFIGURED 2u /* a configured backend: its replies are ours */
#define LB_NEXT_HOP 4u   /* ifindex, eth and mtu hold the backend's next hop */

#define LB_MAX_BACKENDS 256
#define LB_COUNTERS 9

enum {
	C_IN_PACKETS, C_IN_BYTES, C_REPLY_PACKETS, C_REPLY_BYTES,
	C_IN_PASSED, C_REPLIES_PASSED, C_STALE, C_NO_ROUTE, C_UNQUEUED,
};

#define EEXIST_ 17
#define IPPROTO_ROUTING_ 43
#define IPPROTO_DSTOPTS_ 60
#define IPPROTO_UDP_ 17
#define IPPROTO_TCP_ 6
#define AF_INET6_ 10

struct addr {
	__u64 hi, lo;
};

struct lb_config {
	struct addr vip;
	__u32 flags;
	__u32 _pad;
	__u64 lifetime_ns;
	__u64 resolution_ns;
	__s64 clock_offset_ns; /* table clock = monotonic clock + this */
	__u64 fixed_now_ns;    /* with LB_FIXED_CLOCK: the table clock, fixed (tests) */
};

struct lb_backend {
	struct addr addr;
	__u32 flags;
	__u16 delta_in;  /* destination := backend, for a packet to the virtual address */
	__u16 delta_out; /* source := virtual address, for a reply from the backend */
	__u32 ifindex;   /* with LB_NEXT_HOP: the link to the backend, */
	__u8 eth[12];    /* its MAC then ours (the Ethernet header's first 12 bytes), */
	__u16 mtu;       /* and the link's MTU (a larger packet asks the FIB: too big) */
	__u16 _pad;
};

#define LB_CARE_OF 1u /* lb_binding.care_of holds the binding's care-of address */

struct lb_binding {
	/* user space's: written whole, carrying over the stamps it read just before */
	__u32 backend;
	__u32 flags;
	__u64 expires_ns;     /* the table's expiry when user space last wrote it */
	struct addr care_of;  /* the binding's care-of address then */
	/* this program's stamps */
	__u64 seen_ns;        /* table clock of the last hit */
	__u64 seen_expires_ns; /* the expiry that hit gave (the table's when it asks) */
	__u64 hits;           /* packets forwarded here, since the entry was made */
	__u64 stale;          /* packets passed up: expired here, or from another
			       * care-of address */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_config);
} lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, struct addr);
	__type(value, __u32);
} lb_backend_ix SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} lb_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct addr);
	__type(value, __u8);
} lb_own SEC(".maps");

/* Sized by the loader to the table's bound (bpf_map__set_max_entries), and allocated
 * entry by entry (a preallocated map of the default bound, 1,000,000, would hold
 * hundreds of megabytes of kernel memory from the start).  Only user space inserts. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr);
	__type(value, struct lb_binding);
} lb_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr);
	__type(value, struct addr);
} lb_confirmed SEC(".maps");

/* Sized by the loader like lb_bindings: a set of identities that have an entry there,
 * so it cannot fill up with repeats however many packets go up. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr);
	__type(value, __u8);
} lb_stale SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} lb_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, __u64);
} lb_backend_packets SEC(".maps");

static __always_inline void count(__u32 which, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&lb_counters, &which);

	if (c)
		*c += n;
}

static __always_inline int same(const struct addr *a, const struct addr *b)
{
	return a->hi == b->hi && a->lo == b->lo;
}

/* `checksum.apply_delta16` (lbproxy/wire/checksum.py), as fastpath.py inlines it: a UDP
 * checksum of 0 (none) stays 0, and a computed UDP 0 is sent as 0xFFFF. */
static __always_inline __u16 apply_delta(__u16 csum, __u16 delta, int udp)
{
	__u32 x;

	if (!csum && udp)
		return 0;
	x = ((__u32)0xFFFF - csum + delta) % 0xFFFF;
	if (!x)
		x = 0xFFFF;
	csum = 0xFFFF - x;
	if (!csum && udp)
		csum = 0xFFFF;
	return csum;
}

static __always_inline __u64 table_now(const struct lb_config *cfg)
{
	if (cfg->flags & LB_FIXED_CLOCK)
		return cfg->fixed_now_ns;
	return bpf_ktime_get_ns() + cfg->clock_offset_ns;
}

/* The next hop for `dst` (from `src`): fills the Ethernet addresses into `eth_out`
 * (12 bytes) and returns the egress ifindex, or 0 when the kernel has none to give. */
static __always_inline __u32 next_hop(struct xdp_md *ctx, const struct addr *src,
				      const struct addr *dst, __u16 tot_len, __u8 *eth_out)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET6_;
	fib.tot_len = tot_len;
	fib.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(fib.ipv6_src, src, 16);
	__builtin_memcpy(fib.ipv6_dst, dst, 16);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	__builtin_memcpy(eth_out, fib.dmac, 6);
	__builtin_memcpy(eth_out + 6, fib.smac, 6);
	return fib.ifindex;
}

/* The usual shape of a terminal's packet, after the Ethernet header: IPv6 (40), the
 * Destination Options header (next header, length 2, PadN(2), HAO type and length,
 * home address: 24), then UDP (8) or TCP (20). */
struct mobile_head {
	__u8 vtf[4];
	__be16 plen;
	__u8 nh;
	__u8 hop;
	struct addr src;
	struct addr dst;
	__u8 nh2;
	__u8 dlen;
	__u8 padn[4];
	__u8 hao[2];
	struct addr hoa;
	__be16 sport;
	__be16 dport;
} __attribute__((packed));

static __always_inline int inbound(struct xdp_md *ctx, const struct lb_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct mobile_head *m = data + sizeof(*eth);
	__u64 n = (__u64)(data_end - data) - sizeof(*eth);
	struct lb_binding *binding;
	struct lb_backend *backend;
	__u8 eth_out[12];
	__u32 ifindex = 0, csum_at, index;
	__u16 csum;
	__u64 now, end;
	int udp, translate = !!(cfg->flags & LB_TRANSLATE);

	struct addr src, dst, hoa;

	if ((void *)(m + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return XDP_PASS;
	src = m->src;
	dst = m->dst;
	hoa = m->hoa;
	if ((m->vtf[0] >> 4) != 6 || m->nh != IPPROTO_DSTOPTS_ ||
	    (__u64)bpf_ntohs(m->plen) + 40 != n || !same(&dst, &cfg->vip) ||
	    m->dlen != 2 || m->padn[0] != 1 || m->padn[1] != 2 || m->padn[2] != 0 ||
	    m->padn[3] != 0 || m->hao[0] != 0xC9 || m->hao[1] != 16)
		return XDP_PASS;
	if (m->nh2 == IPPROTO_UDP_) {
		udp = 1;
		csum_at = 40 + 24 + 6;
	} else if (m->nh2 == IPPROTO_TCP_ && n >= 40 + 24 + 20) {
		udp = 0;
		csum_at = 40 + 24 + 16;
	} else {
		return XDP_PASS;
	}
	if (cfg->flags & LB_PORTS) {
		__u16 port = bpf_ntohs(m->dport);

		if (!bpf_map_lookup_elem(&lb_ports, &port))
			return XDP_PASS;
	}
	if (m->hop <= 1)
		return XDP_PASS; /* the general path refreshes, then drops and counts it */
	binding = bpf_map_lookup_elem(&lb_bindings, &hoa);
	if (!binding)
		return XDP_PASS;
	now = table_now(cfg);
	if ((now >= binding->expires_ns && now >= binding->seen_expires_ns) ||
	    !(binding->flags & LB_CARE_OF) || !same(&src, &binding->care_of)) {
		/* Expired as far as this program knows, or from a care-of address that is
		 * not the binding's: the table decides (the general path may have refreshed
		 * it; a new care-of address is linked there).  The identity goes into
		 * lb_stale (once: no allocation when it is there already), and user space
		 * writes what the table says at its next sync, so the next packets stay
		 * here. */
		__u8 one = 1;
		long rc;

		__sync_fetch_and_add(&binding->stale, 1);
		count(C_STALE, 1);
		rc = bpf_map_update_elem(&lb_stale, &hoa, &one, BPF_NOEXIST);
		if (rc && rc != -EEXIST_)
			count(C_UNQUEUED, 1);
		return XDP_PASS;
	}
	index = binding->backend;
	backend = bpf_map_lookup_elem(&lb_backends, &index);
	if (!backend || !(backend->flags & LB_USABLE))
		return XDP_PASS;
	if (!(cfg->flags & LB_DRY)) {
		__u64 len = n - (translate ? 24 : 0);

		if ((backend->flags & LB_NEXT_HOP) && len <= backend->mtu) {
			ifindex = backend->ifindex;
			__builtin_memcpy(eth_out, backend->eth, 12);
		} else {
			ifindex = next_hop(ctx, translate ? &hoa : &src, &backend->addr,
					   len, eth_out);
		}
		if (!ifindex) {
			count(C_NO_ROUTE, 1);
			return XDP_PASS;
		}
	}

	/* Claim 10: the binding's lifetime starts again (the table's rounding: up to a
	 * multiple of the resolution). */
	end = (now + cfg->resolution_ns - 1) / cfg->resolution_ns * cfg->resolution_ns;
	binding->seen_ns = now;
	binding->seen_expires_ns = end + cfg->lifetime_ns;
	__sync_fetch_and_add(&binding->hits, 1);
	count(C_IN_PACKETS, 1);
	count(C_IN_BYTES, n);
	{
		__u64 *cell = bpf_map_lookup_elem(&lb_backend_packets, &index);

		if (cell)
			*cell += 1;
	}

	/* The transport checksum: destination := backend. */
	{
		__u8 *c = (__u8 *)m + csum_at;

		if ((void *)(c + 2) > data_end)
			return XDP_PASS;
		csum = apply_delta((__u16)(c[0] << 8 | c[1]), backend->delta_in, udp);
		c[0] = csum >> 8;
		c[1] = csum & 0xFF;
	}
	if (!translate) {
		m->hop -= 1;
		m->dst = backend->addr;
	} else {
		/* Drop the Destination Options header: the Ethernet and IPv6 headers move 24
		 * bytes on, then the packet starts there. */
		struct ethhdr e = *eth;
		struct mobile_head h = *m;
		struct ethhdr *e2;
		struct mobile_head *m2;

		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		e2 = data + 24;
		m2 = (void *)(e2 + 1);
		if ((void *)m2 + 40 > data_end)
			return XDP_PASS;
		*e2 = e;
		__builtin_memcpy(m2->vtf, h.vtf, 4);
		m2->plen = bpf_htons(bpf_ntohs(h.plen) - 24);
		m2->nh = h.nh2;
		m2->hop = h.hop - 1;
		m2->src = h.hoa;
		m2->dst = backend->addr;
		if (bpf_xdp_adjust_head(ctx, 24))
			return XDP_ABORTED;
	}
	if (cfg->flags & LB_DRY)
		return XDP_TX;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + 12 > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, eth_out, 12);
	return bpf_redirect(ifindex, 0);
}

struct reply_head {
	__u8 vtf[4];
	__be16 plen;
	__u8 nh;
	__u8 hop;
	struct addr src;
	struct addr dst;
} __attribute__((packed));

/* A Type 2 Routing Header: next header, length 2, type 2, segments left 1, reserved,
 * the home address. */
struct rh2 {
	__u8 nh;
	__u8 len;
	__u8 type;
	__u8 left;
	__u32 reserved;
	struct addr home;
} __attribute__((packed));

static __always_inline int reply(struct xdp_md *ctx, const struct lb_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct reply_head *r = data + sizeof(*eth);
	__u64 n = (__u64)(data_end - data) - sizeof(*eth);
	struct lb_backend *backend;
	struct addr *care_of, to;
	__u32 *index, ifindex = 0, csum_at;
	__u8 eth_out[12];
	__u8 *c;
	__u16 csum;
	int udp;

	if ((void *)(r + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return XDP_PASS;
	if ((r->vtf[0] >> 4) != 6 || (__u64)bpf_ntohs(r->plen) + 40 != n)
		return XDP_PASS;
	if (r->nh == IPPROTO_UDP_ && n >= 48) {
		udp = 1;
		csum_at = 40 + 6;
	} else if (r->nh == IPPROTO_TCP_ && n >= 60) {
		udp = 0;
		csum_at = 40 + 16;
	} else {
		return XDP_PASS;
	}
	/* Not a reply (`lbproxy.core.policy.is_reply`): the kernel's. */
	{
		__u8 first = ((__u8 *)&r->dst)[0], second = ((__u8 *)&r->dst)[1];

		if (first == 0xFF || (first == 0xFE && (second & 0xC0) == 0x80))
			return XDP_PASS;
	}
	if (bpf_map_lookup_elem(&lb_own, &r->dst))
		return XDP_PASS;
	index = bpf_map_lookup_elem(&lb_backend_ix, &r->src);
	if (!index)
		return XDP_PASS;
	backend = bpf_map_lookup_elem(&lb_backends, index);
	if (!backend || !(backend->flags & LB_CONFIGURED))
		return XDP_PASS;
	if (r->hop <= 1)
		return XDP_PASS;
	care_of = bpf_map_lookup_elem(&lb_confirmed, &r->dst);
	to = care_of ? *care_of : r->dst;
	if (!(cfg->flags & LB_DRY)) {
		ifindex = next_hop(ctx, &cfg->vip, &to, n + (care_of ? 24 : 0), eth_out);
		if (!ifindex) {
			count(C_NO_ROUTE, 1);
			return XDP_PASS;
		}
	}
	count(C_REPLY_PACKETS, 1);
	count(C_REPLY_BYTES, n);

	/* The transport checksum: source := virtual address (the destination, the home
	 * address, stays the final one). */
	c = (__u8 *)r + csum_at;
	if ((void *)(c + 2) > data_end)
		return XDP_PASS;
	csum = apply_delta((__u16)(c[0] << 8 | c[1]), backend->delta_out, udp);
	c[0] = csum >> 8;
	c[1] = csum & 0xFF;
	if (!care_of) {
		r->src = cfg->vip;
		r->hop -= 1;
	} else {
		/* RFC 6275 section 6.4: room for a Type 2 Routing Header before the transport
		 * header; the Ethernet and IPv6 headers move 24 bytes back. */
		struct ethhdr e = *eth;
		struct reply_head h = *r;
		struct ethhdr *e2;
		struct reply_head *r2;
		struct rh2 *rh;

		if (bpf_xdp_adjust_head(ctx, -24))
			return XDP_ABORTED;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		e2 = data;
		r2 = (void *)(e2 + 1);
		rh = (void *)(r2 + 1);
		if ((void *)(rh + 1) > data_end)
			return XDP_ABORTED;
		*e2 = e;
		__builtin_memcpy(r2->vtf, h.vtf, 4);
		r2->plen = bpf_htons(bpf_ntohs(h.plen) + 24);
		r2->nh = IPPROTO_ROUTING_;
		r2->hop = h.hop - 1;
		r2->src = cfg->vip;
		r2->dst = to;
		rh->nh = h.nh;
		rh->len = 2;
		rh->type = 2;
		rh->left = 1;
		rh->reserved = 0;
		rh->home = h.dst;
	}
	if (cfg->flags & LB_DRY)
		return XDP_TX;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + 12 > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, eth_out, 12);
	return bpf_redirect(ifindex, 0);
}

SEC("xdp")
int lbproxy_inbound(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	int verdict;

	if (!cfg || !(cfg->flags & LB_INBOUND))
		return XDP_PASS;
	verdict = inbound(ctx, cfg);
	if (verdict == XDP_PASS)
		count(C_IN_PASSED, 1);
	return verdict;
}

SEC("xdp")
int lbproxy_replies(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	int verdict;

	if (!cfg || !(cfg->flags & LB_REPLIES))
		return XDP_PASS;
	verdict = reply(ctx, cfg);
	if (verdict == XDP_PASS)
		count(C_REPLIES_PASSED, 1);
	return verdict;
}

/* Every packet up, untouched.  Not lbproxy's data path: attached to the peer of a veth
 * the balancer redirects into (a test bed, a container), it gives that end the NAPI
 * context veth needs to take redirected frames, without turning GRO on there (which
 * would coalesce TCP segments before a capture sees them).  docs/deploying.md. */
SEC("xdp")
int lbproxy_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
