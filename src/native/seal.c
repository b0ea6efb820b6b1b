/* wgpy._native: sending. A Sealer is a sending key and its counter; seal makes the
 * data messages of a batch, the crypto on the pool. */

#include "native.h"

typedef struct {
    PyObject_HEAD
    uint8_t key[KEY_LEN];
    int wiped;
    PyThread_type_lock lock; /* guards key, wiped and counter */
    uint32_t index;          /* the peer's receiver index, in every header */
    uint64_t counter;        /* the next nonce; REJECT_AFTER_MESSAGES: spent */
} Sealer;

static PyObject *Sealer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "receiver_index", "counter", NULL};
    Py_buffer key;
    unsigned long index;
    unsigned long long counter = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*k|K:Sealer", kwlist, &key, &index, &counter))
        return NULL;
    if (index > 0xFFFFFFFFUL || counter > REJECT_AFTER_MESSAGES) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "receiver_index is a u32, counter <= 2**64 - 2**13 - 1");
        return NULL;
    }
    if (check_key(&key) < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    Sealer *self = (Sealer *)type->tp_alloc(type, 0);
    if (self != NULL && (self->lock = PyThread_allocate_lock()) == NULL)
        Py_CLEAR(self);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    memcpy(self->key, key.buf, KEY_LEN);
    PyBuffer_Release(&key);
    self->index = (uint32_t)index;
    self->counter = counter;
    return (PyObject *)self;
}

