/* The compiled receive loop of one engine: an epoll set over its media sockets, drained
 * from the asyncio loop (the engine adds the epoll fd as a reader and calls drain()).
 *
 * Why drained from the loop and not a thread of its own: the Python side (commands,
 * latching state it reads, the authenticated events, logging) then runs on the one thread
 * that also runs the packets, with no lock and no queue in between, exactly as the Python
 * path does (docs/decisions.md has the measurement). One wake-up costs the loop's epoll
 * return, one call into drain() and one epoll_wait here; each ready socket then costs one
 * recvfrom (level-triggered: a socket with more datagrams queued is ready again at the next
 * wake-up, so there is no read that returns EAGAIN) and one sendto. */
#include "fastrelay.h"

#include <errno.h>
#include <structmember.h>
#include <sys/epoll.h>
#include <unistd.h>

#define MAX_EVENTS 256

/* --- Socket ------------------------------------------------------------------------ */

static PyObject *Socket_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    SocketObject *self = (SocketObject *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = -1;
    return (PyObject *)self;
}

static int Socket_init(SocketObject *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"relay", "fd", "rtcp", "session", "a", "b", NULL};
    PyObject *relay, *session, *a, *b;
    int fd, rtcp;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!ipOO!O!:Socket", names, &Relay_Type, &relay,
                                     &fd, &rtcp, &session, &Leg_Type, &a, &Leg_Type, &b))
        return -1;
    if (self->registered) {
        PyErr_SetString(PyExc_RuntimeError, "a registered socket cannot be re-initialised");
        return -1;
    }
    Py_INCREF(relay);
    Py_XSETREF(self->relay, (RelayObject *)relay);
    Py_INCREF(session);
    Py_XSETREF(self->session, session);
    Py_INCREF(a);
    Py_XSETREF(self->a, (LegObject *)a);
    Py_INCREF(b);
    Py_XSETREF(self->b, (LegObject *)b);
    self->fd = fd;
    self->rtcp = rtcp;
    return 0;
}

static int Socket_traverse(SocketObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->relay);
    Py_VISIT(self->session);
    Py_VISIT(self->a);
    Py_VISIT(self->b);
    return 0;
}

static int Socket_clear(SocketObject *self)
{
    Py_CLEAR(self->relay);
    Py_CLEAR(self->session);
    Py_CLEAR(self->a);
    Py_CLEAR(self->b);
    return 0;
}

static void Socket_dealloc(SocketObject *self)
{
    PyObject_GC_UnTrack(self);
    Socket_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Socket_register(SocketObject *self, PyObject *unused)
{
    if (self->registered)
        Py_RETURN_NONE;
    if (self->relay == NULL || self->relay->epfd < 0 || self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "no relay or no socket to register");
        return NULL;
    }
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = self};
    if (epoll_ctl(self->relay->epfd, EPOLL_CTL_ADD, self->fd, &event) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_INCREF(self); /* the epoll set holds it */
    self->registered = 1;
    self->relay->registered++;
    Py_RETURN_NONE;
}

static PyObject *Socket_unregister(SocketObject *self, PyObject *unused)
{
    if (!self->registered)
        Py_RETURN_NONE;
    if (self->relay->epfd >= 0 && self->fd >= 0)
        (void)epoll_ctl(self->relay->epfd, EPOLL_CTL_DEL, self->fd, NULL); /* gone is fine */
    self->registered = 0;
    self->relay->registered--;
    Py_DECREF(self); /* the caller holds one */
    Py_RETURN_NONE;
}

static PyObject *Socket_forget_fd(SocketObject *self, PyObject *unused)
{
    if (self->registered) {
        PyErr_SetString(PyExc_RuntimeError, "unregister the socket first");
        return NULL;
    }
    self->fd = -1;
    Py_RETURN_NONE;
}

static PyObject *Socket_get_leg(SocketObject *self, void *closure)
{
    PyObject *leg = (PyObject *)(closure ? self->b : self->a);
    if (leg == NULL)
        Py_RETURN_NONE;
    Py_INCREF(leg);
    return leg;
}

static int Socket_set_leg(SocketObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyObject_TypeCheck(value, &Leg_Type)) {
        PyErr_SetString(PyExc_TypeError, "a socket's legs are _fastrelay.Leg objects");
        return -1;
    }
    Py_INCREF(value);
    if (closure)
        Py_XSETREF(self->b, (LegObject *)value);
    else
        Py_XSETREF(self->a, (LegObject *)value);
    return 0;
}

static PyGetSetDef Socket_getset[] = {
    {"a", (getter)Socket_get_leg, (setter)Socket_set_leg, "Its own side's leg.", NULL},
    {"b", (getter)Socket_get_leg, (setter)Socket_set_leg, "The other side's leg.", (void *)1},
    {NULL},
};

