/* capgen: paced two-way G.711 call load with per-packet latency, for bench/capacity.py.
 * (Pacing, sendmmsg/recvmmsg batching and the stdin/stdout handshake follow rtpgen.c.)
 *
 * Two inherited UDP sockets: PHONE (the legacy phones' side: sends plain RTP to the
 * proxy's inside ports, receives what the proxy relays to the phones) and PEER (the
 * remote SPA: sends precomputed SRTP to the proxy's outside ports, receives the SRTP the
 * proxy sends it). Every call sends one packet every 1/RATE s on each leg; the N calls
 * are spread evenly over the period (packet j of the schedule belongs to call j % N).
 *
 * usage: capgen PHONE_FD PEER_FD CALLFILE SRTPFILE WARMUP DURATION RATE KEYMODE
 *   CALLFILE: line 1 "N K SRTPLEN"; then N lines
 *     "phone_dst peer_dst phone_ssrc phone_seq0 phone_rx_key peer_rx_key"
 *     phone_rx_key / peer_rx_key: the key of packets *received* on that socket for this
 *     call: the source port (KEYMODE 0) or the SSRC (KEYMODE 1, zero-proxy baseline)
 *   SRTPFILE: N*K packets of SRTPLEN bytes, call-major: the peer leg's packets
 *     (K per call; when they run out the peer leg of that call stops)
 * Protocol on stdout: "WIN0" when the measuring window starts, "WIN1" when it ends
 * (traffic keeps flowing: a paced load is never paused), then after a drain
 * "END key=value ..." with sent/received/lost counts and latency percentiles (µs)
 * for the packets sent inside the window, per direction:
 *   up   = phone -> proxy -> peer (RTP -> SRTP),  down = peer -> proxy -> phone.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#define PAYLOAD_LEN 160
#define PKT_LEN (12 + PAYLOAD_LEN)
#define MAXB 64
#define RING 2048            /* per call and leg: 40 s of 20 ms packets */
#define BIN_US 10            /* latency histogram bin */
#define NBINS 200000         /* up to 2 s */

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Latency uses CLOCK_REALTIME on both ends: send time just before sendmmsg, receive time
 * from the kernel (SO_TIMESTAMPNS: when the packet reached our socket), so that this
 * process's own scheduling delays are not counted as the relay's latency. */
static double now_rt(void) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static int kernel_ts = 1;

struct leg {                 /* one direction */
	double *sent_at;         /* [call * RING + seq % RING], <0: nothing outstanding */
	uint16_t *sent_seq;
	unsigned char *in_win;   /* sent inside the window */
	unsigned long long sent_win, recv_win, recv_all, unmatched, dup_or_late;
	unsigned *hist;
	double max_us;
};

static int ncalls, keymode;
static int32_t map_up[65536], map_down[65536];  /* rx key -> call (port mode) */
static uint32_t *ssrc_up, *ssrc_down;           /* call -> rx ssrc (ssrc mode) */
static struct leg up, down;
static double win0 = -1, win1 = -1;

static void leg_init(struct leg *l) {
	l->sent_at = malloc(sizeof(double) * ncalls * RING);
	l->sent_seq = calloc((size_t)ncalls * RING, 2);
	l->in_win = calloc((size_t)ncalls * RING, 1);
	for (long i = 0; i < (long)ncalls * RING; i++) l->sent_at[i] = -1;
	l->hist = calloc(NBINS, sizeof(unsigned));
}

static void note_sent(struct leg *l, int call, uint16_t seq, double t) {
	long s = (long)call * RING + seq % RING;
	l->sent_at[s] = t;
	l->sent_seq[s] = seq;
	int w = win0 >= 0 && win1 < 0;
	l->in_win[s] = w;
	if (w) l->sent_win++;
}

static int find_call(struct leg *l, int port, uint32_t ssrc) {
	if (keymode == 0) return (l == &up ? map_up : map_down)[port];
	uint32_t *tab = l == &up ? ssrc_up : ssrc_down;   /* baseline: ssrc = first + call */
	uint32_t i = ssrc - tab[0];
	return i < (uint32_t)ncalls && tab[i] == ssrc ? (int)i : -1;
}

