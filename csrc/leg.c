/* One side of one relayed stream, in C: the fields of proxy.media.relay_leg.RelayLeg that
 * the packet path reads and bumps, under the same attribute names, so the command
 * handlers of proxy.media.relay_session set them the same way on either path. Addresses
 * are kept both as the Python tuple (what Python reads back) and parsed (what a packet is
 * compared with and sent to). */
#include "fastrelay.h"

#include <arpa/inet.h>
#include <string.h>
#include <structmember.h>

/* --- addresses --------------------------------------------------------------------- */

static int parse_ip(PyObject *host, int *family, uint8_t ip[16])
{
    if (!PyUnicode_Check(host)) {
        PyErr_SetString(PyExc_TypeError, "an IP address is a str");
        return -1;
    }
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL)
        return -1;
    memset(ip, 0, 16);
    if (inet_pton(AF_INET, text, ip) == 1) {
        *family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, text, ip) == 1) {
        *family = AF_INET6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %R", host);
    return -1;
}

void addr_clear(Addr *a)
{
    Py_CLEAR(a->obj);
    a->set = 0;
}

int addr_set(Addr *a, PyObject *value)
{
    if (value == NULL || value == Py_None) {
        addr_clear(a);
        return 0;
    }
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) < 2) {
        PyErr_SetString(PyExc_TypeError, "an address is a tuple (host, port, ...)");
        return -1;
    }
    Addr parsed;
    memset(&parsed, 0, sizeof parsed);
    if (parse_ip(PyTuple_GET_ITEM(value, 0), &parsed.family, parsed.ip) < 0)
        return -1;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(value, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return -1;
    }
    parsed.port = (uint16_t)port;
    Py_ssize_t n = PyTuple_GET_SIZE(value);
    if (n > 2) {
        unsigned long flow = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(value, 2));
        if (flow == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        parsed.flow = (uint32_t)flow;
    }
    if (n > 3) {
        unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(value, 3));
        if (scope == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        parsed.scope = (uint32_t)scope;
    }
    if (parsed.family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&parsed.sa;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(parsed.port);
        memcpy(&sin->sin_addr, parsed.ip, 4);
        parsed.salen = sizeof *sin;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&parsed.sa;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(parsed.port);
        sin6->sin6_flowinfo = htonl(parsed.flow);
        sin6->sin6_scope_id = parsed.scope;
        memcpy(&sin6->sin6_addr, parsed.ip, 16);
        parsed.salen = sizeof *sin6;
    }
    parsed.set = 1;
    Py_INCREF(value);
    parsed.obj = value;
    Py_XDECREF(a->obj);
    *a = parsed;
    return 0;
}

PyObject *addr_tuple(const struct sockaddr_storage *sa)
{
    char text[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        if (inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", text, ntohs(sin->sin_port));
    }
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
    if (inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(siII)", text, ntohs(sin6->sin6_port),
                         (unsigned)ntohl(sin6->sin6_flowinfo), (unsigned)sin6->sin6_scope_id);
}

/* --- the type ---------------------------------------------------------------------- */

static PyObject *Leg_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    LegObject *self = (LegObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->sockets = PyTuple_New(0);
    self->stale_obj = PyTuple_New(0);
    if (self->sockets == NULL || self->stale_obj == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->rtp = 1;
    self->seq_source = -1;
    self->seq_last = -1;
    self->grace_ssrc = self->grace_seq = -1;
    self->ref_ssrc = self->ref_seq = -1;
    self->alt_until = self->plain_until = self->stale_until = -Py_HUGE_VAL;
    return (PyObject *)self;
}

static int Leg_init(LegObject *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"side", "index", "ip", "family", "clock", NULL};
    PyObject *side, *ip, *family, *clock;
    int index;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiUOO:Leg", names, &side, &index, &ip,
                                     &family, &clock))
        return -1;
    Py_INCREF(side);
    Py_XSETREF(self->side, side);
    Py_INCREF(ip);
    Py_XSETREF(self->ip, ip);
    Py_INCREF(family);
    Py_XSETREF(self->family, family);
    Py_INCREF(clock);
    Py_XSETREF(self->clock, clock);
    self->index = index;
    return 0;
}

