/* proxy.media._fastrelay: the compiled per-packet path of the media relay.
 *
 * Python keeps every decision (allocation, commands, keys, switch-over, grace windows,
 * tones, reports); this module owns what happens to a packet: receive, latch check,
 * SRTP/SRTCP through the system libsrtp2 (with crypto that keeps its OpenSSL state, see
 * fastcrypto.c), renumbering, tone mixing, send, counters. proxy/media/fast_path.py is its
 * Python side; docs/decisions.md says why it exists and what it measured. */
#include "fastrelay.h"

#include "fastcrypto.h"
#include "rules.h"

static const char *crypto_name = "libsrtp";

static int bytes_arg(PyObject *arg, const uint8_t **data, size_t *size)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a packet is bytes");
        return -1;
    }
    *data = (const uint8_t *)PyBytes_AS_STRING(arg);
    *size = (size_t)PyBytes_GET_SIZE(arg);
    return 0;
}

static PyObject *refusal_name(enum refusal r)
{
    static const char *const names[] = {NULL, "grace_not_rtp", "grace_wrong_ssrc",
                                        "grace_bad_sequence"};
    if (r == REFUSE_NONE)
        Py_RETURN_NONE;
    return PyUnicode_FromString(names[r]);
}

#define BOOL_RULE(name)                                                                    \
    static PyObject *py_##name(PyObject *m, PyObject *arg)                                 \
    {                                                                                      \
        const uint8_t *data;                                                               \
        size_t size;                                                                       \
        if (bytes_arg(arg, &data, &size) < 0)                                              \
            return NULL;                                                                   \
        return PyBool_FromLong(name(data, size));                                          \
    }
BOOL_RULE(rtp_shaped)
BOOL_RULE(valid_compound)
BOOL_RULE(plain_rtp)
BOOL_RULE(plain_rtcp)

static PyObject *py_plain_reference(PyObject *m, PyObject *arg)
{
    const uint8_t *data;
    size_t size;
    long long ssrc, seq;
    if (bytes_arg(arg, &data, &size) < 0)
        return NULL;
    plain_reference(data, size, &ssrc, &seq);
    return Py_BuildValue("(LL)", (long long)ssrc, (long long)seq);
}

static PyObject *py_refuse_plain_rtp(PyObject *m, PyObject *args)
{
    PyObject *packet;
    long long ssrc, seq;
    const uint8_t *data;
    size_t size;
    if (!PyArg_ParseTuple(args, "SLL", &packet, &ssrc, &seq) ||
        bytes_arg(packet, &data, &size) < 0)
        return NULL;
    return refusal_name(refuse_plain_rtp(data, size, ssrc, seq));
}

static PyObject *py_refuse_plain_rtcp(PyObject *m, PyObject *args)
{
    PyObject *packet;
    long long ssrc;
    const uint8_t *data;
    size_t size;
    if (!PyArg_ParseTuple(args, "SL", &packet, &ssrc) || bytes_arg(packet, &data, &size) < 0)
        return NULL;
    return refusal_name(refuse_plain_rtcp(data, size, ssrc));
}

static PyObject *py_clear_compound(PyObject *m, PyObject *arg)
{
    const uint8_t *data;
    size_t size;
    if (bytes_arg(arg, &data, &size) < 0)
        return NULL;
    PyObject *copy = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (copy == NULL)
        return NULL;
    long long stripped;
    size_t left = clear_compound((uint8_t *)PyBytes_AS_STRING(copy), size, &stripped);
    PyObject *out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(copy), (Py_ssize_t)left);
    Py_DECREF(copy);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(NL)", out, (long long)stripped);
}

static PyObject *py_crypto(PyObject *m, PyObject *unused)
{
    return PyUnicode_FromString(crypto_name);
}

static PyObject *py_libsrtp_version(PyObject *m, PyObject *unused)
{
    return PyUnicode_FromString(srtp_get_version_string());
}

static PyMethodDef module_methods[] = {
    {"rtp_shaped", py_rtp_shaped, METH_O, "grace.rtp_shaped in C."},
    {"plain_reference", py_plain_reference, METH_O, "grace.plain_reference in C."},
    {"refuse_plain_rtp", py_refuse_plain_rtp, METH_VARARGS, "grace.refuse_plain_rtp in C."},
    {"refuse_plain_rtcp", py_refuse_plain_rtcp, METH_VARARGS, "grace.refuse_plain_rtcp in C."},
    {"valid_compound", py_valid_compound, METH_O, "rtcp.valid_compound in C."},
    {"clear_compound", py_clear_compound, METH_O, "rtcp.clear_compound in C."},
    {"plain_rtp", py_plain_rtp, METH_O, "relay_leg.plain_rtp in C."},
    {"plain_rtcp", py_plain_rtcp, METH_O, "relay_leg.plain_rtcp in C."},
    {"crypto", py_crypto, METH_NOARGS,
     "Who does libsrtp's AES-CM and HMAC-SHA1: 'openssl-kept' (fastcrypto.c) or 'libsrtp'."},
    {"libsrtp_version", py_libsrtp_version, METH_NOARGS, "The linked libsrtp's version."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.media._fastrelay",
    "The compiled per-packet path of the media relay (see proxy/media/fast_path.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__fastrelay(void)
{
    if (srtp_init() != srtp_err_status_ok) {
        PyErr_SetString(PyExc_ImportError, "libsrtp2 does not initialise");
        return NULL;
    }
    if (fastcrypto_install() == 0)
        crypto_name = "openssl-kept";
    PyTypeObject *types[] = {&Srtp_Type, &Tone_Type, &Leg_Type, &Socket_Type, &Relay_Type};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    const char *names[] = {"Srtp", "ToneMix", "Leg", "Socket", "Relay"};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddObject(m, "COUNTERS", leg_counter_names()) < 0 ||
        PyModule_AddIntConstant(m, "SEQ_AHEAD", SEQ_AHEAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