static PyMemberDef Socket_members[] = {
    {"session", T_OBJECT, offsetof(SocketObject, session), 0,
     "Whom it reports to: the session using its pair, or the pool keeping it."},
    {"fd", T_INT, offsetof(SocketObject, fd), READONLY, NULL},
    {"rtcp", T_BOOL, offsetof(SocketObject, rtcp), READONLY, NULL},
    {"registered", T_BOOL, offsetof(SocketObject, registered), READONLY, NULL},
    {NULL},
};

static PyMethodDef Socket_methods[] = {
    {"register", (PyCFunction)Socket_register, METH_NOARGS,
     "Relay what arrives on it (add it to the relay's epoll set)."},
    {"unregister", (PyCFunction)Socket_unregister, METH_NOARGS,
     "Stop receiving on it (sending through it still works)."},
    {"forget_fd", (PyCFunction)Socket_forget_fd, METH_NOARGS,
     "The descriptor is about to be closed: send nothing through it any more."},
    {NULL},
};

PyTypeObject Socket_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.media._fastrelay.Socket",
    .tp_basicsize = sizeof(SocketObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One bound RTP or RTCP socket of leg a (b: the other side of its stream).",
    .tp_new = Socket_new,
    .tp_init = (initproc)Socket_init,
    .tp_dealloc = (destructor)Socket_dealloc,
    .tp_traverse = (traverseproc)Socket_traverse,
    .tp_clear = (inquiry)Socket_clear,
    .tp_getset = Socket_getset,
    .tp_members = Socket_members,
    .tp_methods = Socket_methods,
};

/* --- Relay ------------------------------------------------------------------------- */

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, ":Relay"))
        return NULL;
    RelayObject *self = (RelayObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = -1;
    self->buf = PyMem_Malloc(RECV_ROOM);
    if (self->buf == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Relay_dealloc(RelayObject *self)
{
    Py_CLEAR(self->before);
    if (self->epfd >= 0)
        close(self->epfd);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Relay_fileno(RelayObject *self, PyObject *unused)
{
    return PyLong_FromLong(self->epfd);
}

/* One datagram from each socket that is ready now. A Python error raised by what a packet
 * calls (the session's authenticated(), a log hook) ends this drain; the sockets not done
 * yet are still ready at the next wake-up. */
static PyObject *Relay_drain(RelayObject *self, PyObject *unused)
{
    struct epoll_event events[MAX_EVENTS];
    SocketObject *ready[MAX_EVENTS];
    if (self->epfd < 0)
        Py_RETURN_NONE;
    int n = epoll_wait(self->epfd, events, MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->wakeups++;
    /* What a packet (or the hook below) calls may unregister (and free) sockets later in
     * this batch. */
    for (int i = 0; i < n; i++) {
        ready[i] = events[i].data.ptr;
        Py_INCREF(ready[i]);
    }
    int failed = 0;
    /* Every datagram read below arrived before the epoll_wait above (a socket is read
     * once, its oldest datagram first). The hook runs now, after it: a media worker reads
     * its channel there, so every command that arrived before a packet is applied before
     * that packet is relayed, the order the signalling process relies on (a SwitchSrtp
     * sent before the SIP message that lets the phone's next packet come). */
    if (n > 0 && self->before != NULL && self->before != Py_None) {
        PyObject *r = PyObject_CallNoArgs(self->before);
        if (r == NULL)
            failed = 1;
        else
            Py_DECREF(r);
    }
    for (int i = 0; i < n; i++) {
        SocketObject *s = ready[i];
        if (!failed && s->registered && s->fd >= 0) {
            struct sockaddr_storage from;
            socklen_t fromlen = sizeof from;
            ssize_t got = recvfrom(s->fd, self->buf, RECV_MAX, 0, (struct sockaddr *)&from,
                                   &fromlen);
            if (got >= 0 && (from.ss_family == AF_INET || from.ss_family == AF_INET6)) {
                self->packets++;
                if (relay_datagram(self, s, self->buf, (int)got, &from) < 0)
                    failed = 1;
            }
        }
        Py_DECREF(s);
    }
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Relay_close(RelayObject *self, PyObject *unused)
{
    if (self->registered) {
        PyErr_SetString(PyExc_RuntimeError, "sockets are still registered");
        return NULL;
    }
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyMemberDef Relay_members[] = {
    {"wakeups", T_LONGLONG, offsetof(RelayObject, wakeups), READONLY,
     "drain() calls that found the epoll set ready."},
    {"packets", T_LONGLONG, offsetof(RelayObject, packets), READONLY, "Datagrams received."},
    {"registered", T_LONGLONG, offsetof(RelayObject, registered), READONLY,
     "Sockets in the epoll set."},
    {"before", T_OBJECT, offsetof(RelayObject, before), 0,
     "Called by drain() after epoll_wait and before the first datagram is read (or None)."},
    {NULL},
};

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The epoll descriptor."},
    {"drain", (PyCFunction)Relay_drain, METH_NOARGS,
     "Relay one datagram from each socket that is ready now."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "Close the epoll set (none registered)."},
    {NULL},
};

PyTypeObject Relay_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.media._fastrelay.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The epoll set of one engine's media sockets and its receive buffer.",
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_members = Relay_members,
    .tp_methods = Relay_methods,
};