static int Leg_traverse(LegObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->side);
    Py_VISIT(self->ip);
    Py_VISIT(self->family);
    Py_VISIT(self->clock);
    Py_VISIT(self->sockets);
    Py_VISIT(self->tx);
    Py_VISIT(self->rx);
    Py_VISIT(self->rtcp_tx);
    Py_VISIT(self->rtcp_rx);
    Py_VISIT(self->rx_alt);
    Py_VISIT(self->tone);
    Py_VISIT(self->expected_obj);
    Py_VISIT(self->stale_obj);
    Py_VISIT(self->rtp_peer.obj);
    Py_VISIT(self->rtcp_peer.obj);
    Py_VISIT(self->rtp_dest.obj);
    Py_VISIT(self->rtcp_dest.obj);
    Py_VISIT(self->sdp_rtp.obj);
    Py_VISIT(self->sdp_rtcp.obj);
    return 0;
}

static int Leg_clear(LegObject *self)
{
    Py_CLEAR(self->side);
    Py_CLEAR(self->ip);
    Py_CLEAR(self->family);
    Py_CLEAR(self->clock);
    self->rtp_sock = self->rtcp_sock = NULL;
    Py_CLEAR(self->sockets);
    Py_CLEAR(self->tx);
    Py_CLEAR(self->rx);
    Py_CLEAR(self->rtcp_tx);
    Py_CLEAR(self->rtcp_rx);
    Py_CLEAR(self->rx_alt);
    Py_CLEAR(self->tone);
    Py_CLEAR(self->expected_obj);
    Py_CLEAR(self->stale_obj);
    self->nstale = 0;
    addr_clear(&self->rtp_peer);
    addr_clear(&self->rtcp_peer);
    addr_clear(&self->rtp_dest);
    addr_clear(&self->rtcp_dest);
    addr_clear(&self->sdp_rtp);
    addr_clear(&self->sdp_rtcp);
    return 0;
}

static void Leg_dealloc(LegObject *self)
{
    PyObject_GC_UnTrack(self);
    Leg_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self); /* (subtype_dealloc drops a subclass) */
}

/* --- typed attributes -------------------------------------------------------------- */

static PyObject *get_obj(PyObject *value)
{
    if (value == NULL)
        Py_RETURN_NONE;
    Py_INCREF(value);
    return value;
}

