/* wgpy._native: the per-packet loops of wgpy's datapath in C, over OpenSSL's libcrypto.
 *
 * Optional: wgpy works without it. It is one of the data path's two backends behind one
 * contract (wgpy/core/backend.py); the pure-Python one there is the reference, and the
 * tests in tests/native prove that this file computes byte for byte the same thing.
 *
 *   Session(key, expires)              a receiving session: key + replay window
 *   Sealer(key, index, counter=0)      a sending key and its counter: seal(packets, mtu)
 *   open_batch(buf, nbytes, seg, sessions, now)   one UDP GRO read opened (its docstring)
 *   coalesce, checksum, split          as wgpy.io.offload
 *
 * Every read of packet data is bounds-checked against the length it came with. The
 * crypto loops allocate nothing per packet (one scratch block per call; the bytes handed
 * back are made with the GIL). The GIL is released while decrypting and encrypting; each
 * Session and Sealer has a lock so that two threads (or a wipe) never use one EVP context
 * at once, and a Sealer reserves its counters under that lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <structmember.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KEY_LEN 32
#define TAG_LEN 16
#define HEADER_LEN 16
#define DATA_MIN (HEADER_LEN + TAG_LEN)
#define REJECT_AFTER_MESSAGES (UINT64_MAX - 8192) /* 2**64 - 2**13 - 1 */
#define WORDS 128
#define WINDOW (WORDS * 64 - 64)
#define VNET_LEN 10