static PyObject *Sealer_wipe(Sealer *self, PyObject *Py_UNUSED(ignored))
{
    lock_gil_held(self->lock);
    OPENSSL_cleanse(self->key, KEY_LEN);
    self->wiped = 1;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *Sealer_expire(Sealer *self, PyObject *Py_UNUSED(ignored))
{
    lock_gil_held(self->lock);
    self->counter = REJECT_AFTER_MESSAGES;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *Sealer_get_counter(Sealer *self, void *Py_UNUSED(closure))
{
    lock_gil_held(self->lock);
    uint64_t counter = self->counter;
    PyThread_release_lock(self->lock);
    return PyLong_FromUnsignedLongLong(counter);
}

static void Sealer_dealloc(Sealer *self)
{
    OPENSSL_cleanse(self->key, KEY_LEN);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* core/backend.py: padded_length(length, mtu) - length */
static size_t padding(size_t length, size_t mtu)
{
    size_t pad = (16 - (length & 15)) & 15;
    if (length + pad > mtu) {
        size_t last = length > mtu && mtu ? length % mtu : length;
        size_t padded = (last + 15) & ~(size_t)15;
        if (mtu && padded > mtu)
            padded = mtu;
        pad = padded - last;
    }
    return pad;
}

static int aead_seal(EVP_CIPHER_CTX *ctx, const uint8_t *key, uint64_t counter, const uint8_t *in,
                     int len, int pad, uint8_t *out)
{
    static const uint8_t zeros[16];
    uint8_t nonce[12] = {0};
    int n = 0;
    wr64le(nonce + 4, counter);
    if (ctx == NULL || EVP_EncryptInit_ex(ctx, NULL, NULL, key, nonce) != 1
        || (len > 0 && EVP_EncryptUpdate(ctx, out, &n, in, len) != 1)
        || (pad > 0 && EVP_EncryptUpdate(ctx, out + len, &n, zeros, pad) != 1)
        || EVP_EncryptFinal_ex(ctx, out + len + pad, &n) != 1
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + len + pad) != 1) {
        ERR_clear_error();
        return 0;
    }
    return 1;
}


/* One datagram to seal: where its plaintext is (a packet, or segment `seg` of a
 * super-packet, cut straight into the datagram and encrypted in place) and where it goes. */
typedef struct {
    const uint8_t *src; /* the packet (NULL for a segment) */
    const Cut *cut;     /* the segment's super-packet, or NULL */
    uint8_t *dst;       /* the datagram: header, ciphertext, tag */
    uint32_t len, pad;  /* plaintext bytes, zero bytes of padding after them */
    uint32_t seg;
} Datagram;

typedef struct {
    uint8_t key[KEY_LEN]; /* a copy, taken under the sealer's lock */
    uint32_t index;
    uint64_t counter;     /* the first of the batch's counters */
    const Datagram *d;
    Py_ssize_t n;
    long nchunks;
    atomic_int failed;
} SealJob;

static void seal_chunk(void *arg, long chunk)
{
    SealJob *j = arg;
    EVP_CIPHER_CTX *ctx = thread_ctx(1);
    Py_ssize_t lo = j->n * chunk / j->nchunks, hi = j->n * (chunk + 1) / j->nchunks;
    uint8_t *scratch = NULL; /* segments are cut here, then encrypted into their datagram */
    for (Py_ssize_t i = lo; i < hi; i++) {
        const Datagram *d = &j->d[i];
        uint8_t *dst = d->dst;
        uint64_t counter = j->counter + (uint64_t)i;
        wr32le(dst, 4);
        wr32le(dst + 4, j->index);
        wr64le(dst + 8, counter);
        const uint8_t *src = d->src;
        if (d->cut != NULL) {
            if (scratch == NULL && (scratch = malloc(CUT_MAX)) == NULL) {
                atomic_store(&j->failed, 1);
                break;
            }
            cut_write(d->cut, d->seg, scratch);
            src = scratch;
        }
        if (!aead_seal(ctx, j->key, counter, src, (int)d->len, (int)d->pad, dst + HEADER_LEN))
            atomic_store(&j->failed, 1);
    }
    free(scratch);
}

/* Without the GIL: reserve the counters under the lock, so that two threads sealing for
 * one session never share a nonce, then encrypt into the datagrams, in chunks on the
 * crypto threads. 1: sealed; 0: the session is spent (nothing sealed); -1: wiped, or
 * OpenSSL failed. */
static int seal_batch(Sealer *self, const Datagram *d, Py_ssize_t n)
{
    SealJob j = {.index = self->index, .d = d, .n = n};
    int ok = 1;
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    if (self->wiped)
        ok = -1;
    else if ((uint64_t)n > REJECT_AFTER_MESSAGES - self->counter)
        ok = 0;
    if (ok == 1) {
        j.counter = self->counter;
        self->counter += (uint64_t)n;
        memcpy(j.key, self->key, KEY_LEN);
    }
    PyThread_release_lock(self->lock);
    if (ok == 1 && n > 0) {
        j.nchunks = chunks_for(n);
        pool_run(seal_chunk, &j, j.nchunks);
        ok = atomic_load(&j.failed) ? -1 : 1;
    }
    OPENSSL_cleanse(j.key, KEY_LEN);
    return ok;
}

/* seal_batch with the GIL released; the exception for -1. */
static int seal_released(Sealer *self, const Datagram *d, Py_ssize_t n)
{
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = seal_batch(self, d, n);
    Py_END_ALLOW_THREADS
    if (ok < 0)
        PyErr_SetString(PyExc_ValueError, "the key is wiped (or OpenSSL failed)");
    return ok;
}

/* The data message a plaintext of `len` bytes makes (header, padded ciphertext, tag). */
size_t sealed_length(size_t len, size_t mtu)
{
    return HEADER_LEN + len + padding(len, mtu) + TAG_LEN;
}

/* One packet sealed into out (sealed_length bytes), with the GIL or without: seal_batch's
 * 1, 0 (spent: nothing sealed, no counter taken) or -1 (wiped, or OpenSSL failed). The
 * caller checked that `sealer` is a Sealer and the packet at most 16 MiB. */
int seal_one(PyObject *sealer, const uint8_t *packet, size_t len, size_t mtu, uint8_t *out)
{
    Datagram d = {.src = packet, .dst = out, .len = (uint32_t)len,
                  .pad = (uint32_t)padding(len, mtu)};
    return seal_batch((Sealer *)sealer, &d, 1);
}

/* A datagram for a plaintext of `len` bytes; 0 with an exception if too long. */
static size_t datagram_size(Datagram *d, size_t len, size_t mtu)
{
    if (len > 0xFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "a packet is at most 16 MiB");
        return 0;
    }
    d->len = (uint32_t)len;
    d->pad = (uint32_t)padding(len, mtu);
    return HEADER_LEN + len + d->pad + TAG_LEN;
}

static PyObject *Sealer_seal(Sealer *self, PyObject *args)
{
    PyObject *packets;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "On:seal", &packets, &mtu))
        return NULL;
    if (mtu < 0) {
        PyErr_SetString(PyExc_ValueError, "mtu >= 0");
        return NULL;
    }
    PyObject *items_tuple = PySequence_Tuple(packets); /* see get_buffers */
    if (items_tuple == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items_tuple);
    PyObject *result = NULL;
    Py_buffer *views = get_buffers(items_tuple, n);
    Datagram *d = views ? PyMem_Calloc(n ? (size_t)n : 1, sizeof(Datagram)) : NULL;
    if (d == NULL)
        goto done;
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        size_t size = datagram_size(&d[i], (size_t)views[i].len, (size_t)mtu);
        PyObject *b = size ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size) : NULL;
        if (b == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, b);
        d[i].src = views[i].buf, d[i].dst = (uint8_t *)PyBytes_AS_STRING(b);
    }
    int ok = result ? seal_released(self, d, n) : -1;
    if (ok < 0)
        Py_CLEAR(result);
    else if (ok == 0)
        Py_SETREF(result, PyList_New(0));
