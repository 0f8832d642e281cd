/* One SRTP key for one side: an outbound and an inbound libsrtp session, as
 * proxy.media.srtp.SrtpContext makes them over pylibsrtp (same policies: the RFC 4568
 * profile for RTP and RTCP, libsrtp's default replay window, no repeated sends). */
#include "fastrelay.h"

#include <string.h>

static PyObject *Srtp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"keys", NULL};
    PyObject *keys;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Srtp", names, &keys))
        return NULL;
    PyObject *key = PyObject_GetAttrString(keys, "master_key");
    PyObject *salt = PyObject_GetAttrString(keys, "master_salt");
    PyObject *profile = PyObject_GetAttrString(keys, "profile");
    SrtpObject *self = NULL;
    if (key == NULL || salt == NULL || profile == NULL)
        goto done;
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != 16 || !PyBytes_Check(salt) ||
        PyBytes_GET_SIZE(salt) < 14 || !PyUnicode_Check(profile)) {
        PyErr_SetString(PyExc_ValueError, "an SRTP key is 16 bytes and its salt 14 or 16");
        goto done;
    }
    srtp_profile_t which;
    if (PyUnicode_CompareWithASCIIString(profile, "AES_CM_128_HMAC_SHA1_80") == 0)
        which = srtp_profile_aes128_cm_sha1_80;
    else if (PyUnicode_CompareWithASCIIString(profile, "AES_CM_128_HMAC_SHA1_32") == 0)
        which = srtp_profile_aes128_cm_sha1_32;
    else {
        PyErr_SetString(PyExc_ValueError, "unknown SRTP profile");
        goto done;
    }
    uint8_t material[30];
    memcpy(material, PyBytes_AS_STRING(key), 16);
    memcpy(material + 16, PyBytes_AS_STRING(salt), 14);
    srtp_policy_t policy;
    memset(&policy, 0, sizeof policy);
    if (srtp_crypto_policy_set_from_profile_for_rtp(&policy.rtp, which) ||
        srtp_crypto_policy_set_from_profile_for_rtcp(&policy.rtcp, which)) {
        PyErr_SetString(PyExc_ValueError, "libsrtp refuses the profile");
        goto done;
    }
    policy.key = material;
    self = (SrtpObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto done;
    policy.ssrc.type = ssrc_any_outbound;
    srtp_err_status_t out = srtp_create(&self->out, &policy);
    policy.ssrc.type = ssrc_any_inbound;
    srtp_err_status_t in = out ? out : srtp_create(&self->in, &policy);
    explicit_bzero(material, sizeof material);
    if (out || in) {
        PyErr_Format(PyExc_ValueError, "libsrtp cannot make a session (status %d)",
                     (int)(out ? out : in));
        Py_CLEAR(self);
        goto done;
    }
    Py_INCREF(keys);
    self->keys = keys;
done:
    Py_XDECREF(key);
    Py_XDECREF(salt);
    Py_XDECREF(profile);
    return (PyObject *)self;
}

static void Srtp_dealloc(SrtpObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->out != NULL)
        srtp_dealloc(self->out);
    if (self->in != NULL)
        srtp_dealloc(self->in);
    Py_CLEAR(self->keys);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Srtp_traverse(SrtpObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keys);
    return 0;
}

static int Srtp_clear(SrtpObject *self)
{
    Py_CLEAR(self->keys);
    return 0;
}

/* The four operations for tests and the fuzz test: bytes in, bytes out, or ValueError
 * with libsrtp's status (and pylibsrtp's size limits, as the relay applies them). */
static PyObject *process(SrtpObject *self, PyObject *arg, int protect, int rtcp)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a packet is bytes");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(arg);
    Py_ssize_t limit = PY_SRTP_BUFFER - (protect ? (rtcp ? PY_SRTCP_TRAILER : PY_SRTP_TRAILER) : 0);
    if (size > limit) {
        PyErr_SetObject(PyExc_ValueError, PyLong_FromLong(-1));
        return NULL;
    }
    uint8_t buffer[PY_SRTP_BUFFER + 64];
    memcpy(buffer, PyBytes_AS_STRING(arg), (size_t)size);
    int len = (int)size;
    srtp_err_status_t status;
    if (protect)
        status = rtcp ? srtp_protect_rtcp(self->out, buffer, &len)
                      : srtp_protect(self->out, buffer, &len);
    else
        status = rtcp ? srtp_unprotect_rtcp(self->in, buffer, &len)
                      : srtp_unprotect(self->in, buffer, &len);
    if (status != srtp_err_status_ok) {
        PyObject *code = PyLong_FromLong((long)status);
        if (code != NULL) {
            PyErr_SetObject(PyExc_ValueError, code);
            Py_DECREF(code);
        }
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)buffer, len);
}

static PyObject *Srtp_protect(SrtpObject *s, PyObject *a) { return process(s, a, 1, 0); }
static PyObject *Srtp_unprotect(SrtpObject *s, PyObject *a) { return process(s, a, 0, 0); }
static PyObject *Srtp_protect_rtcp(SrtpObject *s, PyObject *a) { return process(s, a, 1, 1); }
static PyObject *Srtp_unprotect_rtcp(SrtpObject *s, PyObject *a) { return process(s, a, 0, 1); }

static PyObject *Srtp_repr(SrtpObject *self)
{
    return PyUnicode_FromString("Srtp(...)"); /* never key material */
}

static PyObject *Srtp_get_keys(SrtpObject *self, void *closure)
{
    Py_INCREF(self->keys);
    return self->keys;
}

static PyGetSetDef Srtp_getset[] = {
    {"keys", (getter)Srtp_get_keys, NULL, "What it was made from (equal keys: this context).",
     NULL},
    {NULL},
};

static PyMethodDef Srtp_methods[] = {
    {"protect", (PyCFunction)Srtp_protect, METH_O, NULL},
    {"unprotect", (PyCFunction)Srtp_unprotect, METH_O, NULL},
    {"protect_rtcp", (PyCFunction)Srtp_protect_rtcp, METH_O, NULL},
    {"unprotect_rtcp", (PyCFunction)Srtp_unprotect_rtcp, METH_O, NULL},
    {NULL},
};

PyTypeObject Srtp_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.media._fastrelay.Srtp",
    .tp_basicsize = sizeof(SrtpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Both directions of one SRTP key (libsrtp sessions).",
    .tp_new = Srtp_new,
    .tp_dealloc = (destructor)Srtp_dealloc,
    .tp_traverse = (traverseproc)Srtp_traverse,
    .tp_clear = (inquiry)Srtp_clear,
    .tp_repr = (reprfunc)Srtp_repr,
    .tp_getset = Srtp_getset,
    .tp_methods = Srtp_methods,
};