static int set_typed(PyObject **slot, PyObject *value, PyTypeObject *type, const char *what)
{
    if (value == NULL || value == Py_None) {
        Py_CLEAR(*slot);
        return 0;
    }
    if (!PyObject_TypeCheck(value, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be %s or None", what, type->tp_name);
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
    return 0;
}

#define SRTP_ATTR(name)                                                                    \
    static PyObject *get_##name(LegObject *self, void *c) { return get_obj(self->name); } \
    static int set_##name(LegObject *self, PyObject *v, void *c)                          \
    {                                                                                      \
        return set_typed(&self->name, v, &Srtp_Type, #name);                               \
    }
SRTP_ATTR(tx)
SRTP_ATTR(rx)
SRTP_ATTR(rtcp_tx)
SRTP_ATTR(rtcp_rx)
SRTP_ATTR(rx_alt)

static PyObject *get_tone(LegObject *self, void *c) { return get_obj(self->tone); }
static int set_tone(LegObject *self, PyObject *v, void *c)
{
    return set_typed(&self->tone, v, &Tone_Type, "tone");
}

#define ADDR_ATTR(name)                                                                    \
    static PyObject *get_##name(LegObject *self, void *c) { return get_obj(self->name.obj); } \
    static int set_##name(LegObject *self, PyObject *v, void *c)                          \
    {                                                                                      \
        return addr_set(&self->name, v);                                                   \
    }
ADDR_ATTR(rtp_peer)
ADDR_ATTR(rtcp_peer)
ADDR_ATTR(rtp_dest)
ADDR_ATTR(rtcp_dest)
ADDR_ATTR(sdp_rtp)
ADDR_ATTR(sdp_rtcp)

static PyObject *get_expected_ip(LegObject *self, void *c) { return get_obj(self->expected_obj); }

static int set_expected_ip(LegObject *self, PyObject *v, void *c)
{
    if (v == NULL || v == Py_None) {
        Py_CLEAR(self->expected_obj);
        return 0;
    }
    int family;
    uint8_t ip[16];
    if (parse_ip(v, &family, ip) < 0)
        return -1;
    self->expected_family = family;
    memcpy(self->expected_ip, ip, 16);
    Py_INCREF(v);
    Py_XSETREF(self->expected_obj, v);
    return 0;
}

static PyObject *get_sockets(LegObject *self, void *c) { return get_obj(self->sockets); }

static int set_sockets(LegObject *self, PyObject *v, void *c)
{
    if (v == NULL || !PyTuple_Check(v) ||
        (PyTuple_GET_SIZE(v) != 0 && PyTuple_GET_SIZE(v) != 2)) {
        PyErr_SetString(PyExc_TypeError, "sockets is () or (rtp socket, rtcp socket)");
        return -1;
    }
    SocketObject *rtp = NULL, *rtcp = NULL;
    if (PyTuple_GET_SIZE(v) == 2) {
        PyObject *first = PyTuple_GET_ITEM(v, 0), *second = PyTuple_GET_ITEM(v, 1);
        if (!PyObject_TypeCheck(first, &Socket_Type) || !PyObject_TypeCheck(second, &Socket_Type)) {
            PyErr_SetString(PyExc_TypeError, "sockets are _fastrelay.Socket objects");
            return -1;
        }
        rtp = (SocketObject *)first;
        rtcp = (SocketObject *)second;
    }
    Py_INCREF(v);
    Py_XSETREF(self->sockets, v);
    self->rtp_sock = rtp;
    self->rtcp_sock = rtcp;
    return 0;
}

static PyObject *get_stale(LegObject *self, void *c) { return get_obj(self->stale_obj); }

static int set_stale(LegObject *self, PyObject *v, void *c)
{
    if (v == NULL || !PyTuple_Check(v) || PyTuple_GET_SIZE(v) > MAX_STALE) {
        PyErr_Format(PyExc_TypeError, "stale is a tuple of at most %d (ip, port)", MAX_STALE);
        return -1;
    }
    IpPort parsed[MAX_STALE];
    Py_ssize_t n = PyTuple_GET_SIZE(v);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(v, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "a stale source is (ip, port)");
            return -1;
        }
        if (parse_ip(PyTuple_GET_ITEM(item, 0), &parsed[i].family, parsed[i].ip) < 0)
            return -1;
        long port = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        if (port < 0 || port > 65535) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "port out of range");
            return -1;
        }
        parsed[i].port = (uint16_t)port;
    }
    memcpy(self->stale, parsed, sizeof(IpPort) * (size_t)n);
    self->nstale = (int)n;
    Py_INCREF(v);
    Py_XSETREF(self->stale_obj, v);
    return 0;
}

static PyObject *get_tx_ssrc(LegObject *self, void *c)
{
    if (!self->has_tx_ssrc)
        Py_RETURN_NONE;
    uint8_t b[4] = {(uint8_t)(self->tx_ssrc >> 24), (uint8_t)(self->tx_ssrc >> 16),
                    (uint8_t)(self->tx_ssrc >> 8), (uint8_t)self->tx_ssrc};
    return PyBytes_FromStringAndSize((const char *)b, 4);
}

static int set_tx_ssrc(LegObject *self, PyObject *v, void *c)
{
    if (v == NULL || v == Py_None) {
        self->has_tx_ssrc = 0;
        return 0;
    }
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != 4) {
        PyErr_SetString(PyExc_TypeError, "tx_ssrc is 4 bytes or None");
        return -1;
    }
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(v);
    self->tx_ssrc = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
    self->has_tx_ssrc = 1;
    return 0;
}