static void note_recv(struct leg *l, const unsigned char *p, unsigned len, int port, double t) {
	l->recv_all++;
	if (len < 12) { l->unmatched++; return; }
	uint16_t seq = (p[2] << 8) | p[3];
	uint32_t ssrc = ((uint32_t)p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11];
	int call = find_call(l, port, ssrc);
	if (call < 0) { l->unmatched++; return; }
	long s = (long)call * RING + seq % RING;
	if (l->sent_at[s] < 0 || l->sent_seq[s] != seq) { l->dup_or_late++; return; }
	double us = (t - l->sent_at[s]) * 1e6;
	l->sent_at[s] = -1;
	if (!l->in_win[s]) return;
	l->recv_win++;
	long b = (long)(us / BIN_US);
	if (b < 0) b = 0;
	if (b >= NBINS) b = NBINS - 1;
	l->hist[b]++;
	if (us > l->max_us) l->max_us = us;
}

static double pct(struct leg *l, double q) {
	unsigned long long total = l->recv_win, acc = 0;
	if (!total) return -1;
	unsigned long long want = (unsigned long long)(q * total);
	if (want >= total) want = total - 1;
	for (long b = 0; b < NBINS; b++) {
		acc += l->hist[b];
		if (acc > want) return (b + 0.5) * BIN_US;
	}
	return (NBINS - 0.5) * BIN_US;
}

static unsigned char rxbuf[MAXB][2048];
static struct mmsghdr rxm[MAXB];
static struct iovec rxv[MAXB];
static struct sockaddr_in rxa[MAXB];
static char rxc[MAXB][CMSG_SPACE(sizeof(struct timespec)) + 64];
unsigned long long no_kernel_ts;

static double rx_time(struct msghdr *h, double fallback) {
	for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
			struct timespec ts;
			memcpy(&ts, CMSG_DATA(c), sizeof(ts));
			return ts.tv_sec + ts.tv_nsec * 1e-9;
		}
	no_kernel_ts++;
	return fallback;
}

static int drain(int fd, struct leg *l) {
	int total = 0;
	for (;;) {
		for (int k = 0; k < MAXB; k++) {
			rxm[k].msg_hdr.msg_namelen = sizeof(rxa[k]);
			rxm[k].msg_hdr.msg_control = rxc[k];
			rxm[k].msg_hdr.msg_controllen = kernel_ts ? sizeof(rxc[k]) : 0;
		}
		int r = recvmmsg(fd, rxm, MAXB, MSG_DONTWAIT, NULL);
		if (r <= 0) break;
		double t = now_rt();
		for (int k = 0; k < r; k++)
			note_recv(l, rxbuf[k], rxm[k].msg_len, ntohs(rxa[k].sin_port),
			          kernel_ts ? rx_time(&rxm[k].msg_hdr, t) : t);
		total += r;
		if (r < MAXB) break;
	}
	return total;
}

static void print_leg(const char *name, struct leg *l) {
	printf(" %s_sent=%llu %s_recv=%llu %s_recv_all=%llu %s_unmatched=%llu %s_late=%llu"
	       " %s_p50_us=%.1f %s_p90_us=%.1f %s_p99_us=%.1f %s_p999_us=%.1f %s_max_us=%.1f",
	       name, l->sent_win, name, l->recv_win, name, l->recv_all, name, l->unmatched,
	       name, l->dup_or_late, name, pct(l, 0.5), name, pct(l, 0.9), name, pct(l, 0.99),
	       name, pct(l, 0.999), name, l->max_us);
}

