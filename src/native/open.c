/* wgpy._native: receiving. A Session is a receiving key and its replay window;
 * open_batch opens one UDP (GRO) read of data messages, the crypto on the pool. */

#include "native.h"

#include <limits.h>
#include <sys/uio.h>

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

PyTypeObject SessionType = {
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

/* Decrypt and verify one message. key NULL: the one ctx was last given (it keeps it; the
 * key setup costs ~4% of a 1420-byte packet's open, so a run of one session pays it once). */
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
    const uint8_t *keyed = NULL; /* the key ctx was given in this chunk (none after a failure) */
    for (Py_ssize_t i = lo; i < hi; i++) {
        Rec *r = &j->recs[i];
        if (r->verdict != V_PENDING)
            continue;
        const uint8_t *key = j->slots[r->slot].key;
        r->verdict = aead_open(ctx, key == keyed ? NULL : key, r->counter,
                               j->buf + r->off + HEADER_LEN, (int)(r->len - DATA_MIN),
                               j->out + r->off) ? V_OPENED : D_BAD_TAG;
        keyed = r->verdict == V_OPENED ? key : NULL;
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

/* Without the GIL, after check_opened: zero every byte of out that no packet will be read
 * from (tags, padding, what failed), so that the buffer Python holds carries nothing but
 * the packets: no stale heap memory, no plaintext of a dropped message. */
static void clear_gaps(uint8_t *out, const Rec *recs, Py_ssize_t nrecs)
{
    for (Py_ssize_t i = 0; i < nrecs; i++) {
        uint32_t keep = recs[i].verdict == V_PACKET ? recs[i].plen : 0;
        memset(out + recs[i].off + keep, 0, recs[i].len - keep);
    }
}

/* A run's packets as a Spans over the call's buffer (recs begin..end-1, those V_PACKET). */
static PyObject *run_packets(PyObject *plain, const Rec *recs, Py_ssize_t begin,
                             Py_ssize_t end, Py_ssize_t count)
{
    Spans *spans = spans_new(plain, count);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = begin; spans && i < end; i++) {
        if (recs[i].verdict == V_PACKET)
            spans->span[k++] = (Span){recs[i].start, recs[i].plen};
    }
    return (PyObject *)spans;
}

/* Append one Python object, stolen (NULL: the error is already set). */
static int append_new(PyObject *list, PyObject *item)
{
    int rc = item != NULL ? PyList_Append(list, item) : -1;
    Py_XDECREF(item);
    return rc;
}

/* Where a V_PACKET record's inner source address lies in out, and its length. */
static const uint8_t *inner_source(const uint8_t *out, const Rec *r, uint32_t *len)
{
    const uint8_t *p = out + r->start;
    *len = p[0] >> 4 == 4 ? 4 : 16;
    return p[0] >> 4 == 4 ? p + 12 : p + 8;
}

/* Phase 4, with the GIL: the runs (session, inner source, Spans over plain), the others
 * (handshake-shaped datagrams) and the drop counts, in one pass over the records. */
static int sort_records(PyObject *plain, const Rec *recs, Py_ssize_t nrecs, const Slot *slots,
                        PyObject *runs, PyObject *others, Py_ssize_t *drops)
{
    const uint8_t *out = (const uint8_t *)PyBytes_AS_STRING(plain), *run_src = NULL;
    Py_ssize_t run_first = 0, run_count = 0, run_slot = -1;
    uint32_t run_srclen = 0;
    for (Py_ssize_t i = 0; i <= nrecs; i++) {
        const Rec *r = i < nrecs ? &recs[i] : NULL;
        uint32_t srclen = 0;
        const uint8_t *src = r && r->verdict == V_PACKET ? inner_source(out, r, &srclen) : NULL;
        /* a run ends at the end, or at a packet of another session or inner source */
        if (run_count && (r == NULL || (src && (r->slot != run_slot || srclen != run_srclen
                                                || memcmp(src, run_src, srclen))))) {
            PyObject *spans = run_packets(plain, recs, run_first, i, run_count);
            if (append_new(runs, Py_BuildValue("(Oy#N)", (PyObject *)slots[run_slot].s, run_src,
                                               (Py_ssize_t)run_srclen, spans)) < 0)
                return -1;
            run_count = 0;
        }
        if (r == NULL)
            break;
        if (src) {
            if (run_count == 0)
                run_first = i, run_slot = r->slot, run_src = src, run_srclen = srclen;
            run_count++;
        } else if (r->verdict == V_OTHER) {
            if (append_new(others, Py_BuildValue("(II)", (unsigned)r->off, (unsigned)r->len)) < 0)
                return -1;
        } else if (r->verdict < N_DROPS) {
            drops[r->verdict]++;
        }
    }
    return 0;
}

/* [(session, bytes, any data?)] of the sessions with an authenticated message, in the
 * order their first one came. */
static PyObject *per_session(const Slot *slots, Py_ssize_t nslots)
{
    Py_ssize_t naccounted = 0;
    for (Py_ssize_t i = 0; i < nslots; i++)
        naccounted += slots[i].order >= 0;
    PyObject *per = PyList_New(naccounted);
    for (Py_ssize_t i = 0; per && i < nslots; i++) {
        if (slots[i].order < 0)
            continue;
        PyObject *t = Py_BuildValue("(OKO)", (PyObject *)slots[i].s,
                                    (unsigned long long)slots[i].nbytes,
                                    slots[i].data ? Py_True : Py_False);
        if (t == NULL)
            Py_CLEAR(per);
        else
            PyList_SET_ITEM(per, slots[i].order, t);
    }
    return per;
}

/* {reason: count} for the reasons that dropped something, as the pure open's (an empty
 * dict for a read that opened whole: nothing for the caller to go through, a lone
 * packet's hop); the reasons' names made once (a str made and hashed per reason and call
 * was ~0.5 us of every read). */
static PyObject *drop_counts(const Py_ssize_t *drops)
{
    static PyObject *names[N_DROPS];
    PyObject *dd = PyDict_New();
    for (int k = 0; dd && k < N_DROPS; k++) {
        if (drops[k] == 0)
            continue;
        if (names[k] == NULL && (names[k] = PyUnicode_InternFromString(drop_names[k])) == NULL) {
            Py_CLEAR(dd);
            break;
        }
        PyObject *v = PyLong_FromSsize_t(drops[k]);
        if (v == NULL || PyDict_SetItem(dd, names[k], v) < 0)
            Py_CLEAR(dd);
        Py_XDECREF(v);
    }
    return dd;
}

/* Phase 4, with the GIL: the Python result; the runs' packets as Spans over `plain`. */
static PyObject *open_result(PyObject *plain, const Rec *recs, Py_ssize_t nrecs,
                             const Slot *slots, Py_ssize_t nslots)
{
    Py_ssize_t drops[N_DROPS] = {0};
    PyObject *runs = PyList_New(0), *others = PyList_New(0);
    if (runs == NULL || others == NULL
        || sort_records(plain, recs, nrecs, slots, runs, others, drops) < 0) {
        Py_XDECREF(runs);
        Py_XDECREF(others);
        return NULL;
    }
    PyObject *per = per_session(slots, nslots), *dd = per ? drop_counts(drops) : NULL;
    if (dd == NULL) {
        Py_DECREF(runs);
        Py_DECREF(others);
        Py_XDECREF(per);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", runs, per, others, dd);
}

/* The slot of the session `index` names in this call (made on its first datagram: a
 * reference and a copy of its key, taken under its lock); -1 if none, -2 on an error. */
static Py_ssize_t slot_for(PyObject *sessions, uint32_t index, Slot *slots, Py_ssize_t *nslots,
                           uint64_t serial)
{
    PyObject *key = PyLong_FromUnsignedLong(index);
    if (key == NULL)
        return -2;
    PyObject *v = PyDict_GetItemWithError(sessions, key); /* borrowed */
    Py_DECREF(key);
    if (v == NULL)
        return PyErr_Occurred() ? -2 : -1;
    if (!PyObject_TypeCheck(v, &SessionType)) {
        PyErr_SetString(PyExc_TypeError, "sessions maps an index to a Session");
        return -2;
    }
    Session *s = (Session *)v;
    if (s->batch == serial && s->slot < *nslots && slots[s->slot].s == s)
        return s->slot;
    Py_INCREF(v);
    slots[*nslots] = (Slot){.s = s, .order = -1};
    lock_gil_held(s->lock); /* the key, as it is now */
    memcpy(slots[*nslots].key, s->key, KEY_LEN);
    PyThread_release_lock(s->lock);
    s->batch = serial;
    return s->slot = (*nslots)++;
}

/* Phase 1, with the GIL: split the read, classify each datagram, find each data message's
 * session. -1 on an error (the slots made so far are in *nslots, for the caller to free). */
static int find_sessions(const uint8_t *buf, Py_ssize_t nbytes, Py_ssize_t step, Rec *recs,
                         Py_ssize_t nrecs, PyObject *sessions, Slot *slots, Py_ssize_t *nslots,
                         double now)
{
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
            last_index = index;
            last_slot = slot_for(sessions, index, slots, nslots, serial);
            if (last_slot == -2)
                return -1;
        }
        if (last_slot < 0)
            r->verdict = D_UNKNOWN;
        else if (r->counter >= REJECT_AFTER_MESSAGES || now >= slots[last_slot].s->expires)
            r->verdict = D_EXPIRED;
        else
            r->verdict = V_PENDING, r->slot = last_slot;
    }
    return 0;
}