static PyObject *get_seq_source(LegObject *self, void *c)
{
    if (self->seq_source < 0)
        return PyBytes_FromStringAndSize("", 0);
    uint32_t s = (uint32_t)self->seq_source;
    uint8_t b[4] = {(uint8_t)(s >> 24), (uint8_t)(s >> 16), (uint8_t)(s >> 8), (uint8_t)s};
    return PyBytes_FromStringAndSize((const char *)b, 4);
}

static PyObject *get_plain_ref(LegObject *self, void *c)
{
    return Py_BuildValue("(LL)", self->ref_ssrc, self->ref_seq);
}

/* The order of proxy.media.counters.COUNTERS (fast_path.py checks that they agree). */
#define COUNTER(name) {#name, offsetof(LegObject, name)}
static const struct {
    const char *name;
    size_t offset;
} COUNTER_FIELDS[] = {
    COUNTER(packets_in), COUNTER(bytes_in), COUNTER(packets_out), COUNTER(bytes_out),
    COUNTER(rtcp_packets_in), COUNTER(rtcp_packets_out), COUNTER(packets_encrypted),
    COUNTER(packets_decrypted), COUNTER(plain_accepted), COUNTER(plain_after_grace),
    COUNTER(tone_packets), COUNTER(tone_skipped), COUNTER(relatched), COUNTER(grace_ssrc),
    COUNTER(grace_seq), COUNTER(wrong_source), COUNTER(no_destination), COUNTER(srtp_auth),
    COUNTER(srtp_replay), COUNTER(srtp_protect), COUNTER(send_error), COUNTER(grace_not_rtp),
    COUNTER(grace_wrong_ssrc), COUNTER(grace_bad_sequence), COUNTER(rtcp_invalid),
    COUNTER(rtcp_stripped),
};
#define NCOUNTERS (sizeof COUNTER_FIELDS / sizeof *COUNTER_FIELDS)

/* What a worker reports every 100 ms for every leg: one call instead of 26 lookups. */
static PyObject *Leg_counters(LegObject *self, PyObject *unused)
{
    PyObject *out = PyTuple_New(NCOUNTERS);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < NCOUNTERS; i++) {
        long long value = *(long long *)((char *)self + COUNTER_FIELDS[i].offset);
        PyObject *item = PyLong_FromLongLong(value);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    return out;
}

/* The same as native int64s, as a worker's counter report carries them (array("q")). */
static PyObject *Leg_packed_counters(LegObject *self, PyObject *unused)
{
    long long values[NCOUNTERS];
    for (size_t i = 0; i < NCOUNTERS; i++)
        values[i] = *(long long *)((char *)self + COUNTER_FIELDS[i].offset);
    return PyBytes_FromStringAndSize((const char *)values, sizeof values);
}

PyObject *leg_counter_names(void)
{
    PyObject *out = PyTuple_New(NCOUNTERS);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < NCOUNTERS; i++) {
        PyObject *name = PyUnicode_FromString(COUNTER_FIELDS[i].name);
        if (name == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, (Py_ssize_t)i, name);
    }
    return out;
}

static PyMethodDef Leg_methods[] = {
    {"counters", (PyCFunction)Leg_counters, METH_NOARGS,
     "The counters in the order of the module's COUNTERS."},
    {"packed_counters", (PyCFunction)Leg_packed_counters, METH_NOARGS,
     "The counters packed as native 64-bit ints."},
    {NULL},
};

