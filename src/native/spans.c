/* wgpy._native: Spans, the opened packets of one run on their way from open_batch to the
 * TUN without a Python object per packet: the plaintexts of one open_batch call stay in one
 * bytes object (`buf`, decrypted into in place), and a Spans holds a reference to it and
 * a packed table of (offset, length) pairs, one per packet. coalesce reads the packets
 * straight from there. Only open_batch makes Spans (no tp_new), so every span lies
 * inside its buffer; what Python may do is count, index (a copy) and read the table. */

#include "native.h"

/* A Spans of n packets over buf (a bytes object), its table still to be filled. */
Spans *spans_new(PyObject *buf, Py_ssize_t n)
{
    Spans *self = PyObject_NewVar(Spans, &SpansType, n);
    if (self != NULL) {
        Py_INCREF(buf);
        self->buf = buf;
    }
    return self;
}

static void Spans_dealloc(Spans *self)
{
    Py_DECREF(self->buf);
    PyObject_Free(self);
}

static Py_ssize_t Spans_len(Spans *self)
{
    return Py_SIZE(self);
}

/* spans[i]: the packet as bytes (a copy: for tests, the simulator and plain TUN writes). */
static PyObject *Spans_item(Spans *self, Py_ssize_t i)
{
    if (i < 0 || i >= Py_SIZE(self)) {
        PyErr_SetString(PyExc_IndexError, "Spans index out of range");
        return NULL;
    }
    const char *base = PyBytes_AS_STRING(self->buf);
    return PyBytes_FromStringAndSize(base + self->span[i].off, self->span[i].len);
}

/* The table as Python sees it: little-endian u32 (offset, length) pairs into buf. */
static PyObject *Spans_table(Spans *self, void *Py_UNUSED(closure))
{
    Py_ssize_t n = Py_SIZE(self);
    PyObject *b = PyBytes_FromStringAndSize(NULL, 8 * n);
    if (b == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
    for (Py_ssize_t i = 0; i < n; i++) {
        wr32le(o + 8 * i, self->span[i].off);
        wr32le(o + 8 * i + 4, self->span[i].len);
    }
    return b;
}

static PySequenceMethods Spans_as_sequence = {
    .sq_length = (lenfunc)Spans_len,
    .sq_item = (ssizeargfunc)Spans_item,
};

static PyMemberDef Spans_members[] = {
    {"buf", T_OBJECT, offsetof(Spans, buf), READONLY,
     "the bytes the packets lie in (every open_batch call's runs share one; zeros between)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Spans_getset[] = {
    {"table", (getter)Spans_table, NULL,
     "the packets' (offset, length) in buf, as little-endian u32 pairs", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject SpansType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.Spans",
    .tp_doc = "A run of opened packets: spans of one buffer (made by open_batch only).",
    .tp_basicsize = offsetof(Spans, span),
    .tp_itemsize = sizeof(Span),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Spans_dealloc,
    .tp_as_sequence = &Spans_as_sequence,
    .tp_members = Spans_members,
    .tp_getset = Spans_getset,
};