PyObject *open_batch(PyObject *Py_UNUSED(module), PyObject *args)
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
    PyObject *plain = NULL; /* the plaintexts: one bytes per call, the runs' Spans point in */
    Py_ssize_t nslots = 0;
    const uint8_t *buf = in.buf;
    if (nbytes < 0 || nbytes > in.len || nbytes > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= nbytes <= len(buf)");
        goto done;
    }
    Py_ssize_t step = seg > 0 && seg < nbytes ? seg : nbytes;
    Py_ssize_t nrecs = nbytes ? (nbytes + step - 1) / step : 1; /* 0: one empty datagram */
    recs = PyMem_Malloc((size_t)nrecs * sizeof(Rec));
    slots = PyMem_Malloc((size_t)nrecs * sizeof(Slot));
    plain = PyBytes_FromStringAndSize(NULL, nbytes); /* written to only if nbytes > 0 */
    if (recs == NULL || slots == NULL || plain == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    if (find_sessions(buf, nbytes, step, recs, nrecs, sessions, slots, &nslots, now) < 0)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(plain); /* ours alone until the Spans */
    OpenJob job = {buf, out, recs, nrecs, slots, 1};
    Py_BEGIN_ALLOW_THREADS
    job.nchunks = chunks_for(nrecs);
    pool_run(open_chunk, &job, job.nchunks);
    check_opened(out, recs, nrecs, slots);
    clear_gaps(out, recs, nrecs);
    Py_END_ALLOW_THREADS
    result = open_result(plain, recs, nrecs, slots, nslots);
done:
    for (Py_ssize_t i = 0; i < nslots; i++) {
        OPENSSL_cleanse(slots[i].key, KEY_LEN);
        Py_DECREF(slots[i].s);
    }
    PyMem_Free(recs);
    PyMem_Free(slots);
    Py_XDECREF(plain);
    PyBuffer_Release(&in);
    return result;
}


