/* The per-packet path in C: RtpSocket.datagram_received, RtcpSocket.datagram_received,
 * relay_rtcp and RelayLeg's packet methods (proxy/media/relay_packets.py and relay_leg.py),
 * statement for statement; those are the reference and say why each rule exists. A packet
 * is processed in place in the relay's receive buffer, which has room for what protect
 * appends. What a packet must tell Python is a call, as on the Python path: the session's
 * authenticated(side) the first time a key authenticates, the leg's log hooks (rate-limited
 * in Python) for a wrong source or a refused packet, the leg's clock on the failure path.
 * Legs are held for the whole packet: those calls may change or release anything. */
#include "fastrelay.h"

#include <errno.h>
#include <string.h>

#include "rules.h"

#define REORDER_WINDOW 100 /* relay_leg._REORDER_WINDOW */
#define MAX_SEQ_JUMP 1000  /* relay_leg._MAX_SEQ_JUMP */

static const char *const REFUSALS[] = {NULL, "grace_not_rtp", "grace_wrong_ssrc",
                                       "grace_bad_sequence"};

/* --- addresses --------------------------------------------------------------------- */

static int same_ip_port(const struct sockaddr_storage *sa, int family, const uint8_t *ip,
                        uint16_t port)
{
    if (sa->ss_family != family)
        return 0;
    if (family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        return ntohs(sin->sin_port) == port && memcmp(&sin->sin_addr, ip, 4) == 0;
    }
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
    return ntohs(sin6->sin6_port) == port && memcmp(&sin6->sin6_addr, ip, 16) == 0;
}

/* addr == peer, as Python compares the loop's address tuple with the latched one */
static int same_addr(const struct sockaddr_storage *sa, const Addr *peer)
{
    if (!peer->set || !same_ip_port(sa, peer->family, peer->ip, peer->port))
        return 0;
    if (peer->family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        return ntohl(sin6->sin6_flowinfo) == peer->flow && sin6->sin6_scope_id == peer->scope;
    }
    return 1;
}

/* (addr[0], addr[1]) == sdp: an SDP address is (ip, port) */
static int same_sdp(const struct sockaddr_storage *sa, const Addr *sdp)
{
    return sdp->set && same_ip_port(sa, sdp->family, sdp->ip, sdp->port);
}

static int same_ip(const struct sockaddr_storage *sa, const LegObject *leg)
{
    if (leg->expected_obj == NULL || sa->ss_family != leg->expected_family)
        return 0;
    if (sa->ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)sa)->sin_addr, leg->expected_ip, 4) == 0;
    return memcmp(&((const struct sockaddr_in6 *)sa)->sin6_addr, leg->expected_ip, 16) == 0;
}

/* --- Python on the rare paths -------------------------------------------------------- */

