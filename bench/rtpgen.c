/* Copied from the rtpengine peer kit's rtpgen.c (shared/peers/rtpengine), unchanged below this line. */
/* rtpgen: fast RTP load generator/receiver for the rtpengine userspace relay bench (rtpe_bench.py).
 *
 * Inherits two bound UDP sockets from the parent:
 *   TXFD: the "caller" socket; sends to 127.0.0.1:<PORT> of each call, round-robin
 *   RXFD: the "callee" socket; counts what rtpengine relays
 * Packets: 172 bytes = RTP header v2, PT 0, seq +1 / ts +160 per call, SSRC = SSRC_BASE + call index,
 * 160-byte payload ((i*7+3)&0xff, same as the Python side).
 *
 * Load: closed loop (at most WINDOW packets in flight) when RATE == 0, else open loop at RATE pps
 * in bursts of BURST packets (round-robin over the calls: one packet per call per burst when
 * BURST == number of calls).
 *
 * Measurement protocol with the parent (stdout/stdin lines), so that the parent can read CPU
 * counters and rtpengine's packet counters while no traffic is in flight:
 *   after WARMUP s: stop sending, drain, print "READY0 <recvd>", wait for a line on stdin,
 *                   then start the window (CLOCK_MONOTONIC t0) and resume;
 *   after DURATION s more: stop sending, drain, print "READY1 <recvd> <window s>", wait for a line;
 *   then print "END key=value ...".
 * The first KEEP received packets are written to KEEPFILE (2-byte big-endian length + bytes each).
 *
 * usage: rtpgen TXFD RXFD WINDOW RATE BURST WARMUP DURATION SSRC_BASE EXPECT_LEN KEEP KEEPFILE PORT...
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

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int rxfd, expect_len, keep, kept;
static FILE *kf;
static unsigned long long recvd, badlen;
static unsigned char rxbuf[MAXB][2048];
static struct mmsghdr rxm[MAXB];
static struct iovec rxv[MAXB];

/* wait up to timeout_s for packets on RXFD and read all that are queued; returns packets read */
static int receive(double timeout_s) {
	struct timespec tmo;
	if (timeout_s < 0) timeout_s = 0;
	tmo.tv_sec = (time_t)timeout_s;
	tmo.tv_nsec = (long)((timeout_s - tmo.tv_sec) * 1e9);
	struct pollfd pfd = { .fd = rxfd, .events = POLLIN };
	if (ppoll(&pfd, 1, &tmo, NULL) <= 0)
		return 0;
	int total = 0;
	for (;;) {
		int r = recvmmsg(rxfd, rxm, MAXB, MSG_DONTWAIT, NULL);
		if (r <= 0)
			break;
		for (int k = 0; k < r; k++) {
			unsigned len = rxm[k].msg_len;
			if ((int)len != expect_len) badlen++;
			if (kf && kept < keep) {
				unsigned char l2[2] = { len >> 8, len & 0xff };
				fwrite(l2, 1, 2, kf);
				fwrite(rxbuf[k], 1, len, kf);
				kept++;
			}
		}
		recvd += r;
		total += r;
		if (r < MAXB)
			break;
	}
	return total;
}