/* ------------------------------------------------------------------ open_lone */

/* A lone read's hop to the TUN in one call (io/datapath.py `_open_lone`; docs/design.md
 * "Latency: a lone packet"): what open_batch, data.open_read's source check and
 * Tun.write_batch do to one data message, without a Python object on the way. The
 * message is opened in place, in the caller's receive buffer, and every byte of it past
 * the header is zeroed before the call returns (no plaintext left behind). */

enum { L_NOT_ALLOWED = V_OPENED + 1 }; /* dropped: the inner source is not the peer's */

typedef struct {
    int verdict;   /* a drop (< N_DROPS, L_NOT_ALLOWED), V_KEEPALIVE or V_PACKET */
    uint32_t plen; /* V_PACKET: the inner packet's length, at p + HEADER_LEN */
} Lone;

/* Without the GIL, the session's lock held: phases 2-3 of open_batch for one message of
 * n bytes at p (wiped since the expiry check, the tag, the replay window, the inner
 * packet), its plaintext written over its ciphertext. */
static void lone_open(Session *s, uint8_t *p, uint32_t n, uint64_t counter, Lone *l)
{
    uint32_t clen = n - DATA_MIN;
    uint8_t *plain = p + HEADER_LEN;
    if (s->wiped)
        l->verdict = D_EXPIRED;
    else if (!aead_open(thread_ctx(0), s->key, counter, plain, (int)clen, plain))
        l->verdict = D_BAD_TAG;
    else if (!replay_accept(s, counter)) /* the window moves only after the tag */
        l->verdict = D_REPLAYED;
    else if (clen == 0)
        l->verdict = V_KEEPALIVE;
    else
        l->verdict = (l->plen = inner_length(plain, clen)) ? V_PACKET : D_BAD_INNER;
}