int main(int argc, char **argv) {
	if (argc != 9) {
		fprintf(stderr, "usage: %s PHONE_FD PEER_FD CALLFILE SRTPFILE WARMUP DURATION RATE KEYMODE\n", argv[0]);
		return 2;
	}
	int phone_fd = atoi(argv[1]), peer_fd = atoi(argv[2]);
	double warmup = atof(argv[5]), duration = atof(argv[6]), rate = atof(argv[7]);
	keymode = atoi(argv[8]);
	const char *kts = getenv("CAPGEN_KERNEL_TS");
	if (kts && *kts == '0') kernel_ts = 0;
	int one = 1;
	if (kernel_ts && (setsockopt(phone_fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one)) ||
	                  setsockopt(peer_fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one))))
		kernel_ts = 0;
	FILE *cf = fopen(argv[3], "r");
	if (!cf) { perror("callfile"); return 2; }
	long k_per_call; int srtp_len;
	if (fscanf(cf, "%d %ld %d", &ncalls, &k_per_call, &srtp_len) != 3 || ncalls < 1) return 2;
	struct sockaddr_in *phone_dst = calloc(ncalls, sizeof(*phone_dst));
	struct sockaddr_in *peer_dst = calloc(ncalls, sizeof(*peer_dst));
	uint32_t *phone_ssrc = calloc(ncalls, 4);
	uint32_t *phone_seq = calloc(ncalls, 4);
	ssrc_up = calloc(ncalls, 4);
	ssrc_down = calloc(ncalls, 4);
	for (int i = 0; i < 65536; i++) map_up[i] = map_down[i] = -1;
	for (int i = 0; i < ncalls; i++) {
		unsigned pd, ed, ps, p0, kd, ku;
		if (fscanf(cf, "%u %u %u %u %u %u", &pd, &ed, &ps, &p0, &kd, &ku) != 6) return 2;
		phone_dst[i].sin_family = peer_dst[i].sin_family = AF_INET;
		phone_dst[i].sin_addr.s_addr = peer_dst[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		phone_dst[i].sin_port = htons(pd);
		peer_dst[i].sin_port = htons(ed);
		phone_ssrc[i] = ps;
		phone_seq[i] = p0;
		/* what the phone receives is the down leg, what the peer receives the up leg */
		if (keymode == 0) { map_down[kd & 0xffff] = i; map_up[ku & 0xffff] = i; }
		ssrc_down[i] = kd;
		ssrc_up[i] = ku;
	}
	fclose(cf);
	unsigned char *srtp = malloc((size_t)ncalls * k_per_call * srtp_len + 1);
	FILE *sf = fopen(argv[4], "rb");
	if (!sf) { perror("srtpfile"); return 2; }
	if (fread(srtp, srtp_len, (size_t)ncalls * k_per_call, sf) != (size_t)ncalls * k_per_call) {
		fprintf(stderr, "srtpfile too short\n");
		return 2;
	}
	fclose(sf);
	leg_init(&up);
	leg_init(&down);

	static unsigned char txbuf[MAXB][PKT_LEN];
	struct mmsghdr ptx[MAXB], etx[MAXB];
	struct iovec ptv[MAXB], etv[MAXB];
	for (int k = 0; k < MAXB; k++) {
		ptv[k].iov_base = txbuf[k]; ptv[k].iov_len = PKT_LEN;
		memset(&ptx[k], 0, sizeof(ptx[k]));
		ptx[k].msg_hdr.msg_iov = &ptv[k]; ptx[k].msg_hdr.msg_iovlen = 1;
		ptx[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
		etv[k].iov_len = srtp_len;
		memset(&etx[k], 0, sizeof(etx[k]));
		etx[k].msg_hdr.msg_iov = &etv[k]; etx[k].msg_hdr.msg_iovlen = 1;
		etx[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
		rxv[k].iov_base = rxbuf[k]; rxv[k].iov_len = sizeof(rxbuf[k]);
		memset(&rxm[k], 0, sizeof(rxm[k]));
		rxm[k].msg_hdr.msg_iov = &rxv[k]; rxm[k].msg_hdr.msg_iovlen = 1;
		rxm[k].msg_hdr.msg_name = &rxa[k];
	}
	static unsigned char pkt[PKT_LEN];
	pkt[0] = 0x80; pkt[1] = 0;
	for (int j = 0; j < PAYLOAD_LEN; j++) pkt[12 + j] = (j * 7 + 3) & 0xff;

	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	double total_rate = rate * ncalls;   /* schedule slots per second, per leg */
	double t0 = now() + 0.01, t_win0 = t0 + warmup, t_win1 = t_win0 + duration;
	unsigned long long slot = 0, senderr = 0, late_sends = 0;
	double worst_lag = 0;
	struct pollfd pfd[2] = { { .fd = phone_fd, .events = POLLIN }, { .fd = peer_fd, .events = POLLIN } };
	for (;;) {
		double tn = now();
		if (win0 < 0 && tn >= t_win0) { win0 = tn; printf("WIN0\n"); fflush(stdout); }
		if (win0 >= 0 && win1 < 0 && tn >= t_win1) { win1 = tn; printf("WIN1\n"); fflush(stdout); break; }
		unsigned long long due = tn > t0 ? (unsigned long long)((tn - t0) * total_rate) + 1 : 0;
		if (due > slot) {
			double lag = tn - (t0 + slot / total_rate);
			if (lag > worst_lag) worst_lag = lag;
			if (lag > 0.002) late_sends++;
		}
		while (due > slot) {
			int nb = 0, ne = 0;
			double ts_send = now_rt();
			while (due > slot && nb < MAXB) {
				int i = slot % ncalls;
				long k = slot / ncalls;
				uint16_t s = (phone_seq[i] + k) & 0xffff;
				unsigned char *b = txbuf[nb];
				memcpy(b, pkt, PKT_LEN);
				b[2] = s >> 8; b[3] = s & 0xff;
				uint32_t ts = htonl((uint32_t)((phone_seq[i] + k) * 160u));
				uint32_t ss = htonl(phone_ssrc[i]);
				memcpy(b + 4, &ts, 4);
				memcpy(b + 8, &ss, 4);
				ptx[nb].msg_hdr.msg_name = &phone_dst[i];
				note_sent(&up, i, s, ts_send);
				nb++;
				if (k < k_per_call) {
					unsigned char *e = srtp + ((size_t)i * k_per_call + k) * srtp_len;
					etv[ne].iov_base = e;
					etx[ne].msg_hdr.msg_name = &peer_dst[i];
					note_sent(&down, i, (e[2] << 8) | e[3], ts_send);
					ne++;
				}
				slot++;
			}
			for (int d = 0; d < nb;) {
				int r = sendmmsg(phone_fd, ptx + d, nb - d, 0);
				if (r < 0) { if (errno != EINTR) { senderr++; d++; } continue; }
				d += r;
			}
			for (int d = 0; d < ne;) {
				int r = sendmmsg(peer_fd, etx + d, ne - d, 0);
				if (r < 0) { if (errno != EINTR) { senderr++; d++; } continue; }
				d += r;
			}
		}
		drain(phone_fd, &down);
		drain(peer_fd, &up);
		double next = t0 + slot / total_rate;
		double tmo = next - now();
		if (tmo > 0) {
			struct timespec ts = { 0, (long)(tmo * 1e9) };
			if (ppoll(pfd, 2, &ts, NULL) > 0) {
				drain(phone_fd, &down);
				drain(peer_fd, &up);
			}
		}
	}
	/* drain: whatever of the window's packets has not arrived within 0.5 s is lost */
	double tend = now() + 0.5;
	while (now() < tend) {
		struct timespec ts = { 0, 20000000 };
		ppoll(pfd, 2, &ts, NULL);
		drain(phone_fd, &down);
		drain(peer_fd, &up);
	}
	printf("END calls=%d window_s=%.3f senderr=%llu late_sends=%llu worst_lag_ms=%.3f"
	       " kernel_ts=%d no_kernel_ts=%llu",
	       ncalls, win1 - win0, senderr, late_sends, worst_lag * 1e3, kernel_ts, no_kernel_ts);
	print_leg("up", &up);
	print_leg("down", &down);
	/* both directions together */
	struct leg all = { 0 };
	all.hist = calloc(NBINS, sizeof(unsigned));
	for (long b = 0; b < NBINS; b++) all.hist[b] = up.hist[b] + down.hist[b];
	all.recv_win = up.recv_win + down.recv_win;
	printf(" all_p50_us=%.1f all_p99_us=%.1f\n", pct(&all, 0.5), pct(&all, 0.99));
	fflush(stdout);
	return 0;
}