static inline uint32_t rd32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t rd64le(const uint8_t *p)
{
    return (uint64_t)rd32le(p) | (uint64_t)rd32le(p + 4) << 32;
}
static inline void wr32le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}
static inline void wr64le(uint8_t *p, uint64_t v)
{
    wr32le(p, (uint32_t)v);
    wr32le(p + 4, (uint32_t)(v >> 32));
}
static inline void wr16le(uint8_t *p, unsigned v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline unsigned rd16be(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static inline void wr16be(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static inline uint32_t rd32be(const uint8_t *p) { return (uint32_t)rd16be(p) << 16 | rd16be(p + 2); }
static inline void wr32be(uint8_t *p, uint32_t v)
{
    wr16be(p, v >> 16);
    wr16be(p + 2, v & 0xFFFF);
}

/* Take a per-object lock while holding the GIL: wait, if we must, without it. */
static void lock_gil_held(PyThread_type_lock lock)
{
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static int check_key(const Py_buffer *key)
{
    if (key->len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "a key is 32 bytes");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ crypto threads
 *
 * Sessions and sealers hold their key, not an OpenSSL context: every thread that seals or
 * opens has a context per direction of its own (made on first use, freed when the thread
 * ends), given the key with each packet's nonce (ChaCha20's key setup is a copy). So a
 * batch can be cut into chunks that several threads encrypt or decrypt at once.
 *
 * The pool: `set_threads(n)` starts n workers. `pool_run` posts a job (chunks 0..n-1 of
 * one call), works on it itself and returns when all its chunks are done; idle workers
 * join in. One job at a time: a caller that finds the pool busy does its chunks alone.
 * The workers never touch Python objects and never take the GIL; every call that uses
 * them has released it. A worker that never wakes (after fork, say) costs speed only:
 * the caller runs whatever chunks are left. */

static pthread_key_t ctx_key;

typedef struct {
    EVP_CIPHER_CTX *enc, *dec;
} ThreadCtx;

static void free_thread_ctx(void *p)
{
    ThreadCtx *t = p;
    EVP_CIPHER_CTX_free(t->enc);
    EVP_CIPHER_CTX_free(t->dec);
    free(t);
}

/* This thread's context for encrypting (1) or decrypting (0); NULL if OpenSSL failed. */
static EVP_CIPHER_CTX *thread_ctx(int encrypt)
{
    ThreadCtx *t = pthread_getspecific(ctx_key);
    if (t == NULL) {
        t = calloc(1, sizeof *t);
        if (t == NULL)
            return NULL;
        t->enc = EVP_CIPHER_CTX_new();
        t->dec = EVP_CIPHER_CTX_new();
        if (t->enc == NULL || t->dec == NULL
            || EVP_CipherInit_ex(t->enc, EVP_chacha20_poly1305(), NULL, NULL, NULL, 1) != 1
            || EVP_CipherInit_ex(t->dec, EVP_chacha20_poly1305(), NULL, NULL, NULL, 0) != 1
            || pthread_setspecific(ctx_key, t) != 0) {
            ERR_clear_error();
            free_thread_ctx(t);
            return NULL;
        }
    }
    return encrypt ? t->enc : t->dec;
}

typedef void (*ChunkFn)(void *arg, long chunk);

typedef struct {
    ChunkFn fn;
    void *arg;
    long nchunks;
    atomic_long next; /* the next chunk to take */
    int active;       /* workers in the job (under pool.mu) */
} Job;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work, idle;
    Job *job;      /* the job open to workers, or NULL */
    uint64_t gen;  /* counts jobs posted, so a worker joins each at most once */
    int nworkers;  /* started and not told to stop */
    int stopping;
    pthread_t *tids;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, 0, 0, 0, NULL};

static void run_chunks(Job *job)
{
    long c;
    while ((c = atomic_fetch_add(&job->next, 1)) < job->nchunks)
        job->fn(job->arg, c);
}

static void *worker_main(void *unused)
{
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's */
    pthread_setname_np(pthread_self(), "wgpy-crypto"); /* as top and /proc name it */
    pthread_mutex_lock(&pool.mu);
    uint64_t seen = pool.gen;
    for (;;) {
        while (!pool.stopping && (pool.job == NULL || pool.gen == seen))
            pthread_cond_wait(&pool.work, &pool.mu);
        if (pool.stopping)
            break;
        Job *job = pool.job;
        seen = pool.gen;
        job->active++;
        pthread_mutex_unlock(&pool.mu);
        run_chunks(job);
        pthread_mutex_lock(&pool.mu);
        if (--job->active == 0)
            pthread_cond_broadcast(&pool.idle);
    }
    pthread_mutex_unlock(&pool.mu);
    return NULL;
}

/* fn(arg, c) for c in 0..nchunks-1, here and on idle workers; without the GIL. */
static void pool_run(ChunkFn fn, void *arg, long nchunks)
{
    Job job = {fn, arg, nchunks, 0, 0};
    int shared = 0;
    if (nchunks > 1) {
        pthread_mutex_lock(&pool.mu);
        if (pool.job == NULL && pool.nworkers > 0) {
            pool.job = &job;
            pool.gen++;
            shared = 1;
            pthread_cond_broadcast(&pool.work);
        }
        pthread_mutex_unlock(&pool.mu);
    }
    run_chunks(&job);
    if (shared) {
        pthread_mutex_lock(&pool.mu);
        pool.job = NULL; /* no worker joins any more; wait for those in it */
        while (job.active > 0)
            pthread_cond_wait(&pool.idle, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
}

/* How many chunks a batch of n items is cut into: 8 items each, taken one at a time by
 * whichever thread is free, so that a worker that wakes late still takes its share; one
 * chunk if there are no workers. A lone packet is never worth a wake-up: it is done on
 * the calling thread at once. */
#define CHUNK 8
static long chunks_for(Py_ssize_t n)
{
    pthread_mutex_lock(&pool.mu);
    int workers = pool.nworkers;
    pthread_mutex_unlock(&pool.mu);
    return workers && n > CHUNK ? (long)((n + CHUNK - 1) / CHUNK) : 1;
}

static void stop_workers(void)
{
    pthread_mutex_lock(&pool.mu);
    pool.stopping = 1;
    pthread_cond_broadcast(&pool.work);
    int n = pool.nworkers;
    pthread_t *tids = pool.tids;
    pool.nworkers = 0;
    pool.tids = NULL;
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < n; i++)
        pthread_join(tids[i], NULL);
    free(tids);
    pthread_mutex_lock(&pool.mu);
    pool.stopping = 0;
    pthread_mutex_unlock(&pool.mu);
}

/* In a child of fork only the forking thread lives on: no workers there. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.job = NULL;
    pool.nworkers = 0;
    pool.stopping = 0;
    free(pool.tids);
    pool.tids = NULL;
}

static PyObject *set_threads(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "0 <= workers <= 1024");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    stop_workers();
    Py_END_ALLOW_THREADS
    pthread_t *tids = calloc(n ? (size_t)n : 1, sizeof(pthread_t));
    if (tids == NULL)
        return PyErr_NoMemory();
    long started = 0;
    pthread_mutex_lock(&pool.mu);
    for (; started < n; started++)
        if (pthread_create(&tids[started], NULL, worker_main, NULL) != 0)
            break;
    pool.tids = tids;
    pool.nworkers = (int)started;
    pthread_mutex_unlock(&pool.mu);
    if (started < n)
        return PyErr_Format(PyExc_OSError, "started %ld of %ld crypto threads", started, n);
    Py_RETURN_NONE;
}

static PyObject *get_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&pool.mu);
    int n = pool.nworkers;
    pthread_mutex_unlock(&pool.mu);
    return PyLong_FromLong(n);
}

/* ------------------------------------------------------------------ Session */

typedef struct {
    PyObject_HEAD
    uint8_t key[KEY_LEN];
    int wiped;               /* the key is zeroed */
    PyThread_type_lock lock; /* guards key, wiped and the window */
    double expires;
    uint64_t top; /* greatest counter accepted, plus one (0: none yet) */
    uint64_t words[WORDS];
    uint64_t batch;  /* the open_batch call that last gave this session a slot */
    Py_ssize_t slot; /* ... and that slot */
} Session;

static PyTypeObject SessionType;

/* core/replay.py ReplayWindow.accept, word for word. */
static int replay_accept(Session *s, uint64_t counter)
{
    if (counter >= REJECT_AFTER_MESSAGES || s->top > REJECT_AFTER_MESSAGES)
        return 0;
    counter += 1;
    uint64_t top = s->top;
    if (counter + WINDOW < top)
        return 0;
    uint64_t index = counter >> 6;
    if (counter > top) {
        uint64_t current = top >> 6, n = index - current;
        if (n > WORDS)
            n = WORDS;
        for (uint64_t i = 1; i <= n; i++)
            s->words[(current + i) & (WORDS - 1)] = 0;
        s->top = counter;
    }
    uint64_t bit = (uint64_t)1 << (counter & 63);
    index &= WORDS - 1;
    if (s->words[index] & bit)
        return 0;
    s->words[index] |= bit;
    return 1;
}

static PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "expires", NULL};
    Py_buffer key;
    double expires;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*d:Session", kwlist, &key, &expires))
        return NULL;
    Session *self = NULL;
    if (check_key(&key) == 0) {
        self = (Session *)type->tp_alloc(type, 0);
        if (self != NULL && (self->lock = PyThread_allocate_lock()) == NULL)
            Py_CLEAR(self);
        if (self != NULL) {
            memcpy(self->key, key.buf, KEY_LEN);
            self->expires = expires;
        } else if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
    }
    PyBuffer_Release(&key);
    if (self == NULL)
        return NULL;
    return (PyObject *)self;
}

static void session_wipe(Session *self)
{
    OPENSSL_cleanse(self->key, KEY_LEN);
    self->wiped = 1;
    self->expires = -INFINITY;
}

static PyObject *Session_wipe(Session *self, PyObject *Py_UNUSED(ignored))
{
    lock_gil_held(self->lock);
    session_wipe(self);
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *Session_window_state(Session *self, PyObject *Py_UNUSED(ignored))
{
    uint8_t bitmap[WORDS * 8];
    lock_gil_held(self->lock);
    uint64_t top = self->top;
    for (int i = 0; i < WORDS; i++)
        wr64le(bitmap + 8 * i, self->words[i]);
    PyThread_release_lock(self->lock);
    return Py_BuildValue("(Ky#)", (unsigned long long)top, (const char *)bitmap,
                         (Py_ssize_t)sizeof bitmap);
}

static void Session_dealloc(Session *self)
{
    session_wipe(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Session_methods[] = {
    {"wipe", (PyCFunction)Session_wipe, METH_NOARGS, "Forget the key; all later packets drop."},
    {"window_state", (PyCFunction)Session_window_state, METH_NOARGS,
     "(top, bitmap): top is the greatest accepted counter plus one (0: none); bitmap is the\n"
     "128 window words, each 8 bytes little-endian (ReplayWindow.top and .words)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Session_members[] = {
    {"expires", T_DOUBLE, offsetof(Session, expires), 0, "packets drop when now >= expires"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.Session",
    .tp_doc = "Session(key, expires): a receiving session (key and replay window).",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Session_new,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
    .tp_members = Session_members,
};

/* ------------------------------------------------------------------ Sealer */

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

/* Py_buffers for every item of a tuple (one allocation); NULL with an exception. A tuple,
 * not PySequence_Fast's list: since Python 3.12 PyObject_GetBuffer may run Python code
 * (`__buffer__`) that empties a list under us, whereas a tuple holds its items. */
static Py_buffer *get_buffers(PyObject *tuple, Py_ssize_t n)
{
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(tuple, i), &views[i], PyBUF_SIMPLE) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            PyMem_Free(views);
            return NULL;
        }
    }
    return views;
}

static void release_buffers(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
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

static PyTypeObject SealerType = {
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

/* ------------------------------------------------------------------ open_batch */

/* The names are wgpy.core.output.Drop's values. */
enum { D_BAD_SIZE, D_UNKNOWN_TYPE, D_UNKNOWN, D_EXPIRED, D_BAD_TAG, D_REPLAYED, D_BAD_INNER,
       N_DROPS };
static const char *const drop_names[N_DROPS] = {"bad_size", "unknown_type", "unknown_index",
                                                "expired", "bad_tag", "replayed", "bad_inner"};
enum { V_PENDING = N_DROPS, V_OTHER, V_KEEPALIVE, V_PACKET, V_OPENED };

typedef struct {
    uint32_t off, len;     /* the datagram in buf; its plaintext goes to out + off */
    uint32_t start, plen;  /* V_PACKET: the IP packet in out */
    uint64_t counter;
    Py_ssize_t slot;
    int verdict;
} Rec;

typedef struct {
    Session *s; /* a strong reference while the call runs */
    uint8_t key[KEY_LEN]; /* its key when the call began (cleansed at the end) */
    uint64_t nbytes;
    Py_ssize_t order; /* position in per_session, -1 until a packet authenticated */
    int data;
} Slot;

static uint64_t batch_serial;

static int aead_open(EVP_CIPHER_CTX *ctx, const uint8_t *key, uint64_t counter, const uint8_t *in,
                     int len, uint8_t *out)
{
    uint8_t nonce[12] = {0};
    int n = 0;
    wr64le(nonce + 4, counter);
    if (ctx == NULL || EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) != 1
        || (len > 0 && EVP_DecryptUpdate(ctx, out, &n, in, len) != 1)
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, (void *)(in + len)) != 1
        || EVP_DecryptFinal_ex(ctx, out + len, &n) != 1) {
        ERR_clear_error();
        return 0;
    }
    return 1;
}

/* The inner packet's true length (backend.open_batch's checks), or 0 if it is malformed. */
static uint32_t inner_length(const uint8_t *p, uint32_t n)
{
    uint32_t length;
    if (n >= 20 && p[0] >> 4 == 4) {
        length = rd16be(p + 2);
        if (length < 20)
            return 0;
    } else if (n >= 40 && p[0] >> 4 == 6) {
        length = 40 + rd16be(p + 4);
    } else {
        return 0;
    }
    return length <= n ? length : 0;
}

typedef struct {
    const uint8_t *buf;
    uint8_t *out;
    Rec *recs;
    Py_ssize_t nrecs;
    const Slot *slots;
    long nchunks;
} OpenJob;

/* Phase 2, without the GIL, on the crypto threads: decrypt a chunk of the records (each
 * into out at its own offset, so chunks never overlap); V_OPENED if the tag verified. */
static void open_chunk(void *arg, long chunk)
{
    OpenJob *j = arg;
    EVP_CIPHER_CTX *ctx = thread_ctx(0);
    Py_ssize_t lo = j->nrecs * chunk / j->nchunks, hi = j->nrecs * (chunk + 1) / j->nchunks;
    for (Py_ssize_t i = lo; i < hi; i++) {
        Rec *r = &j->recs[i];
        if (r->verdict != V_PENDING)
            continue;
        r->verdict = aead_open(ctx, j->slots[r->slot].key, r->counter,
                               j->buf + r->off + HEADER_LEN, (int)(r->len - DATA_MIN),
                               j->out + r->off) ? V_OPENED : D_BAD_TAG;
    }
}

/* Phase 3, without the GIL, on one thread, in the order the datagrams came: the replay
 * windows (under each session's lock) and the inner checks of the opened records. */
static void check_opened(const uint8_t *out, Rec *recs, Py_ssize_t nrecs, Slot *slots)
{
    Session *locked = NULL;
    Py_ssize_t order = 0;
    for (Py_ssize_t i = 0; i < nrecs; i++) {
        Rec *r = &recs[i];
        if (r->verdict != V_OPENED)
            continue;
        Slot *sl = &slots[r->slot];
        if (sl->s != locked) {
            if (locked)
                PyThread_release_lock(locked->lock);
            locked = sl->s;
            PyThread_acquire_lock(locked->lock, WAIT_LOCK);
        }
        if (locked->wiped) { /* wiped since phase 1 */
            r->verdict = D_EXPIRED;
            continue;
        }
        if (!replay_accept(locked, r->counter)) { /* the window moves only after the tag */
            r->verdict = D_REPLAYED;
            continue;
        }
        sl->nbytes += r->len;
        if (sl->order < 0)
            sl->order = order++;
        uint32_t clen = r->len - DATA_MIN;
        if (clen == 0) {
            r->verdict = V_KEEPALIVE;
            continue;
        }
        sl->data = 1;
        uint32_t length = inner_length(out + r->off, clen);
        r->verdict = length ? V_PACKET : D_BAD_INNER;
        r->start = r->off;
        r->plen = length;
    }
    if (locked)
        PyThread_release_lock(locked->lock);
}

/* Whether WireGuard's message_type() would call this datagram a handshake message. */
static int is_handshake(const uint8_t *p, uint32_t len)
{
    if (len < 4)
        return 0;
    uint32_t t = rd32le(p);
    return (t == 1 && len == 148) || (t == 2 && len == 92) || (t == 3 && len == 64);
}

/* A run's packets as bytes, from out (its records are run_begin..i-1 of recs, V_PACKET). */
static PyObject *run_packets(const uint8_t *out, const Rec *recs, Py_ssize_t begin,
                             Py_ssize_t end, Py_ssize_t count)
{
    PyObject *list = PyList_New(count);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = begin; list && i < end; i++) {
        if (recs[i].verdict != V_PACKET)
            continue;
        PyObject *b = PyBytes_FromStringAndSize((const char *)out + recs[i].start, recs[i].plen);
        if (b == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, k++, b);
    }
    return list;
}

/* Phase 3, with the GIL: the Python result. */
static PyObject *open_result(const uint8_t *out, Rec *recs, Py_ssize_t nrecs, Slot *slots,
                             Py_ssize_t nslots)
{
    Py_ssize_t drops[N_DROPS] = {0}, naccounted = 0;
    PyObject *runs = PyList_New(0), *per = NULL, *others = PyList_New(0), *dd = PyDict_New();
    if (runs == NULL || others == NULL || dd == NULL)
        goto fail;
    Py_ssize_t run_first = 0, run_count = 0, run_slot = -1;
    const uint8_t *run_src = NULL;
    uint32_t run_srclen = 0;
    for (Py_ssize_t i = 0; i <= nrecs; i++) {
        Rec *r = i < nrecs ? &recs[i] : NULL;
        const uint8_t *src = NULL;
        uint32_t srclen = 0;
        if (r && r->verdict == V_PACKET) {
            const uint8_t *p = out + r->start;
            src = p[0] >> 4 == 4 ? p + 12 : p + 8;
            srclen = p[0] >> 4 == 4 ? 4 : 16;
        }
        /* a run ends at the end, or at a packet of another session or inner source */
        if (run_count && (r == NULL || (src && (r->slot != run_slot || srclen != run_srclen
                                                || memcmp(src, run_src, srclen))))) {
            PyObject *t = Py_BuildValue("(Oy#N)", (PyObject *)slots[run_slot].s, run_src,
                                        (Py_ssize_t)run_srclen,
                                        run_packets(out, recs, run_first, i, run_count));
            if (t == NULL || PyList_Append(runs, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
            run_count = 0;
        }
        if (r == NULL)
            break;
        if (src) {
            if (run_count == 0)
                run_first = i, run_slot = r->slot, run_src = src, run_srclen = srclen;
            run_count++;
        } else if (r->verdict == V_OTHER) {
            PyObject *t = Py_BuildValue("(II)", (unsigned)r->off, (unsigned)r->len);
            if (t == NULL || PyList_Append(others, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
        } else if (r->verdict < N_DROPS) {
            drops[r->verdict]++;
        }
    }
    for (Py_ssize_t i = 0; i < nslots; i++)
        naccounted += slots[i].order >= 0;
    per = PyList_New(naccounted);
    if (per == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < nslots; i++) {
        if (slots[i].order < 0)
            continue;
        PyObject *t = Py_BuildValue("(OKO)", (PyObject *)slots[i].s,
                                    (unsigned long long)slots[i].nbytes,
                                    slots[i].data ? Py_True : Py_False);
        if (t == NULL)
            goto fail;
        PyList_SET_ITEM(per, slots[i].order, t);
    }
    for (int k = 0; k < N_DROPS; k++) {
        PyObject *v = PyLong_FromSsize_t(drops[k]);
        if (v == NULL || PyDict_SetItemString(dd, drop_names[k], v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(NNNN)", runs, per, others, dd);
fail:
    Py_XDECREF(runs);
    Py_XDECREF(per);
    Py_XDECREF(others);
    Py_XDECREF(dd);
    return NULL;
}

static PyObject *open_batch(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer in;
    Py_ssize_t nbytes, seg;
    PyObject *sessions;
    double now;
    if (!PyArg_ParseTuple(args, "y*nnO!d:open_batch", &in, &nbytes, &seg, &PyDict_Type,
                          &sessions, &now))
        return NULL;
    PyObject *result = NULL;
    Rec *recs = NULL;
    Slot *slots = NULL;
    uint8_t *out = NULL; /* the plaintexts: one scratch block per call */
    Py_ssize_t nslots = 0;
    const uint8_t *buf = in.buf;
    if (nbytes < 0 || nbytes > in.len || nbytes > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= nbytes <= len(buf)");
        goto done;
    }
    Py_ssize_t step = seg > 0 && seg < nbytes ? seg : nbytes;
    Py_ssize_t nrecs = nbytes ? (nbytes + step - 1) / step : 1; /* 0: one empty datagram */
    size_t n1 = (size_t)nrecs;
    recs = PyMem_Malloc(n1 * sizeof(Rec));
    slots = PyMem_Malloc(n1 * sizeof(Slot));
    out = PyMem_Malloc(nbytes ? (size_t)nbytes : 1);
    if (recs == NULL || slots == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Phase 1, with the GIL: split, classify, find each data message's session. */
    uint64_t serial = ++batch_serial, last_index = UINT64_MAX;
    Py_ssize_t last_slot = -1;
    for (Py_ssize_t i = 0; i < nrecs; i++) {
        Rec *r = &recs[i];
        r->off = (uint32_t)(i * step);
        r->len = (uint32_t)(nbytes - i * step < step ? nbytes - i * step : step);
        r->slot = -1;
        const uint8_t *p = buf + r->off;
        if (r->len < DATA_MIN || rd32le(p) != 4) {
            r->verdict = is_handshake(p, r->len) ? V_OTHER
                         : (r->len < 4 || rd32le(p) - 1 < 4) ? D_BAD_SIZE  /* a known type */
                                                               : D_UNKNOWN_TYPE;
            continue;
        }
        uint32_t index = rd32le(p + 4);
        r->counter = rd64le(p + 8);
        if (index != last_index) {
            PyObject *key = PyLong_FromUnsignedLong(index);
            if (key == NULL)
                goto done;
            PyObject *v = PyDict_GetItemWithError(sessions, key); /* borrowed */
            Py_DECREF(key);
            if (v == NULL && PyErr_Occurred())
                goto done;
            if (v != NULL && !PyObject_TypeCheck(v, &SessionType)) {
                PyErr_SetString(PyExc_TypeError, "sessions maps an index to a Session");
                goto done;
            }
            last_index = index;
            last_slot = -1;
            if (v != NULL) {
                Session *s = (Session *)v;
                if (s->batch == serial && s->slot < nslots && slots[s->slot].s == s) {
                    last_slot = s->slot;
                } else {
                    Py_INCREF(v);
                    slots[nslots] = (Slot){.s = s, .order = -1};
                    lock_gil_held(s->lock); /* the key, as it is now */
                    memcpy(slots[nslots].key, s->key, KEY_LEN);
                    PyThread_release_lock(s->lock);
                    s->batch = serial;
                    s->slot = last_slot = nslots++;
                }
            }
        }
        if (last_slot < 0)
            r->verdict = D_UNKNOWN;
        else if (r->counter >= REJECT_AFTER_MESSAGES || now >= slots[last_slot].s->expires)
            r->verdict = D_EXPIRED;
        else
            r->verdict = V_PENDING, r->slot = last_slot;
    }
    OpenJob job = {buf, out, recs, nrecs, slots, 1};
    Py_BEGIN_ALLOW_THREADS
    job.nchunks = chunks_for(nrecs);
    pool_run(open_chunk, &job, job.nchunks);
    check_opened(out, recs, nrecs, slots);
    Py_END_ALLOW_THREADS
    result = open_result(out, recs, nrecs, slots, nslots);
done:
    for (Py_ssize_t i = 0; i < nslots; i++) {
        OPENSSL_cleanse(slots[i].key, KEY_LEN);
        Py_DECREF(slots[i].s);
    }
    PyMem_Free(recs);
    PyMem_Free(slots);
    PyMem_Free(out);
    PyBuffer_Release(&in);
    return result;
}

/* ------------------------------------------------------------------ checksum */

/* One's-complement sum of big-endian 16-bit words (an odd byte padded), plus `acc`, folded:
 * never 0 unless everything was 0 (as offload.checksum). Up to 2**47 bytes at a time. */
static uint64_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return s;
}

static unsigned csum(const uint8_t *p, size_t n, uint64_t acc)
{
    acc = fold(acc);
    size_t i = 0;
    for (; i + 1 < n; i += 2)
        acc += rd16be(p + i);
    if (n & 1)
        acc += (uint64_t)p[n - 1] << 8;
    return (unsigned)fold(acc);
}

static PyObject *checksum(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    PyObject *initial = NULL;
    if (!PyArg_ParseTuple(args, "y*|O!:checksum", &data, &PyLong_Type, &initial))
        return NULL;
    uint64_t acc = 0;
    if (initial != NULL) {
        acc = PyLong_AsUnsignedLongLong(initial);
        if (acc == (uint64_t)-1 && PyErr_Occurred()) {
            /* a huge initial sum: only its residue modulo 0xFFFF (and that it is not 0) count */
            PyObject *m = NULL, *r = NULL;
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                m = PyLong_FromLong(0xFFFF);
                int negative = m ? PyObject_RichCompareBool(initial, m, Py_LT) : -1;
                if (negative == 1)
                    PyErr_SetString(PyExc_ValueError, "initial must be >= 0");
                else if (negative == 0)
                    r = PyNumber_Remainder(initial, m);
            }
            acc = r ? PyLong_AsUnsignedLongLong(r) : 0;
            Py_XDECREF(m);
            Py_XDECREF(r);
            if (r == NULL) {
                PyBuffer_Release(&data);
                return NULL;
            }
            acc = acc ? acc : 0xFFFF;
        }
    }
    unsigned s = csum(data.buf, (size_t)data.len, acc);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(s);
}

/* sum over the IP addresses of the packet at p plus proto and length (offload._pseudo_sum) */
static unsigned pseudo_sum(const uint8_t *p, unsigned proto, uint64_t length)
{
    return p[0] >> 4 == 4 ? csum(p + 12, 8, proto + length) : csum(p + 8, 32, proto + length);
}

/* offload._set_ip_length on a header of at least 12 (v4) or 40 (v6) bytes */
static void set_ip_length(uint8_t *hdr, size_t iphl, unsigned total)
{
    if (hdr[0] >> 4 == 4) {
        wr16be(hdr + 2, total);
        hdr[10] = hdr[11] = 0;
        wr16be(hdr + 10, ~csum(hdr, iphl, 0) & 0xFFFF);
    } else {
        wr16be(hdr + 4, total - 40);
    }
}

static void vnet(uint8_t *p, unsigned flags, unsigned type, unsigned hlen, unsigned gso,
                 unsigned start, unsigned offset)
{
    p[0] = (uint8_t)flags, p[1] = (uint8_t)type;
    wr16le(p + 2, hlen), wr16le(p + 4, gso), wr16le(p + 6, start), wr16le(p + 8, offset);
}

/* ------------------------------------------------------------------ coalesce */

enum { C_NONE, C_UNPLACEABLE, C_FLOW };
#define ACK 0x10
#define PSH 0x08

typedef struct {
    uint8_t key[37];
    uint8_t klen;
    size_t l4, hlen; /* hlen 0: may not be merged */
    int udp;
} Class;

static int v6_ext(unsigned h)
{
    return h == 0 || h == 43 || h == 44 || h == 50 || h == 51 || h == 60 || h == 135 || h == 139
           || h == 140 || h == 253 || h == 254;
}

/* offload._classify: C_NONE (key None), C_UNPLACEABLE (key b""), or C_FLOW. */
static int classify(const uint8_t *p, size_t n, Class *c)
{
    unsigned proto;
    int ok;
    c->hlen = 0, c->udp = 0;
    if (n < 20)
        return C_NONE;
    if (p[0] >> 4 == 4) {
        proto = p[9];
        if (proto != 6 && proto != 17)
            return C_NONE;
        c->l4 = (size_t)(p[0] & 15) * 4;
        if ((p[6] & 0x3F) || p[7] || n < c->l4 + (proto == 6 ? 20 : 8))
            return C_UNPLACEABLE;
        memcpy(c->key, p + 12, 8); /* addresses, then ports: p[12:24] when l4 is 20 */
        memcpy(c->key + 8, p + c->l4, 4);
        c->klen = 12;
        ok = c->l4 == 20 && rd16be(p + 2) == n;
    } else if (p[0] >> 4 == 6) {
        proto = n >= 40 ? p[6] : 0;
        if (proto != 6 && proto != 17)
            return n >= 40 && v6_ext(proto) ? C_UNPLACEABLE : C_NONE;
        c->l4 = 40;
        if (n < (proto == 6 ? 60u : 48u))
            return C_UNPLACEABLE;
        memcpy(c->key, p + 8, 36);
        c->klen = 36;
        ok = rd16be(p + 4) + 40u == n;
    } else {
        return C_NONE;
    }
    size_t l4 = c->l4;
    if (proto == 17) {
        c->key[c->klen++] = 0x11;
        c->udp = 1;
        if (ok && rd16be(p + l4 + 4) == n - l4 && n - l4 > 8 && (p[l4 + 6] | p[l4 + 7]))
            c->hlen = l4 + 8;
        return C_FLOW;
    }
    size_t hlen = l4 + (size_t)(p[l4 + 12] >> 4) * 4;
    unsigned flags = p[l4 + 13];
    if (ok && l4 + 20 <= hlen && hlen < n && (flags == ACK || flags == (ACK | PSH)))
        c->hlen = hlen;
    return C_FLOW;
}

typedef struct {
    Py_ssize_t first, last, count;
    size_t l4, hlen, gso, total;
    int udp;
    uint32_t next_seq;
    unsigned next_id;
} Run;

typedef struct {
    uint8_t key[37];
    uint8_t klen; /* 0: an empty entry */
    Py_ssize_t run; /* the key's open run, -1 if none (or if gen is old) */
    uint64_t gen;
} Entry;

static Entry *lookup(Entry *table, size_t mask, const Class *c)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < c->klen; i++)
        h = (h ^ c->key[i]) * 16777619u;
    size_t i = h & mask;
    while (table[i].klen && (table[i].klen != c->klen || memcmp(table[i].key, c->key, c->klen)))
        i = (i + 1) & mask;
    return &table[i];
}

/* The header bytes a run's members must share (the _shape / SHAPES fields marked fixed). */
static int same_fixed(const Run *run, const uint8_t *a, const uint8_t *b)
{
    size_t l4 = run->l4;
    if (l4 == 20 ? memcmp(a, b, 2) || memcmp(a + 6, b + 6, 4) : memcmp(a, b, 4) || memcmp(a + 6, b + 6, 2))
        return 0;
    if (run->udp)
        return 1;
    return !memcmp(a + l4 + 8, b + l4 + 8, 5) && !memcmp(a + l4 + 14, b + l4 + 14, 2)
           && !memcmp(a + l4 + 18, b + l4 + 18, run->hlen - l4 - 18);
}

static void run_start(Run *run, Py_ssize_t i, const uint8_t *p, size_t n, const Class *c)
{
    run->first = run->last = i, run->count = 1;
    run->l4 = c->l4, run->hlen = c->hlen, run->udp = c->udp;
    run->gso = n - c->hlen, run->total = n;
    run->next_id = c->l4 == 20 || c->udp ? (rd16be(p + 4) + 1) & 0xFFFF : 0;
    run->next_seq = c->udp ? 0 : rd32be(p + c->l4 + 4) + (uint32_t)run->gso;
}

/* _Run.take / _UdpRun.take */
static int run_take(Run *run, const uint8_t *first, const uint8_t *p, size_t n, size_t hlen)
{
    size_t size = n - hlen;
    if (hlen != run->hlen || size > run->gso || run->total + size > 0xFFFF
        || (run->udp && run->count >= 64))
        return 0;
    if ((!run->udp && rd32be(p + run->l4 + 4) != run->next_seq) || !same_fixed(run, first, p)
        || (run->l4 == 20 && rd16be(p + 4) != run->next_id))
        return 0;
    run->total += size;
    run->next_seq += (uint32_t)size;
    run->next_id = (run->next_id + 1) & 0xFFFF;
    run->count++;
    return 1;
}

static int run_closed_by(const Run *run, const uint8_t *p, size_t n)
{
    return n - run->hlen < run->gso || (!run->udp && (p[run->l4 + 13] & PSH));
}

static PyObject *plain(const Py_buffer *v)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, VNET_LEN + v->len);
    if (b) {
        memset(PyBytes_AS_STRING(b), 0, VNET_LEN);
        memcpy(PyBytes_AS_STRING(b) + VNET_LEN, v->buf, (size_t)v->len);
    }
    return b;
}

/* _Run.build / _UdpRun.build for a run of two or more */
static PyObject *run_build(const Run *run, const Py_buffer *views, const Py_ssize_t *next)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(VNET_LEN + run->total));
    if (b == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b), *h = o + VNET_LEN;
    const uint8_t *first = views[run->first].buf;
    size_t l4 = run->l4, hlen = run->hlen, total = run->total;
    memcpy(h, first, hlen);
    set_ip_length(h, l4, (unsigned)total);
    if (run->udp) {
        wr16be(h + l4 + 4, (unsigned)(total - l4));
        wr16be(h + l4 + 6, pseudo_sum(first, 17, total - l4));
        vnet(o, 1, 5, (unsigned)hlen, (unsigned)run->gso, (unsigned)l4, 6);
    } else {
        wr16be(h + l4 + 16, pseudo_sum(first, 6, total - l4));
        h[l4 + 13] = ((const uint8_t *)views[run->last].buf)[l4 + 13];
        vnet(o, 1, l4 == 20 ? 1 : 4, (unsigned)hlen, (unsigned)run->gso, (unsigned)l4, 16);
    }
    uint8_t *at = h + hlen;
    for (Py_ssize_t i = run->first; i >= 0; i = next[i]) {
        size_t len = (size_t)views[i].len - hlen;
        memcpy(at, (const uint8_t *)views[i].buf + hlen, len);
        at += len;
    }
    return b;
}

static PyObject *coalesce(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"packets", "udp", NULL};
    PyObject *packets;
    int udp = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:coalesce", kwlist, &packets, &udp))
        return NULL;
    PyObject *items_tuple = PySequence_Tuple(packets); /* see get_buffers */
    if (items_tuple == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items_tuple), nruns = 0, nitems = 0;
    PyObject *result = NULL;
    Py_buffer *views = get_buffers(items_tuple, n);
    size_t cap = 16;
    while (cap < 2 * (size_t)n)
        cap *= 2;
    Run *runs = PyMem_Calloc((size_t)n + 1, sizeof(Run));
    Py_ssize_t *next = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    Py_ssize_t *items = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    Entry *table = PyMem_Calloc(cap, sizeof(Entry));
    if (views == NULL || runs == NULL || next == NULL || items == NULL || table == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    uint64_t gen = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = views[i].buf;
        size_t len = (size_t)views[i].len;
        Class c;
        int kind = classify(p, len, &c);
        next[i] = -1;
        if (kind == C_NONE || (c.udp && !udp)) {
            items[nitems++] = i;
            continue;
        }
        if (kind == C_UNPLACEABLE) { /* every open run ends */
            gen++;
            items[nitems++] = i;
            continue;
        }
        Entry *e = lookup(table, cap - 1, &c);
        Py_ssize_t r = e->klen && e->gen == gen ? e->run : -1;
        if (!c.hlen) {
            e->run = -1;
            items[nitems++] = i;
            continue;
        }
        if (r >= 0 && run_take(&runs[r], views[runs[r].first].buf, p, len, c.hlen)) {
            next[runs[r].last] = i;
            runs[r].last = i;
        } else {
            r = nruns++;
            run_start(&runs[r], i, p, len, &c);
            items[nitems++] = -1 - r;
        }
        if (run_closed_by(&runs[r], p, len)) {
            e->run = -1;
        } else {
            memcpy(e->key, c.key, c.klen);
            e->klen = c.klen;
            e->run = r;
            e->gen = gen;
        }
    }
    result = PyList_New(nitems);
    for (Py_ssize_t k = 0; result && k < nitems; k++) {
        Py_ssize_t it = items[k];
        const Run *run = it < 0 ? &runs[-1 - it] : NULL;
        PyObject *b = run == NULL ? plain(&views[it])
                      : run->count == 1 ? plain(&views[run->first])
                                         : run_build(run, views, next);
        if (b == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, k, b);
    }
done:
    if (views)
        release_buffers(views, n);
    PyMem_Free(runs);
    PyMem_Free(next);
    PyMem_Free(items);
    PyMem_Free(table);
    Py_DECREF(items_tuple);
    return result;
}

/* ------------------------------------------------------------------ split */

static int append_bytes(PyObject *list, const uint8_t *p, size_t n)
{
    PyObject *b = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    int rc = b ? PyList_Append(list, b) : -1;
    Py_XDECREF(b);
    return rc;
}

/* offload._segment: a buffer it refuses (an IPv4 header under 20 bytes, a segment whose
 * IP length field would pass 65535, ...) appends nothing. */
static int segment(PyObject *list, const uint8_t *pkt, size_t len, int udp, Py_ssize_t mss, size_t l4)
{
    unsigned version = pkt[0] >> 4;
    size_t iphl;
    if (version == 4 && (pkt[0] & 15) >= 5)
        iphl = (size_t)(pkt[0] & 15) * 4;
    else if (version == 6)
        iphl = 40;
    else
        return 0;
    l4 = l4 ? l4 : iphl;
    if (l4 < iphl || l4 + (udp ? 8 : 20) > len)
        return 0;
    size_t thl = udp ? 8 : (size_t)(pkt[l4 + 12] >> 4) * 4, hlen = l4 + thl;
    if (mss <= 0 || thl < (udp ? 8u : 20u) || hlen > len)
        return 0;
    size_t n = len - hlen, most = n < (size_t)mss ? n : (size_t)mss;
    if (hlen + most - (version == 6 ? 40 : 0) > 0xFFFF) /* the IP length field */
        return 0;
    const uint8_t *payload = pkt + hlen;
    unsigned base = pseudo_sum(pkt, udp ? 17 : 6, 0), ip_id = rd16be(pkt + 4);
    uint32_t seq = rd32be(pkt + l4 + 4);
    unsigned flags = udp ? 0 : pkt[l4 + 13];
    size_t csum_at = l4 + (udp ? 6 : 16);
    uint8_t *o = PyMem_Malloc(hlen + most);
    if (o == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t i = 0, off = 0;
    do {
        size_t chunk = n - off < (size_t)mss ? n - off : (size_t)mss, l4len = thl + chunk;
        memcpy(o, pkt, hlen);
        memcpy(o + hlen, payload + off, chunk);
        if (version == 4)
            wr16be(o + 4, (ip_id + i) & 0xFFFF);
        set_ip_length(o, iphl, (unsigned)(l4 + l4len));
        if (udp) {
            wr16be(o + l4 + 4, (unsigned)l4len);
        } else {
            wr32be(o + l4 + 4, seq + (uint32_t)off);
            unsigned f = i == 0 ? flags : flags & ~0x80u;
            o[l4 + 13] = (uint8_t)(off + (size_t)mss >= n ? f : f & ~(PSH | 0x01u));
        }
        o[csum_at] = o[csum_at + 1] = 0;
        unsigned c = ~csum(o + hlen, chunk, csum(o + l4, thl, base + l4len)) & 0xFFFF;
        wr16be(o + csum_at, udp && !c ? 0xFFFF : c);
        if (append_bytes(list, o, hlen + chunk) < 0) {
            PyMem_Free(o);
            return -1;
        }
        i++, off += (size_t)mss;
    } while (off < n);
    PyMem_Free(o);
    return 0;
}

static PyObject *split(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer v;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "y*n:split", &v, &mtu))
        return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL || v.len < VNET_LEN)
        goto done;
    const uint8_t *b = v.buf, *pkt = b + VNET_LEN;
    size_t len = (size_t)v.len - VNET_LEN;
    unsigned flags = b[0], gso = b[1] & ~0x80u, gso_size = b[4] | b[5] << 8;
    size_t start = (size_t)(b[6] | b[7] << 8), at = start + (size_t)(b[8] | b[9] << 8);
    int rc = 0;
    if (gso == 0 && !(flags & 1)) {
        rc = append_bytes(list, pkt, len);
    } else if (gso == 0) { /* finish a partial checksum; 0 means "none" for UDP: 0xFFFF */
        if (at + 2 <= len) {
            uint8_t *o = PyMem_Malloc(len);
            if (o == NULL) {
                PyErr_NoMemory();
                rc = -1;
            } else {
                memcpy(o, pkt, len);
                unsigned c = ~csum(pkt + start, len - start, 0) & 0xFFFF;
                wr16be(o + at, c ? c : 0xFFFF);
                rc = append_bytes(list, o, len);
                PyMem_Free(o);
            }
        }
    } else if ((gso == 1 || gso == 4 || gso == 5) && len >= 28) {
        rc = segment(list, pkt, len, gso == 5, gso_size ? (Py_ssize_t)gso_size : mtu,
                     flags & 1 ? start : 0);
    }
    if (rc < 0)
        Py_CLEAR(list);
done:
    PyBuffer_Release(&v);
    return list;
}