/* The TUN write of the packet at p (behind a zero virtio header where vnet), as
 * write_tun's of a lone packet, the GIL released: 0 or the errno. */
static int lone_write(int fd, int vnet, const uint8_t *p, uint32_t len)
{
    static const uint8_t zeros[VNET_LEN];
    struct iovec iov[2] = {{(void *)zeros, VNET_LEN}, {(void *)p, len}};
    ssize_t w;
    Py_BEGIN_ALLOW_THREADS
    do
        w = writev(fd, iov + !vnet, 2 - !vnet);
    while (w < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    return w < 0 ? errno : 0;
}

/* A failed write as Tun.write_batch's failures: [(errno, what was written)]. */
static PyObject *lone_failed(int err, int vnet, const uint8_t *p, uint32_t len)
{
    Py_ssize_t head = vnet ? VNET_LEN : 0;
    PyObject *b = PyBytes_FromStringAndSize(NULL, head + (Py_ssize_t)len);
    if (b == NULL)
        return NULL;
    memset(PyBytes_AS_STRING(b), 0, (size_t)head);
    memcpy(PyBytes_AS_STRING(b) + head, p, len);
    return Py_BuildValue("[(iN)]", err, b);
}

/* With the GIL, an opened packet: its inner source's owner in routes against the peer of
 * the session's keypair (data.open_read's check), then the write (l->verdict
 * L_NOT_ALLOWED where the check fails); *failed: the failed write or NULL.
 * -1 with an exception. */
static int lone_deliver(PyObject *kp, PyObject *routes, int fd, int vnet, PyObject *writer,
                        const uint8_t *pkt, Lone *l, PyObject **failed)
{
    static PyObject *peer_name;
    if (peer_name == NULL && (peer_name = PyUnicode_InternFromString("peer")) == NULL)
        return -1;
    PyObject *peer = PyObject_GetAttr(kp, peer_name);
    if (peer == NULL)
        return -1;
    int v4 = pkt[0] >> 4 == 4;
    PyObject *owner = routes_lookup(routes, v4 ? pkt + 12 : pkt + 8, v4 ? 4 : 16);
    Py_DECREF(peer); /* compared by identity only: the keypair holds it */
    if (owner != peer) {
        l->verdict = L_NOT_ALLOWED;
        return 0;
    }
    if (writer != Py_None)
        tun_writer_inlined(writer);
    int err = lone_write(fd, vnet, pkt, l->plen);
    return err && (*failed = lone_failed(err, vnet, pkt, l->plen)) == NULL ? -1 : 0;
}

/* The answer: (keypair or None, any data?, drop reason or None, failed writes or None). */
static PyObject *lone_result(PyObject *kp, const Lone *l, PyObject *failed)
{
    static PyObject *names[N_DROPS + 1];
    PyObject *drop = Py_None;
    if (l->verdict < N_DROPS || l->verdict == L_NOT_ALLOWED) {
        int k = l->verdict < N_DROPS ? l->verdict : N_DROPS;
        const char *name = k < N_DROPS ? drop_names[k] : "source_not_allowed";
        if (names[k] == NULL && (names[k] = PyUnicode_InternFromString(name)) == NULL) {
            Py_XDECREF(failed);
            return NULL;
        }
        drop = names[k];
    }
    int data = kp != NULL && l->verdict != V_KEEPALIVE; /* authenticated, not a keepalive */
    return Py_BuildValue("(OOON)", kp ? kp : Py_None, data ? Py_True : Py_False, drop,
                         failed ? failed : Py_NewRef(Py_None));
}

/* Phase 1 and the call's checks, with the GIL: the session of the message at p (a new
 * reference in *s), or a verdict made without it (l). 1: open it; 0: answered; 2: not
 * this module's Session (the pure backend's, where it was switched under a datapath: the
 * usual way, nothing touched); -1: an exception. */
static int lone_session(const uint8_t *p, PyObject *sessions, double now, Session **s, Lone *l)
{
    PyObject *key = PyLong_FromUnsignedLong(rd32le(p + 4));
    PyObject *v = key ? PyDict_GetItemWithError(sessions, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    if (v == NULL) {
        l->verdict = D_UNKNOWN;
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyObject_TypeCheck(v, &SessionType))
        return 2;
    *s = (Session *)Py_NewRef(v);
    if (rd64le(p + 8) >= REJECT_AFTER_MESSAGES || now >= (*s)->expires) {
        l->verdict = D_EXPIRED;
        return 0;
    }
    return 1;
}

/* Whether this read takes the lone way at all (decided before anything is touched): a
 * data message, a Routes mirror, and no TUN writer with anything queued or uncollected. */
static int lone_way(const uint8_t *p, Py_ssize_t n, PyObject *routes, PyObject *writer)
{
    return n >= DATA_MIN && rd32le(p) == 4 && PyObject_TypeCheck(routes, &RoutesType)
           && (writer == Py_None
               || (PyObject_TypeCheck(writer, &TunWriterType) && tun_writer_idle(writer)));
}

/* open_lone's arguments (METH_FASTCALL: no tuple of ten made per call); -1 with an
 * exception. buf: a writable buffer, released by the caller on success. */
typedef struct {
    Py_buffer in;
    Py_ssize_t off, n;
    PyObject *sessions, *keypairs, *routes, *writer;
    double now;
    int fd, vnet;
} LoneArgs;

static int lone_args(PyObject *const *args, Py_ssize_t nargs, LoneArgs *a)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "open_lone takes 10 arguments");
        return -1;
    }
    a->sessions = args[3], a->keypairs = args[4], a->routes = args[5], a->writer = args[9];
    if (!PyDict_Check(a->sessions) || !PyDict_Check(a->keypairs)) {
        PyErr_SetString(PyExc_TypeError, "sessions and keypairs are dicts");
        return -1;
    }
    a->off = PyLong_AsSsize_t(args[1]);
    a->n = a->off == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[2]);
    a->now = a->n == -1 && PyErr_Occurred() ? -1 : PyFloat_AsDouble(args[6]);
    long fd = a->now == -1 && PyErr_Occurred() ? -1 : PyLong_AsLong(args[7]);
    a->vnet = fd == -1 && PyErr_Occurred() ? -1 : PyObject_IsTrue(args[8]);
    if (a->vnet < 0)
        return -1;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return -1;
    }
    a->fd = (int)fd;
    return PyObject_GetBuffer(args[0], &a->in, PyBUF_WRITABLE);
}