int main(int argc, char **argv) {
	if (argc < 13) {
		fprintf(stderr, "usage: %s TXFD RXFD WINDOW RATE BURST WARMUP DURATION SSRC_BASE EXPECT_LEN KEEP KEEPFILE PORT...\n", argv[0]);
		return 2;
	}
	int txfd = atoi(argv[1]);
	rxfd = atoi(argv[2]);
	long window = atol(argv[3]);
	double rate = atof(argv[4]);
	int burst = atoi(argv[5]);
	double warmup = atof(argv[6]), duration = atof(argv[7]);
	uint32_t ssrc_base = strtoul(argv[8], NULL, 0);
	expect_len = atoi(argv[9]);
	keep = atoi(argv[10]);
	const char *keepfile = argv[11];
	int ncalls = argc - 12;
	if (burst > MAXB) burst = MAXB;
	if (burst < 1) burst = 1;

	struct sockaddr_in *dst = calloc(ncalls, sizeof(*dst));
	unsigned char (*pkt)[PKT_LEN] = calloc(ncalls, PKT_LEN);
	uint32_t *seq = calloc(ncalls, sizeof(uint32_t));
	for (int i = 0; i < ncalls; i++) {
		dst[i].sin_family = AF_INET;
		dst[i].sin_port = htons(atoi(argv[12 + i]));
		dst[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		unsigned char *p = pkt[i];
		p[0] = 0x80; p[1] = 0;
		uint32_t ssrc = htonl(ssrc_base + i);
		memcpy(p + 8, &ssrc, 4);
		for (int j = 0; j < PAYLOAD_LEN; j++)
			p[12 + j] = (j * 7 + 3) & 0xff;
	}

	static unsigned char txbuf[MAXB][PKT_LEN];
	struct mmsghdr txm[MAXB];
	struct iovec txv[MAXB];
	for (int i = 0; i < MAXB; i++) {
		txv[i].iov_base = txbuf[i]; txv[i].iov_len = PKT_LEN;
		memset(&txm[i], 0, sizeof(txm[i]));
		txm[i].msg_hdr.msg_iov = &txv[i]; txm[i].msg_hdr.msg_iovlen = 1;
		txm[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
		rxv[i].iov_base = rxbuf[i]; rxv[i].iov_len = sizeof(rxbuf[i]);
		memset(&rxm[i], 0, sizeof(rxm[i]));
		rxm[i].msg_hdr.msg_iov = &rxv[i]; rxm[i].msg_hdr.msg_iovlen = 1;
	}

	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);  /* precise pacing sleeps */
	kf = keep > 0 ? fopen(keepfile, "wb") : NULL;

	unsigned long long sent = 0, written_off = 0, stalls = 0, senderr = 0;
	int nxt = 0;
	int closed = rate <= 0;
	double stall_s = 0.05;
	double t_start = now(), t_next = t_start + warmup, gt0 = 0, gt1 = 0;
	double sched_base = t_start;      /* open loop schedule: rate * (now - sched_base) - (sent - sched_sent) */
	unsigned long long sched_sent = 0;
	int phase = 0;
	char line[64];

	for (;;) {
		double tn = now();
		if (tn >= t_next) {
			/* stop sending and drain what is in flight, so the parent samples a quiet relay */
			double dl = now() + 0.2;
			while (recvd + written_off < sent && now() < dl)
				receive(dl - now());
			written_off = sent - recvd;   /* whatever did not come back is lost */
			if (phase == 0) {
				printf("READY0 %llu\n", recvd); fflush(stdout);
				if (!fgets(line, sizeof(line), stdin)) return 3;
				gt0 = now();
				t_next = gt0 + duration;
				sched_base = gt0; sched_sent = sent;
				phase = 1;
				continue;
			}
			gt1 = now();
			printf("READY1 %llu %.6f\n", recvd, gt1 - gt0); fflush(stdout);
			if (!fgets(line, sizeof(line), stdin)) return 3;
			break;
		}
		/* ---- send */
		long allowed;
		if (closed)
			allowed = window - (long)(sent - recvd - written_off);
		else {
			allowed = (long)(rate * (tn - sched_base)) - (long)(sent - sched_sent);
			if (allowed < burst)
				allowed = 0;
			else if (allowed > burst)
				allowed = burst;
		}
		while (allowed > 0) {
			int nb = allowed > MAXB ? MAXB : allowed;
			for (int k = 0; k < nb; k++) {
				int i = nxt;
				nxt = (i + 1 < ncalls) ? i + 1 : 0;
				memcpy(txbuf[k], pkt[i], PKT_LEN);
				uint16_t s = htons(seq[i] & 0xffff);
				uint32_t ts = htonl(seq[i] * 160u);
				memcpy(txbuf[k] + 2, &s, 2);
				memcpy(txbuf[k] + 4, &ts, 4);
				seq[i]++;
				txm[k].msg_hdr.msg_name = &dst[i];
			}
			int done = 0;
			while (done < nb) {
				int r = sendmmsg(txfd, txm + done, nb - done, 0);
				if (r < 0) {
					if (errno == EINTR) continue;
					senderr++;  /* e.g. ECONNREFUSED after an ICMP error; the packet counts as sent (lost) */
					done++;
					continue;
				}
				done += r;
			}
			sent += nb;
			allowed -= nb;
		}
		/* ---- receive */
		double tmo;
		if (closed)
			tmo = stall_s;
		else {
			tmo = (sent - sched_sent + burst) / rate + sched_base - now();
			if (tmo > 0.005) tmo = 0.005;
		}
		if (tmo > t_next - now())
			tmo = t_next - now();
		if (!receive(tmo) && closed && now() < t_next && recvd + written_off < sent) {
			stalls++;   /* nothing for stall_s: write the in-flight packets off as lost */
			written_off = sent - recvd;
		}
	}
	/* final drain */
	double tend = now() + 0.3;
	while (now() < tend)
		if (!receive(tend - now()))
			break;
	if (kf) fclose(kf);
	printf("END sent=%llu recvd=%llu badlen=%llu stalls=%llu senderr=%llu kept=%d\n",
			sent, recvd, badlen, stalls, senderr, kept);
	fflush(stdout);
	return 0;
}