done:
    if (views && d == NULL)
        PyErr_NoMemory();
    PyMem_Free(d);
    if (views)
        release_buffers(views, n);
    Py_DECREF(items_tuple);
    return result;
}

/* ---------------------------------------------------------------- seal_runs */

/* What seal_runs holds while it works: the items' buffers, the plans of the super-packets
 * among them, and a Datagram for each datagram to be. */
typedef struct {
    PyObject *items; /* a tuple */
    Py_ssize_t n, ndgrams;
    Py_buffer *views;
    Cut *cuts;
    int *is_cut;
    Datagram *d;
} Batch;

static void batch_free(Batch *b)
{
    for (Py_ssize_t i = 0; b->views && i < b->n; i++)
        if (b->views[i].obj != NULL)
            PyBuffer_Release(&b->views[i]);
    PyMem_Free(b->views), PyMem_Free(b->cuts), PyMem_Free(b->is_cut), PyMem_Free(b->d);
    Py_XDECREF(b->items);
}

/* The items' buffers and plans, and the number of datagrams they make. -1: an exception. */
static int batch_plan(Batch *b)
{
    size_t m = b->n ? (size_t)b->n : 1;
    b->views = PyMem_Calloc(m, sizeof(Py_buffer));
    b->cuts = PyMem_Calloc(m, sizeof(Cut));
    b->is_cut = PyMem_Calloc(m, sizeof(int));
    if (!b->views || !b->cuts || !b->is_cut) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < b->n; i++) {
        PyObject *item = PyTuple_GET_ITEM(b->items, i);
        if (!PyTuple_Check(item)) {
            if (PyObject_GetBuffer(item, &b->views[i], PyBUF_SIMPLE) < 0)
                return -1;
            b->ndgrams++;
            continue;
        }
        Py_ssize_t mss;
        size_t l4;
        int udp;
        if (super_packet_args(item, &b->views[i], &mss, &l4, &udp) < 0)
            return -1;
        b->is_cut[i] = 1;
        if (cut_plan(&b->cuts[i], b->views[i].buf, (size_t)b->views[i].len, udp, mss, l4))
            b->ndgrams += (Py_ssize_t)b->cuts[i].count;
        else
            b->is_cut[i] = 0, b->cuts[i].count = 0; /* refused: makes nothing */
    }
    return 0;
}

/* A Datagram (source and size) for each datagram, in order; their `dst` come later. */
static int batch_datagrams(Batch *b, size_t mtu)
{
    b->d = PyMem_Calloc(b->ndgrams ? (size_t)b->ndgrams : 1, sizeof(Datagram));
    if (b->d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < b->n; i++) {
        if (!PyTuple_Check(PyTuple_GET_ITEM(b->items, i))) {
            b->d[k].src = b->views[i].buf;
            if (!datagram_size(&b->d[k++], (size_t)b->views[i].len, mtu))
                return -1;
            continue;
        }
        for (size_t s = 0; b->is_cut[i] && s < b->cuts[i].count; s++, k++) {
            b->d[k].cut = &b->cuts[i], b->d[k].seg = (uint32_t)s;
            datagram_size(&b->d[k], cut_length(&b->cuts[i], s), mtu);
        }
    }
    return 0;
}

