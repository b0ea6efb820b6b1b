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


typedef struct {
    uint8_t key[KEY_LEN]; /* a copy, taken under the sealer's lock */
    uint32_t index;
    uint64_t counter;     /* the first of the batch's counters */
    const Py_buffer *views;
    PyObject *const *out;
    Py_ssize_t n;
    size_t mtu;
    long nchunks;
    atomic_int failed;
} SealJob;

static void seal_chunk(void *arg, long chunk)
{
    SealJob *j = arg;
    EVP_CIPHER_CTX *ctx = thread_ctx(1);
    Py_ssize_t lo = j->n * chunk / j->nchunks, hi = j->n * (chunk + 1) / j->nchunks;
    for (Py_ssize_t i = lo; i < hi; i++) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(j->out[i]);
        size_t len = (size_t)j->views[i].len;
        uint64_t counter = j->counter + (uint64_t)i;
        wr32le(dst, 4);
        wr32le(dst + 4, j->index);
        wr64le(dst + 8, counter);
        if (!aead_seal(ctx, j->key, counter, j->views[i].buf, (int)len, (int)padding(len, j->mtu),
                       dst + HEADER_LEN))
            atomic_store(&j->failed, 1);
    }
}

/* Phase 2 of seal, without the GIL: reserve the counters under the lock, so that two
 * threads sealing for one session never share a nonce, then encrypt into the datagrams,
 * in chunks on the crypto threads. 1: sealed; 0: the session is spent (nothing sealed);
 * -1: wiped, or OpenSSL failed. */
static int seal_batch(Sealer *self, const Py_buffer *views, PyObject *const *out, Py_ssize_t n,
                      size_t mtu)
{
    SealJob j = {.index = self->index, .views = views, .out = out, .n = n, .mtu = mtu};
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
    if (views == NULL)
        goto done;
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        size_t len = (size_t)views[i].len;
        PyObject *d = len > 0xFFFFFF ? NULL
                      : PyBytes_FromStringAndSize(
                          NULL, (Py_ssize_t)(HEADER_LEN + len + padding(len, (size_t)mtu) + TAG_LEN));
        if (d == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a packet is at most 16 MiB");
            Py_CLEAR(result);
        } else {
            PyList_SET_ITEM(result, i, d);
        }
    }
    if (result == NULL)
        goto done;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = seal_batch(self, views, PySequence_Fast_ITEMS(result), n, (size_t)mtu);
    Py_END_ALLOW_THREADS
    if (ok < 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "the key is wiped (or OpenSSL failed)");
    } else if (ok == 0) {
        Py_SETREF(result, PyList_New(0));
    }
done:
    if (views)
        release_buffers(views, n);
    Py_DECREF(items_tuple);
    return result;
}

static PyMethodDef Sealer_methods[] = {
    {"seal", (PyCFunction)Sealer_seal, METH_VARARGS,
     "seal(packets, mtu) -> list[bytes]: a data message for each packet, padded as\n"
     "data.padded_length says, with the next counters, reserved under the sealer's lock.\n"
     "[] if the counters would pass REJECT_AFTER_MESSAGES (the session is spent)."},
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