static int clock_now(LegObject *leg, double *now)
{
    PyObject *value = PyObject_CallNoArgs(leg->clock);
    if (value == NULL)
        return -1;
    *now = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return (*now == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* RelayLeg.dropped_wrong_source: counted; logged (in Python) once the leg knows its peer */
static int wrong_source(LegObject *a, const struct sockaddr_storage *from, const char *what)
{
    a->wrong_source++;
    if (a->expected_obj == NULL)
        return 0;
    PyObject *addr = addr_tuple(from);
    if (addr == NULL)
        return -1;
    PyObject *r = PyObject_CallMethod((PyObject *)a, "log_wrong_source", "Os", addr, what);
    Py_DECREF(addr);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* RelayLeg.refused: counted, and logged (in Python) */
static int refused(LegObject *a, const char *reason, long long *counter)
{
    (*counter)++;
    PyObject *r = PyObject_CallMethod((PyObject *)a, "log_refused", "s", reason);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int authenticated(SocketObject *s, LegObject *a)
{
    PyObject *session = s->session;
    Py_INCREF(session);
    PyObject *r = PyObject_CallMethod(session, "authenticated", "O", a->side);
    Py_DECREF(session);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* RelayLeg.stale_source */
static int stale_source(LegObject *a, const struct sockaddr_storage *from, int *stale)
{
    *stale = 0;
    int listed = 0;
    for (int i = 0; i < a->nstale && !listed; i++)
        listed = same_ip_port(from, a->stale[i].family, a->stale[i].ip, a->stale[i].port);
    if (!listed)
        return 0;
    double now;
    if (clock_now(a, &now) < 0)
        return -1;
    if (now < a->stale_until) {
        *stale = 1;
        return 0;
    }
    PyObject *none = PyTuple_New(0);
    if (none == NULL)
        return -1;
    Py_XSETREF(a->stale_obj, none);
    a->nstale = 0;
    return 0;
}

/* The latch checks of both handlers: 1 when the packet must be dropped as wrong_source */
static int not_the_peer(LegObject *a, const struct sockaddr_storage *from, const Addr *peer,
                        const Addr *sdp, int *drop)
{
    *drop = (peer->set && !same_sdp(from, sdp)) || (!same_ip(from, a) && !a->latch_any);
    if (!*drop && a->nstale)
        return stale_source(a, from, drop);
    return 0;
}

/* RelayLeg.latch_rtp / latch_rtcp */
static int latch(LegObject *a, const struct sockaddr_storage *from, int rtcp)
{
    PyObject *addr = addr_tuple(from);
    if (addr == NULL)
        return -1;
    Addr *peer = rtcp ? &a->rtcp_peer : &a->rtp_peer;
    if (peer->set)
        a->relatched++;
    int rc = addr_set(peer, addr);
    if (rc == 0 && !a->hold && (!rtcp || a->sdp_rtcp.set))
        rc = addr_set(rtcp ? &a->rtcp_dest : &a->rtp_dest, addr);
    Py_DECREF(addr);
    return rc;
}

/* --- SRTP ---------------------------------------------------------------------------- */

static int is_replay(srtp_err_status_t status)
{
    return status == srtp_err_status_replay_fail || status == srtp_err_status_replay_old ||
           status == srtp_err_status_pkt_idx_old;
}

static srtp_err_status_t unprotect(PyObject *context, uint8_t *data, int *len, int rtcp)
{
    if (*len > PY_SRTP_BUFFER)
        return srtp_err_status_bad_param;
    SrtpObject *c = (SrtpObject *)context;
    /* libsrtp checks the tag (and the replay window) before it decrypts: a packet that
     * fails is left as it came, for the previous key or the plain window to try */
    return rtcp ? srtp_unprotect_rtcp(c->in, data, len) : srtp_unprotect(c->in, data, len);
}

static srtp_err_status_t protect(PyObject *context, uint8_t *data, int *len, int rtcp)
{
    if (*len > PY_SRTP_BUFFER - (rtcp ? PY_SRTCP_TRAILER : PY_SRTP_TRAILER))
        return srtp_err_status_bad_param;
    SrtpObject *c = (SrtpObject *)context;
    return rtcp ? srtp_protect_rtcp(c->out, data, len) : srtp_protect(c->out, data, len);
}

/* RelayLeg.unauthenticated: -1 error, 0 drop, 1 relay (*authentic: under the old key) */
static int unauthenticated(LegObject *a, uint8_t *data, int *len, srtp_err_status_t error,
                           int rtcp, int *authentic)
{
    int replay = is_replay(error);
    double now;
    if (clock_now(a, &now) < 0)
        return -1;
    if (a->rx_alt != NULL) {
        if (now < a->alt_until) {
            PyObject *alt = a->rx_alt;
            Py_INCREF(alt);
            int n = *len;
            srtp_err_status_t status = unprotect(alt, data, &n, rtcp);
            Py_DECREF(alt);
            if (status == srtp_err_status_ok) {
                a->packets_decrypted++;
                *len = n;
                *authentic = 1;
                return 1;
            }
            if (is_replay(status))
                replay = 1;
        } else {
            Py_CLEAR(a->rx_alt); /* the previous key's time is over */
        }
    }
    if (replay) {
        a->srtp_replay++;
        return 0;
    }
    if (now < a->plain_until) {
        enum refusal refusal = rtcp ? refuse_plain_rtcp(data, (size_t)*len, a->grace_ssrc)
                                    : refuse_plain_rtp(data, (size_t)*len, a->grace_ssrc,
                                                       a->grace_seq);
        if (refusal != REFUSE_NONE) {
            long long *counter = refusal == REFUSE_NOT_RTP      ? &a->grace_not_rtp
                                 : refusal == REFUSE_WRONG_SSRC ? &a->grace_wrong_ssrc
                                                                : &a->grace_bad_sequence;
            return refused(a, REFUSALS[refusal], counter) < 0 ? -1 : 0;
        }
        if (!rtcp) /* the reference moves on (or is set, if there was none) */
            plain_reference(data, (size_t)*len, &a->grace_ssrc, &a->grace_seq);
        a->plain_accepted++;
        *authentic = 0;
        return 1;
    }
    a->srtp_auth++;
    if (rtcp ? plain_rtcp(data, (size_t)*len) : plain_rtp(data, (size_t)*len))
        a->plain_after_grace++;
    return 0;
}

/* RelayLeg.renumber, in place (len >= 12, number_on ran): an index libsrtp refused as
 * sent before continues at the last number + 1 */
static void renumber(LegObject *b, uint8_t *data)
{
    long long out = ((long long)data[2] << 8) | data[3];
    long long seq = (out - b->seq_offset) & 0xFFFF;
    long long fresh = (b->seq_last + 1) & 0xFFFF;
    b->seq_offset = (fresh - seq) & 0xFFFF;
    b->seq_last = fresh;
    data[2] = (uint8_t)(fresh >> 8);
    data[3] = (uint8_t)fresh;
}

/* RelayLeg.number_on, in place (len >= 12) */
static void number_on(LegObject *b, uint8_t *data)
{
    long long seq = ((long long)data[2] << 8) | data[3];
    long long source = ((long long)data[8] << 24) | (data[9] << 16) | (data[10] << 8) | data[11];
    long long last = b->seq_last;
    if (last < 0) {
        b->seq_source = source;
    } else {
        long long delta = ((seq + b->seq_offset - last + 0x8000) & 0xFFFF) - 0x8000;
        if (source != b->seq_source || delta < -REORDER_WINDOW || delta > MAX_SEQ_JUMP) {
            b->seq_offset = (last + 1 - seq) & 0xFFFF;
            b->seq_source = source;
        }
    }
    long long out = (seq + b->seq_offset) & 0xFFFF;
    long long ahead = (out - last) & 0xFFFF;
    if (last < 0 || (0 < ahead && ahead < 0x8000))
        b->seq_last = out;
    uint32_t ssrc = b->has_tx_ssrc ? b->tx_ssrc : (uint32_t)source;
    data[2] = (uint8_t)(out >> 8);
    data[3] = (uint8_t)out;
    data[8] = (uint8_t)(ssrc >> 24);
    data[9] = (uint8_t)(ssrc >> 16);
    data[10] = (uint8_t)(ssrc >> 8);
    data[11] = (uint8_t)ssrc;
}

static int send_via(SocketObject *via, const Addr *dest, const uint8_t *data, int len)
{
    if (via == NULL || via->fd < 0)
        return -1;
    for (;;) {
        ssize_t sent = sendto(via->fd, data, (size_t)len, 0, (const struct sockaddr *)&dest->sa,
                              dest->salen);
        if (sent >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* relay_rtcp: 0 done (*authentic: it came from a's peer for sure), -1 error */
static int relay_rtcp(SocketObject *s, LegObject *a, LegObject *b, uint8_t *data, int len,
                      int *authentic)
{
    int size = len;
    *authentic = a->rx == NULL;
    if (a->rtcp_rx != NULL) {
        PyObject *rx = a->rtcp_rx;
        Py_INCREF(rx);
        srtp_err_status_t status = unprotect(rx, data, &len, 1);
        Py_DECREF(rx);
        if (status != srtp_err_status_ok) {
            int r = unauthenticated(a, data, &len, status, 1, authentic);
            if (r <= 0) {
                *authentic = 0;
                return r;
            }
        } else {
            a->packets_decrypted++;
            *authentic = 1;
            if (a->rx_first && authenticated(s, a) < 0)
                return -1;
        }
    }
    if (!valid_compound(data, (size_t)len)) {
        *authentic = 0;
        return refused(a, "rtcp_invalid", &a->rtcp_invalid);
    }
    a->packets_in++;
    a->bytes_in += size;
    a->rtcp_packets_in++;
    const Addr *dest = b->mux ? &b->rtp_dest : &b->rtcp_dest;
    SocketObject *via = b->mux ? b->rtp_sock : b->rtcp_sock;
    if (!dest->set) {
        b->no_destination++;
        return 0;
    }
    if (b->rtcp_tx != NULL) {
        if (protect(b->rtcp_tx, data, &len, 1) != srtp_err_status_ok) {
            b->srtp_protect++;
            return 0;
        }
        b->packets_encrypted++;
    } else if (b->tx != NULL) { /* SRTP, with RTCP in the clear: SR/RR/SDES/BYE only */
        long long stripped;
        len = (int)clear_compound(data, (size_t)len, &stripped);
        b->rtcp_stripped += stripped;
        if (len == 0)
            return 0;
    }
    if (send_via(via, dest, data, len) < 0) {
        b->send_error++;
        return 0;
    }
    b->packets_out++;
    b->bytes_out += len;
    b->rtcp_packets_out++;
    return 0;
}

/* RtpSocket.datagram_received */
static int on_rtp(SocketObject *s, LegObject *a, uint8_t *data, int len,
                  const struct sockaddr_storage *from)
{
    int drop, authentic;
    int must_latch = !same_addr(from, &a->rtp_peer);
    if (must_latch) {
        if (not_the_peer(a, from, &a->rtp_peer, &a->sdp_rtp, &drop) < 0)
            return -1;
        if (drop)
            return wrong_source(a, from, "RTP");
    }
    if (a->mux && len > 1 && data[1] > 199 && data[1] < 205) { /* RTCP PT 200..204 */
        LegObject *b = s->b;
        Py_INCREF(b);
        int r = relay_rtcp(s, a, b, data, len, &authentic);
        Py_DECREF(b);
        if (r == 0 && authentic && must_latch)
            r = latch(a, from, 0);
        return r;
    }
    int size = len;
    if (a->rx != NULL) {
        PyObject *rx = a->rx;
        Py_INCREF(rx);
        srtp_err_status_t status = unprotect(rx, data, &len, 0);
        Py_DECREF(rx);
        if (status != srtp_err_status_ok) {
            int r = unauthenticated(a, data, &len, status, 0, &authentic);
            if (r <= 0)
                return r;
            must_latch = must_latch && authentic;
        } else {
            a->packets_decrypted++;
            if (a->rx_first && authenticated(s, a) < 0)
                return -1;
        }
    } else { /* the reference of a plain window (proxy.media.grace) */
        plain_reference(data, (size_t)len, &a->ref_ssrc, &a->ref_seq);
    }
    if (must_latch && latch(a, from, 0) < 0)
        return -1;
    a->packets_in++;
    a->bytes_in += size;
    LegObject *b = s->b;
    Py_INCREF(b);
    int rc = 0;
    if (!b->rtp_dest.set) {
        b->no_destination++;
        goto done;
    }
    if (b->tone != NULL) {
        ToneObject *tone = (ToneObject *)b->tone;
        Py_INCREF(tone);
        int mixed = tone_mix(tone, data, (size_t)len);
        if (mixed == 0)
            b->tone_skipped++;
        else if (mixed == 2)
            b->tone_packets++;
        if (mixed >= 0 && tone->done)
            Py_CLEAR(b->tone);
        Py_DECREF(tone);
        if (mixed < 0) {
            rc = -1;
            goto done;
        }
    }
    if (b->tx != NULL) {
        if (len >= 12)
            number_on(b, data);
        srtp_err_status_t status = protect(b->tx, data, &len, 0);
        if (is_replay(status) && len >= 12) { /* an index sent before: RelayLeg.renumber */
            renumber(b, data);
            status = protect(b->tx, data, &len, 0);
        }
        if (status != srtp_err_status_ok) {
            b->srtp_protect++;
            goto done;
        }
        b->packets_encrypted++;
    }
    if (send_via(b->rtp_sock, &b->rtp_dest, data, len) < 0) {
        b->send_error++;
        goto done;
    }
    b->packets_out++;
    b->bytes_out += len;
done:
    Py_DECREF(b);
    return rc;
}

/* RtcpSocket.datagram_received */
static int on_rtcp(SocketObject *s, LegObject *a, uint8_t *data, int len,
                   const struct sockaddr_storage *from)
{
    int drop, authentic;
    int must_latch = !same_addr(from, &a->rtcp_peer);
    if (must_latch) {
        if (not_the_peer(a, from, &a->rtcp_peer, &a->sdp_rtcp, &drop) < 0)
            return -1;
        if (drop)
            return wrong_source(a, from, "RTCP");
    }
    LegObject *b = s->b;
    Py_INCREF(b);
    int r = relay_rtcp(s, a, b, data, len, &authentic);
    Py_DECREF(b);
    if (r == 0 && authentic && must_latch)
        r = latch(a, from, 1);
    return r;
}

int relay_datagram(RelayObject *relay, SocketObject *s, uint8_t *data, int len,
                   const struct sockaddr_storage *from)
{
    (void)relay;
    LegObject *a = s->a;
    if (a == NULL || s->b == NULL)
        return 0;
    Py_INCREF(a);
    int r = s->rtcp ? on_rtcp(s, a, data, len, from) : on_rtp(s, a, data, len, from);
    Py_DECREF(a);
    return r;
}