PyObject *open_lone(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    LoneArgs a;
    if (lone_args(args, nargs, &a) < 0)
        return NULL;
    Py_buffer in = a.in;
    Py_ssize_t off = a.off, n = a.n;
    PyObject *sessions = a.sessions, *keypairs = a.keypairs, *routes = a.routes,
             *writer = a.writer, *result = NULL, *kp = NULL, *failed = NULL;
    double now = a.now;
    int fd = a.fd, vnet = a.vnet, opened = 0; /* the lone way taken: buf zeroed past the header */
    Session *s = NULL;
    Lone l = {V_PENDING, 0};
    uint8_t *p = in.buf;
    if (off < 0 || n < 0 || off > in.len || n > in.len - off || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= offset <= offset + n <= len(buf)");
        goto done;
    }
    p += off;
    if (!lone_way(p, n, routes, writer)) {
        result = Py_NewRef(Py_None); /* not the lone way: the caller takes the usual one */
        goto done;
    }
    int rc = lone_session(p, sessions, now, &s, &l);
    if (rc == 2) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    opened = 1;
    if (rc > 0) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(s->lock, WAIT_LOCK);
        lone_open(s, p, (uint32_t)n, rd64le(p + 8), &l);
        PyThread_release_lock(s->lock);
        Py_END_ALLOW_THREADS
        int authentic = l.verdict == V_KEEPALIVE || l.verdict == V_PACKET
                        || l.verdict == D_BAD_INNER;
        if (authentic && (kp = PyDict_GetItemWithError(keypairs, (PyObject *)s)) == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, (PyObject *)s);
            goto done;
        }
        Py_XINCREF(kp);
        if (l.verdict == V_PACKET
            && lone_deliver(kp, routes, fd, vnet, writer, p + HEADER_LEN, &l, &failed) < 0)
            goto done;
    }
    if (rc >= 0)
        result = lone_result(kp, &l, failed);
done:
    if (opened) /* the plaintext and the tag (or ciphertext): nothing of it left in buf */
        memset(p + HEADER_LEN, 0, (size_t)n - HEADER_LEN);
    Py_XDECREF(kp);
    Py_XDECREF(s);
    PyBuffer_Release(&in);
    return result;
}