static PyGetSetDef Leg_getset[] = {
    {"tx", (getter)get_tx, (setter)set_tx, "Protects RTP sent toward this side.", NULL},
    {"rx", (getter)get_rx, (setter)set_rx, NULL, NULL},
    {"rtcp_tx", (getter)get_rtcp_tx, (setter)set_rtcp_tx, NULL, NULL},
    {"rtcp_rx", (getter)get_rtcp_rx, (setter)set_rtcp_rx, NULL, NULL},
    {"rx_alt", (getter)get_rx_alt, (setter)set_rx_alt, NULL, NULL},
    {"tone", (getter)get_tone, (setter)set_tone, NULL, NULL},
    {"rtp_peer", (getter)get_rtp_peer, (setter)set_rtp_peer, NULL, NULL},
    {"rtcp_peer", (getter)get_rtcp_peer, (setter)set_rtcp_peer, NULL, NULL},
    {"rtp_dest", (getter)get_rtp_dest, (setter)set_rtp_dest, NULL, NULL},
    {"rtcp_dest", (getter)get_rtcp_dest, (setter)set_rtcp_dest, NULL, NULL},
    {"sdp_rtp", (getter)get_sdp_rtp, (setter)set_sdp_rtp, NULL, NULL},
    {"sdp_rtcp", (getter)get_sdp_rtcp, (setter)set_sdp_rtcp, NULL, NULL},
    {"expected_ip", (getter)get_expected_ip, (setter)set_expected_ip, NULL, NULL},
    {"sockets", (getter)get_sockets, (setter)set_sockets, NULL, NULL},
    {"stale", (getter)get_stale, (setter)set_stale, NULL, NULL},
    {"tx_ssrc", (getter)get_tx_ssrc, (setter)set_tx_ssrc, NULL, NULL},
    {"seq_source", (getter)get_seq_source, NULL, NULL, NULL},
    {"plain_ref", (getter)get_plain_ref, NULL,
     "(SSRC, sequence number) of the last plain RTP packet from this side while it had no "
     "receive key; (-1, -1): none, or not shaped like RTP.",
     NULL},
    {NULL},
};

#define LL(name) {#name, T_LONGLONG, offsetof(LegObject, name), 0, NULL}
#define FLAG(name) {#name, T_BOOL, offsetof(LegObject, name), 0, NULL}
#define DBL(name) {#name, T_DOUBLE, offsetof(LegObject, name), 0, NULL}
#define INT(name) {#name, T_INT, offsetof(LegObject, name), 0, NULL}
#define OBJ(name) {#name, T_OBJECT, offsetof(LegObject, name), 0, NULL}

static PyMemberDef Leg_members[] = {
    OBJ(side), OBJ(ip), OBJ(family), OBJ(clock), INT(index), INT(port), INT(alive),
    FLAG(hold), FLAG(mux), FLAG(latch_any), FLAG(rtp), FLAG(rx_first),
    LL(seq_offset), LL(seq_last), LL(grace_ssrc), LL(grace_seq),
    DBL(alt_until), DBL(plain_until), DBL(stale_until),
    LL(packets_in), LL(bytes_in), LL(packets_out), LL(bytes_out), LL(rtcp_packets_in),
    LL(rtcp_packets_out), LL(packets_encrypted), LL(packets_decrypted), LL(plain_accepted),
    LL(plain_after_grace), LL(tone_packets), LL(tone_skipped), LL(relatched),
    LL(wrong_source), LL(no_destination), LL(srtp_auth), LL(srtp_replay), LL(srtp_protect),
    LL(send_error), LL(grace_not_rtp), LL(grace_wrong_ssrc), LL(grace_bad_sequence),
    LL(rtcp_invalid), LL(rtcp_stripped),
    {NULL},
};

PyTypeObject Leg_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.media._fastrelay.Leg",
    .tp_basicsize = sizeof(LegObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One side of one stream: what the compiled packet path reads and counts.",
    .tp_new = Leg_new,
    .tp_init = (initproc)Leg_init,
    .tp_dealloc = (destructor)Leg_dealloc,
    .tp_traverse = (traverseproc)Leg_traverse,
    .tp_clear = (inquiry)Leg_clear,
    .tp_getset = Leg_getset,
    .tp_members = Leg_members,
    .tp_methods = Leg_methods,
};