static size_t sealed_size(const Datagram *d) { return HEADER_LEN + d->len + d->pad + TAG_LEN; }

/* The runs one GSO send carries (core/backend.py gso_runs): consecutive datagrams of one
 * size, a shorter last one joining; a bytes object for each, and each datagram's dst. */
static PyObject *batch_runs(Batch *b)
{
    PyObject *runs = PyList_New(0);
    for (Py_ssize_t i = 0, j; runs && i < b->ndgrams; i = j) {
        size_t size = sealed_size(&b->d[i]), total = size;
        for (j = i + 1; j < b->ndgrams && sealed_size(&b->d[j]) == size; j++)
            total += size;
        if (j < b->ndgrams && sealed_size(&b->d[j]) < size)
            total += sealed_size(&b->d[j++]);
        PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        PyObject *run = buf ? Py_BuildValue("(Nn)", buf, (Py_ssize_t)size) : NULL;
        if (run == NULL || PyList_Append(runs, run) < 0)
            Py_CLEAR(runs);
        Py_XDECREF(run);
        uint8_t *at = buf ? (uint8_t *)PyBytes_AS_STRING(buf) : NULL;
        for (Py_ssize_t k = i; runs && k < j; k++)
            b->d[k].dst = at, at += sealed_size(&b->d[k]);
    }
    return runs;
}

static PyObject *Sealer_seal_runs(Sealer *self, PyObject *args)
{
    PyObject *items, *runs = NULL;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "On:seal_runs", &items, &mtu))
        return NULL;
    if (mtu < 0) {
        PyErr_SetString(PyExc_ValueError, "mtu >= 0");
        return NULL;
    }
    Batch b = {.items = PySequence_Tuple(items)}; /* a tuple: see get_buffers */
    if (b.items == NULL)
        return NULL;
    b.n = PyTuple_GET_SIZE(b.items);
    if (batch_plan(&b) < 0 || batch_datagrams(&b, (size_t)mtu) < 0 || !(runs = batch_runs(&b)))
        goto done;
    int ok = seal_released(self, b.d, b.ndgrams);
    if (ok < 0)
        Py_CLEAR(runs);
    else if (ok == 0)
        Py_SETREF(runs, Py_NewRef(Py_None));
done:
    batch_free(&b);
    return runs;
}

static PyMethodDef Sealer_methods[] = {
    {"seal", (PyCFunction)Sealer_seal, METH_VARARGS,
     "seal(packets, mtu) -> list[bytes]: a data message for each packet, padded as\n"
     "data.padded_length says, with the next counters, reserved under the sealer's lock.\n"
     "[] if the counters would pass REJECT_AFTER_MESSAGES (the session is spent)."},
    {"seal_runs", (PyCFunction)Sealer_seal_runs, METH_VARARGS,
     "seal_runs(items, mtu) -> list[(bytes, size)] | None: wgpy.core.backend.Sealer.seal_runs\n"
     "(the reference): packets and super-packets (cut here, on the crypto threads) sealed\n"
     "into GSO runs; None if the session is spent (nothing sealed)."},
    {"expire", (PyCFunction)Sealer_expire, METH_NOARGS, "Spend the session: seal seals no more."},
    {"wipe", (PyCFunction)Sealer_wipe, METH_NOARGS, "Forget the key; seal raises after."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Sealer_getset[] = {
    {"counter", (getter)Sealer_get_counter, NULL, "the next counter (messages sealed so far)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.Sealer",
    .tp_doc = "Sealer(key, receiver_index, counter=0): a sending key and its counter.",
    .tp_basicsize = sizeof(Sealer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Sealer_new,
    .tp_dealloc = (destructor)Sealer_dealloc,
    .tp_methods = Sealer_methods,
    .tp_getset = Sealer_getset,
};
