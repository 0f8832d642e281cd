/* A tone mixed into one RTP stream, packet by packet: proxy.media.tones.ToneMixer in C.
 * Python renders the tone in G.711 and builds the 64K mix tables (tables(pt), asked once
 * per law the first time a packet of that law needs the tone); this file only walks the
 * stream and mixes in place. Same positions, bursts and counts as ToneMixer.mix. */
#include "fastrelay.h"

#include <structmember.h>

#define SAMPLE_RATE 8000

static int law_of(unsigned pt) { return pt == 0 ? 0 : pt == 8 ? 1 : -1; }

static void advance(ToneObject *t, int64_t samples)
{
    int64_t pos = t->pos;
    Py_ssize_t index = t->next;
    while (index < t->nbursts && t->bursts[2 * index + 1] <= pos)
        index++;
    t->next = index;
    t->pos = pos + samples;
    t->done = t->pos >= t->end;
}

static int load_law(ToneObject *t, int law, unsigned pt)
{
    if (t->encoded[law] != NULL)
        return 0;
    PyObject *pair = PyObject_CallFunction(t->tables, "I", pt);
    if (pair == NULL)
        return -1;
    PyObject *encoded, *mix;
    if (!PyArg_ParseTuple(pair, "SS", &encoded, &mix) || PyBytes_GET_SIZE(mix) != 65536) {
        Py_DECREF(pair);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a mix table has 65536 entries");
        return -1;
    }
    Py_INCREF(encoded);
    Py_INCREF(mix);
    t->encoded[law] = encoded;
    t->mix[law] = mix;
    Py_DECREF(pair);
    return 0;
}

int tone_mix(ToneObject *t, uint8_t *packet, size_t size)
{
    if (size < 12 || packet[0] >> 6 != 2)
        return 0;
    unsigned first = packet[0], pt = packet[1] & 0x7F;
    int64_t ts = ((int64_t)packet[4] << 24) | (packet[5] << 16) | (packet[6] << 8) | packet[7];
    int had = t->has_ts;
    int64_t last = t->ts;
    t->ts = ts;
    t->has_ts = 1;
    int law = law_of(pt);
    if (law < 0) {
        if (had) {
            int64_t step = (ts - last) & 0xFFFFFFFF;
            if (step <= SAMPLE_RATE) /* not a jump, not a reordered packet */
                advance(t, step);
        }
        return 0;
    }
    size_t start = 12 + 4 * (size_t)(first & 0x0F);
    if (first & 0x10) {
        if (size < start + 4)
            return 0;
        start += 4 + 4 * (size_t)(((unsigned)packet[start + 2] << 8) | packet[start + 3]);
    }
    /* Python: end = size - packet[-1] if padded; "end < start" also catches end < 0 */
    int64_t end = (first & 0x20) ? (int64_t)size - packet[size - 1] : (int64_t)size;
    if (end < (int64_t)start)
        return 0;
    int64_t count = end - (int64_t)start;
    int64_t pos = t->pos;
    advance(t, count);
    Py_ssize_t index = t->next;
    if (index >= t->nbursts || t->bursts[2 * index] >= pos + count)
        return 1; /* silence here: untouched */
    if (load_law(t, law, pt) < 0)
        return -1;
    const uint8_t *tone = (const uint8_t *)PyBytes_AS_STRING(t->encoded[law]);
    int64_t tone_len = PyBytes_GET_SIZE(t->encoded[law]);
    const uint8_t *table = (const uint8_t *)PyBytes_AS_STRING(t->mix[law]);
    uint8_t silence = law == 0 ? 0xFF : 0xD5;
    uint8_t *audio = packet + start;
    for (int64_t i = 0; i < count; i++) {
        int64_t at = pos + i;
        unsigned code = at < tone_len ? tone[at] : silence;
        audio[i] = table[(code << 8) | audio[i]];
    }
    return 2;
}

static PyObject *Tone_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"tone", "bursts", "tables", NULL};
    PyObject *tone, *bursts, *tables;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O:ToneMix", names, &tone, &PyTuple_Type,
                                     &bursts, &tables))
        return NULL;
    if (!PyCallable_Check(tables)) {
        PyErr_SetString(PyExc_TypeError, "tables must be callable");
        return NULL;
    }
    ToneObject *t = (ToneObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bursts);
    t->bursts = PyMem_Calloc(n > 0 ? (size_t)n * 2 : 2, sizeof(int64_t));
    if (t->bursts == NULL) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long start, end;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(bursts, i), "LL", &start, &end)) {
            Py_DECREF(t);
            return NULL;
        }
        t->bursts[2 * i] = start;
        t->bursts[2 * i + 1] = end;
    }
    t->nbursts = n;
    t->end = n ? t->bursts[2 * n - 1] : 0;
    t->done = t->end == 0;
    Py_INCREF(tone);
    t->tone = tone;
    Py_INCREF(tables);
    t->tables = tables;
    return (PyObject *)t;
}

static int Tone_traverse(ToneObject *t, visitproc visit, void *arg)
{
    Py_VISIT(t->tone);
    Py_VISIT(t->tables);
    return 0;
}

static int Tone_clear(ToneObject *t)
{
    Py_CLEAR(t->tone);
    Py_CLEAR(t->tables);
    for (int i = 0; i < 2; i++) {
        Py_CLEAR(t->encoded[i]);
        Py_CLEAR(t->mix[i]);
    }
    return 0;
}

static void Tone_dealloc(ToneObject *t)
{
    PyObject_GC_UnTrack(t);
    Tone_clear(t);
    PyMem_Free(t->bursts);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *Tone_mix(ToneObject *t, PyObject *arg)
{
    /* ToneMixer.mix for tests: the mixed packet, the same object, or None */
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a packet is bytes");
        return NULL;
    }
    PyObject *copy = PyBytes_FromStringAndSize(PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
    if (copy == NULL)
        return NULL;
    int r = tone_mix(t, (uint8_t *)PyBytes_AS_STRING(copy), (size_t)PyBytes_GET_SIZE(copy));
    if (r == 2)
        return copy;
    Py_DECREF(copy);
    if (r < 0)
        return NULL;
    if (r == 1) {
        Py_INCREF(arg);
        return arg;
    }
    Py_RETURN_NONE;
}

static PyMemberDef Tone_members[] = {
    {"tone", T_OBJECT, offsetof(ToneObject, tone), READONLY, NULL},
    {"done", T_BOOL, offsetof(ToneObject, done), READONLY, NULL},
    {NULL},
};

static PyMethodDef Tone_methods[] = {
    {"mix", (PyCFunction)Tone_mix, METH_O, "The packet with the tone mixed in (tests)."},
    {NULL},
};

PyTypeObject Tone_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.media._fastrelay.ToneMix",
    .tp_basicsize = sizeof(ToneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A tone being mixed into one RTP stream (ToneMixer in C).",
    .tp_new = Tone_new,
    .tp_dealloc = (destructor)Tone_dealloc,
    .tp_traverse = (traverseproc)Tone_traverse,
    .tp_clear = (inquiry)Tone_clear,
    .tp_members = Tone_members,
    .tp_methods = Tone_methods,
};