/* ------------------------------------------------------------------ the module */

static PyMethodDef module_methods[] = {
    {"set_threads", set_threads, METH_O,
     "set_threads(n): n crypto worker threads beside each caller (0: none, the default);\n"
     "seal and open_batch cut a batch into one chunk per thread."},
    {"threads", get_threads, METH_NOARGS, "threads() -> the number of crypto worker threads."},
    {"open_batch", open_batch, METH_VARARGS,
     "open_batch(buf, nbytes, seg, sessions, now) -> (runs, per_session, others, drops)\n\n"
     "wgpy.core.backend.open_batch, byte for byte (that is the reference): one UDP (GRO)\n"
     "read opened, decrypted without the GIL. runs: [(session, source, packets)];\n"
     "per_session: [(session, nbytes, data)]; others: [(offset, length)]; drops: reason ->\n"
     "count (every reason, zeros included)."},
    {"coalesce", (PyCFunction)(void (*)(void))coalesce, METH_VARARGS | METH_KEYWORDS,
     "coalesce(packets, udp=True) -> list[bytes], as wgpy.io.offload.coalesce."},
    {"checksum", checksum, METH_VARARGS,
     "checksum(data, initial=0) -> int, as wgpy.io.offload.checksum (initial >= 0)."},
    {"split", split, METH_VARARGS, "split(buf, mtu) -> list[bytes], as wgpy.io.offload.split."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "wgpy._native",
    "wgpy's datapath loops in C over OpenSSL (optional; the Python code is the reference).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&SessionType) < 0 || PyType_Ready(&SealerType) < 0)
        return NULL;
    static int once;
    if (!once) {
        if (pthread_key_create(&ctx_key, free_thread_ctx) != 0
            || pthread_atfork(NULL, NULL, pool_after_fork) != 0) {
            PyErr_SetString(PyExc_OSError, "cannot set up the crypto threads");
            return NULL;
        }
        once = 1;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SessionType);
    Py_INCREF(&SealerType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0
        || PyModule_AddObject(m, "Sealer", (PyObject *)&SealerType) < 0
        || PyModule_AddIntConstant(m, "WINDOW", WINDOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
