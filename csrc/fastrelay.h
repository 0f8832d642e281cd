/* Types shared by the files of the compiled relay (proxy.media._fastrelay). */
#ifndef SIPURA_FASTRELAY_H
#define SIPURA_FASTRELAY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <netinet/in.h>
#include <srtp2/srtp.h>
#include <stdint.h>
#include <sys/socket.h>

/* pylibsrtp's buffer: the Python path refuses larger packets, so this path does too */
#define PY_SRTP_BUFFER 1500
#define PY_SRTP_TRAILER 144       /* SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN as pylibsrtp has it */
#define PY_SRTCP_TRAILER 148      /* + the SRTCP index */
#define RECV_MAX 65536            /* larger than any UDP payload */
#define RECV_ROOM (RECV_MAX + 256) /* room for what protect appends */
#define MAX_STALE 8

typedef struct {
    PyObject_HEAD
    srtp_t out; /* ssrc_any_outbound: protect */
    srtp_t in;  /* ssrc_any_inbound: unprotect */
    PyObject *keys;
} SrtpObject;

typedef struct {
    PyObject_HEAD
    PyObject *tone;
    PyObject *tables;     /* callable(payload_type) -> (encoded tone, mix table) */
    PyObject *encoded[2]; /* per law (0: PCMU, 1: PCMA), once asked for */
    PyObject *mix[2];
    int64_t *bursts; /* start, end pairs in samples */
    Py_ssize_t nbursts;
    int64_t end, pos, ts;
    Py_ssize_t next;
    int has_ts, done;
} ToneObject;

typedef struct {
    int set;
    int family;
    uint8_t ip[16];
    uint16_t port;
    uint32_t flow, scope;
    struct sockaddr_storage sa;
    socklen_t salen;
    PyObject *obj; /* the Python tuple; NULL when not set */
} Addr;

typedef struct {
    int family;
    uint8_t ip[16];
    uint16_t port;
} IpPort;

struct SocketObject;

typedef struct LegObject {
    PyObject_HEAD
    PyObject *side, *ip, *family, *clock;
    PyObject *sockets; /* tuple: () or (rtp socket, rtcp socket) */
    struct SocketObject *rtp_sock, *rtcp_sock; /* borrowed from sockets */
    PyObject *tx, *rx, *rtcp_tx, *rtcp_rx, *rx_alt; /* SrtpObject or NULL */
    PyObject *tone;                                  /* ToneObject or NULL */
    PyObject *expected_obj;                          /* str or NULL */
    int expected_family;
    uint8_t expected_ip[16];
    Addr rtp_peer, rtcp_peer, rtp_dest, rtcp_dest, sdp_rtp, sdp_rtcp;
    PyObject *stale_obj; /* tuple of (ip, port) */
    int nstale;
    IpPort stale[MAX_STALE];
    int index, port, alive;
    char hold, mux, latch_any, rtp, rx_first;
    int has_tx_ssrc;
    uint32_t tx_ssrc;
    long long seq_source; /* -1: none yet */
    long long seq_offset, seq_last, grace_ssrc, grace_seq, ref_ssrc, ref_seq;
    double alt_until, plain_until, stale_until;
    long long packets_in, bytes_in, packets_out, bytes_out, rtcp_packets_in,
        rtcp_packets_out, packets_encrypted, packets_decrypted, plain_accepted,
        plain_after_grace, tone_packets, tone_skipped, relatched, wrong_source,
        no_destination, srtp_auth, srtp_replay, srtp_protect, send_error, grace_not_rtp,
        grace_wrong_ssrc, grace_bad_sequence, rtcp_invalid, rtcp_stripped;
} LegObject;

typedef struct RelayObject {
    PyObject_HEAD
    int epfd;
    uint8_t *buf;
    long long wakeups, packets, registered;
    PyObject *before; /* called after epoll_wait, before the packets: see Relay_drain */
} RelayObject;

typedef struct SocketObject {
    PyObject_HEAD
    RelayObject *relay;
    PyObject *session;
    LegObject *a, *b;
    int fd;
    int rtcp;
    int registered;
} SocketObject;

extern PyTypeObject Srtp_Type, Tone_Type, Leg_Type, Socket_Type, Relay_Type;

/* packets.c */
int relay_datagram(RelayObject *r, SocketObject *s, uint8_t *data, int len,
                   const struct sockaddr_storage *from);
/* tone.c: -1 error (Python exception set), 0 cannot carry the tone, 1 silent part (data
 * untouched), 2 mixed in place */
int tone_mix(ToneObject *t, uint8_t *data, size_t size);
/* types.c */
int addr_set(Addr *a, PyObject *value);
void addr_clear(Addr *a);
PyObject *addr_tuple(const struct sockaddr_storage *sa);
PyObject *leg_counter_names(void);

#endif
