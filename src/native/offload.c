/* wgpy._native: the TUN's offloads, as wgpy.io.offload computes them (the reference), and
 * write_tun, which makes coalesce's writes itself, gathered with writev from where the
 * packets lie (a Spans' buffer) and without the GIL. */

#include "native.h"

#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

/* ------------------------------------------------------------------ checksum */

/* One's-complement sum of big-endian 16-bit words (an odd byte padded), plus `acc`, folded:
 * never 0 unless everything was 0 (as offload.checksum). */
static uint64_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return s;
}

static unsigned csum(const uint8_t *p, size_t n, uint64_t acc)
{
    /* 32-bit words into four 64-bit sums, folded every MiB: no carries to chase, four
     * adds at once (2**32 == 1 modulo 0xFFFF, so they sum to what the 16-bit words do);
     * then 8 bytes at a time with an end-around carry (exact modulo 2**64 - 1, which
     * 0xFFFF divides) */
    uint64_t s = 0;
    size_t i = 0;
    while (n - i >= 16) {
        size_t end = i + ((n - i < (1u << 20) ? n - i : (1u << 20)) & ~(size_t)15);
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (; i < end; i += 16) {
            uint32_t w[4];
            memcpy(w, p + i, 16);
            s0 += w[0], s1 += w[1], s2 += w[2], s3 += w[3];
        }
        s += fold(s0) + fold(s1) + fold(s2) + fold(s3);
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        s += w;
        s += s < w;
    }
    unsigned r = (unsigned)fold(s);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    r = (r >> 8 | r << 8) & 0xFFFF; /* little-endian words summed: swap the sum (RFC 1071) */
#endif
    acc = fold(acc) + r;
    for (; i + 1 < n; i += 2)
        acc += rd16be(p + i);
    if (n & 1)
        acc += (uint64_t)p[n - 1] << 8;
    return (unsigned)fold(acc);
}

PyObject *checksum(PyObject *Py_UNUSED(module), PyObject *args)
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

/* One packet to coalesce: where it lies (a bytes-like's buffer or a span of a Spans). */
typedef struct {
    const uint8_t *p;
    size_t n;
} Pkt;

static PyObject *plain(const Pkt *v)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(VNET_LEN + v->n));
    if (b) {
        memset(PyBytes_AS_STRING(b), 0, VNET_LEN);
        memcpy(PyBytes_AS_STRING(b) + VNET_LEN, v->p, v->n);
    }
    return b;
}

/* The virtio header and the merged IP + L4 header of a run of two or more (_Run.build /
 * _UdpRun.build up to the payloads) into o, VNET_LEN + run->hlen bytes. */
static void run_header(const Run *run, const Pkt *pkts, uint8_t *o)
{
    uint8_t *h = o + VNET_LEN;
    const uint8_t *first = pkts[run->first].p;
    size_t l4 = run->l4, hlen = run->hlen, total = run->total;
    memcpy(h, first, hlen);
    set_ip_length(h, l4, (unsigned)total);
    if (run->udp) {
        wr16be(h + l4 + 4, (unsigned)(total - l4));
        wr16be(h + l4 + 6, pseudo_sum(first, 17, total - l4));
        vnet(o, 1, 5, (unsigned)hlen, (unsigned)run->gso, (unsigned)l4, 6);
    } else {
        wr16be(h + l4 + 16, pseudo_sum(first, 6, total - l4));
        h[l4 + 13] = pkts[run->last].p[l4 + 13];
        vnet(o, 1, l4 == 20 ? 1 : 4, (unsigned)hlen, (unsigned)run->gso, (unsigned)l4, 16);
    }
}

/* A run of two or more as one buffer at o (VNET_LEN + run->total bytes). */
static void run_fill(const Run *run, const Pkt *pkts, const Py_ssize_t *next, uint8_t *o)
{
    uint8_t *at = o + VNET_LEN + run->hlen;
    run_header(run, pkts, o);
    for (Py_ssize_t i = run->first; i >= 0; i = next[i]) {
        size_t len = pkts[i].n - run->hlen;
        memcpy(at, pkts[i].p + run->hlen, len);
        at += len;
    }
}

/* _Run.build / _UdpRun.build for a run of two or more */
static PyObject *run_build(const Run *run, const Pkt *pkts, const Py_ssize_t *next)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(VNET_LEN + run->total));
    if (b != NULL)
        run_fill(run, pkts, next, (uint8_t *)PyBytes_AS_STRING(b));
    return b;
}

/* The packets of a tuple of bytes-likes and Spans, in order, as one array (*count long).
 * The buffers of the bytes-likes are taken into views (one per item; a Spans leaves its
 * view empty: the tuple holds the Spans and the Spans its bytes). NULL with an exception. */
static Pkt *gather(PyObject *tuple, Py_buffer *views, Py_ssize_t *count)
{
    Py_ssize_t nitems = PyTuple_GET_SIZE(tuple), n = 0, k = 0;
    for (Py_ssize_t i = 0; i < nitems; i++) {
        PyObject *it = PyTuple_GET_ITEM(tuple, i);
        n += PyObject_TypeCheck(it, &SpansType) ? Py_SIZE(it) : 1;
    }
    Pkt *pkts = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Pkt));
    if (pkts == NULL)
        return (Pkt *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < nitems; i++) {
        PyObject *it = PyTuple_GET_ITEM(tuple, i);
        if (PyObject_TypeCheck(it, &SpansType)) {
            const Spans *sp = (const Spans *)it;
            const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(sp->buf);
            for (Py_ssize_t j = 0; j < Py_SIZE(sp); j++)
                pkts[k++] = (Pkt){base + sp->span[j].off, sp->span[j].len};
        } else if (PyObject_GetBuffer(it, &views[i], PyBUF_SIMPLE) < 0) {
            PyMem_Free(pkts);
            return NULL;
        } else {
            pkts[k++] = (Pkt){views[i].buf, (size_t)views[i].len};
        }
    }
    *count = n;
    return pkts;
}

typedef struct {
    Run *runs;
    Py_ssize_t *next;  /* the member after each packet in its run, -1 at the end */
    Py_ssize_t *items; /* the writes in order: a packet alone (>= 0) or run -1 - item */
    Entry *table;      /* flow key -> its open run */
    size_t cap;
    Py_ssize_t nruns, nitems;
} Plan;

/* Which packets merge into which writes (offload.coalesce's loop). */
static void plan(Plan *pl, const Pkt *pkts, Py_ssize_t n, int udp)
{
    uint64_t gen = 1;
    Run *runs = pl->runs;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = pkts[i].p;
        size_t len = pkts[i].n;
        Class c;
        int kind = classify(p, len, &c);
        pl->next[i] = -1;
        if (kind == C_NONE || (c.udp && !udp) || kind == C_UNPLACEABLE) {
            gen += kind == C_UNPLACEABLE; /* every open run ends */
            pl->items[pl->nitems++] = i;
            continue;
        }
        Entry *e = lookup(pl->table, pl->cap - 1, &c);
        Py_ssize_t r = e->klen && e->gen == gen ? e->run : -1;
        if (!c.hlen) {
            e->run = -1;
            pl->items[pl->nitems++] = i;
            continue;
        }
        if (r >= 0 && run_take(&runs[r], pkts[runs[r].first].p, p, len, c.hlen)) {
            pl->next[runs[r].last] = i;
            runs[r].last = i;
        } else {
            r = pl->nruns++;
            run_start(&runs[r], i, p, len, &c);
            pl->items[pl->nitems++] = -1 - r;
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
}

/* The writes a plan makes, as a list of bytes. */
static PyObject *build(const Plan *pl, const Pkt *pkts)
{
    PyObject *result = PyList_New(pl->nitems);
    for (Py_ssize_t k = 0; result && k < pl->nitems; k++) {
        Py_ssize_t it = pl->items[k];
        const Run *run = it < 0 ? &pl->runs[-1 - it] : NULL;
        PyObject *b = run == NULL ? plain(&pkts[it])
                      : run->count == 1 ? plain(&pkts[run->first])
                                         : run_build(run, pkts, pl->next);
        if (b == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, k, b);
    }
    return result;
}

/* A batch of TUN writes: the items (a tuple), their packets and the plan. */
typedef struct {
    PyObject *tuple;
    Py_buffer *views;
    Pkt *pkts;
    Py_ssize_t nitems, n;
    Plan pl;
} Batch;

static void batch_free(Batch *b)
{
    if (b->views)
        release_buffers(b->views, b->nitems);
    PyMem_Free(b->pkts);
    PyMem_Free(b->pl.runs);
    PyMem_Free(b->pl.next);
    PyMem_Free(b->pl.items);
    PyMem_Free(b->pl.table);
    Py_XDECREF(b->tuple);
}

/* Gather the packets of `packets` (packets and Spans) and plan their writes; -1 with an
 * exception. batch_free in either case. */
static int batch_plan(Batch *b, PyObject *packets, int udp)
{
    b->tuple = PySequence_Tuple(packets); /* see get_buffers */
    if (b->tuple == NULL)
        return -1;
    b->nitems = PyTuple_GET_SIZE(b->tuple);
    b->views = PyMem_Calloc(b->nitems ? (size_t)b->nitems : 1, sizeof(Py_buffer));
    b->pkts = b->views ? gather(b->tuple, b->views, &b->n) : (Pkt *)PyErr_NoMemory();
    if (b->pkts == NULL)
        return -1;
    Plan *pl = &b->pl;
    size_t n = (size_t)b->n;
    for (pl->cap = 16; pl->cap < 2 * n;)
        pl->cap *= 2;
    pl->runs = PyMem_Calloc(n + 1, sizeof(Run));
    pl->next = PyMem_Calloc(n + 1, sizeof(Py_ssize_t));
    pl->items = PyMem_Calloc(n + 1, sizeof(Py_ssize_t));
    pl->table = PyMem_Calloc(pl->cap, sizeof(Entry));
    if (pl->runs == NULL || pl->next == NULL || pl->items == NULL || pl->table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    plan(pl, b->pkts, b->n, udp);
    return 0;
}

/* coalesce(items, udp=True): items are packets (bytes-likes) and Spans (a run of opened
 * packets each, read in place), in the order they go to the TUN. */
PyObject *coalesce(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"packets", "udp", NULL};
    PyObject *packets;
    int udp = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:coalesce", kwlist, &packets, &udp))
        return NULL;
    Batch b = {0};
    PyObject *result = batch_plan(&b, packets, udp) == 0 ? build(&b.pl, b.pkts) : NULL;
    batch_free(&b);
    return result;
}

/* ------------------------------------------------------------------ write_tun */


/* Write item k of a plan to fd without the GIL, gathered from where its packets lie: a
 * packet alone behind a zero virtio header, or a run's header (built) and its members'
 * payloads. 0, or the errno of the write. */
static int write_item(int fd, const Plan *pl, const Pkt *pkts, Py_ssize_t k, struct iovec *iov)
{
    static const uint8_t zeros[VNET_LEN];
    uint8_t hdr[VNET_LEN + 128], *copy = NULL;
    Py_ssize_t it = pl->items[k];
    const Run *run = it < 0 ? &pl->runs[-1 - it] : NULL;
    int cnt = 0;
    if (run == NULL || run->count == 1) {
        const Pkt *p = &pkts[run ? run->first : it];
        iov[cnt++] = (struct iovec){(void *)zeros, VNET_LEN};
        iov[cnt++] = (struct iovec){(void *)p->p, p->n};
    } else if (run->count < IOV_CAP && VNET_LEN + run->hlen <= sizeof hdr) {
        run_header(run, pkts, hdr);
        iov[cnt++] = (struct iovec){hdr, VNET_LEN + run->hlen};
        for (Py_ssize_t i = run->first; i >= 0; i = pl->next[i])
            iov[cnt++] = (struct iovec){(void *)(pkts[i].p + run->hlen), pkts[i].n - run->hlen};
    } else if ((copy = PyMem_RawMalloc(VNET_LEN + run->total)) != NULL) {
        run_fill(run, pkts, pl->next, copy);
        iov[cnt++] = (struct iovec){copy, VNET_LEN + run->total};
    } else {
        return ENOMEM;
    }
    ssize_t w;
    do
        w = writev(fd, iov, cnt);
    while (w < 0 && errno == EINTR);
    int err = w < 0 ? errno : 0;
    PyMem_RawFree(copy);
    return err;
}

/* Append (errno, the write as bytes) to list for each write of a plan that failed. */
static int append_failures(PyObject *list, const Plan *pl, const Pkt *pkts, const int *errs)
{
    for (Py_ssize_t k = 0; k < pl->nitems; k++) {
        if (!errs[k])
            continue;
        Py_ssize_t it = pl->items[k];
        const Run *run = it < 0 ? &pl->runs[-1 - it] : NULL;
        PyObject *b = run == NULL ? plain(&pkts[it])
                      : run->count == 1 ? plain(&pkts[run->first])
                                         : run_build(run, pkts, pl->next);
        PyObject *t = b ? Py_BuildValue("(iN)", errs[k], b) : NULL;
        int rc = t ? PyList_Append(list, t) : -1;
        Py_XDECREF(t);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* A planned batch of TUN writes that outlives its call (the TUN writer's queue, writer.c):
 * the batch holds its items (and through them their buffers) until tun_batch_free. Made
 * and freed with the GIL; tun_batch_write touches no Python object, so any thread may
 * make the writes. */
struct TunBatch {
    Batch b;
    int *errs; /* each write's errno, 0 if it went */
};

TunBatch *tun_batch_new(PyObject *packets, int udp)
{
    TunBatch *t = PyMem_Calloc(1, sizeof *t);
    if (t == NULL)
        return (TunBatch *)PyErr_NoMemory();
    if (batch_plan(&t->b, packets, udp) < 0
        || (t->errs = PyMem_Calloc((size_t)t->b.pl.nitems + 1, sizeof(int))) == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        tun_batch_free(t);
        return NULL;
    }
    return t;
}

Py_ssize_t tun_batch_packets(const TunBatch *t)
{
    return t->b.n;
}

/* Every write of the batch, in order, to fd (iov: IOV_CAP entries of the caller's). */
void tun_batch_write(TunBatch *t, int fd, struct iovec *iov)
{
    for (Py_ssize_t k = 0; k < t->b.pl.nitems; k++)
        t->errs[k] = write_item(fd, &t->b.pl, t->b.pkts, k, iov);
}

/* Append the failed writes to list, as write_tun returns them; -1 with an exception. */
int tun_batch_failures(const TunBatch *t, PyObject *list)
{
    return append_failures(list, &t->b.pl, t->b.pkts, t->errs);
}

void tun_batch_free(TunBatch *t)
{
    if (t != NULL) {
        batch_free(&t->b);
        PyMem_Free(t->errs);
        PyMem_Free(t);
    }
}

/* write_tun(fd, items, udp=True): coalesce's writes made with writev straight from where
 * the packets lie (a Spans' buffer: no copy), the GIL released while writing. */
PyObject *write_tun(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, udp = 1;
    PyObject *packets, *result = NULL;
    if (!PyArg_ParseTuple(args, "iO|p:write_tun", &fd, &packets, &udp))
        return NULL;
    struct iovec *iov = PyMem_Malloc(IOV_CAP * sizeof(struct iovec));
    TunBatch *t = iov ? tun_batch_new(packets, udp) : (TunBatch *)PyErr_NoMemory();
    if (t != NULL) {
        Py_BEGIN_ALLOW_THREADS
        tun_batch_write(t, fd, iov);
        Py_END_ALLOW_THREADS
        result = PyList_New(0);
        if (result != NULL && tun_batch_failures(t, result) < 0)
            Py_CLEAR(result);
    }
    tun_batch_free(t);
    PyMem_Free(iov);
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

/* core/ip.py _layout: where a super-packet's headers end and how many segments of `mss`
 * payload bytes it makes; 0 for one it refuses (an IPv4 header under 20 bytes, a segment
 * whose IP length field would pass 65535, ...). */
int cut_plan(Cut *c, const uint8_t *pkt, size_t len, int udp, Py_ssize_t mss, size_t l4)
{
    unsigned version = len ? pkt[0] >> 4 : 0;
    if (version == 4 && (pkt[0] & 15) >= 5)
        c->iphl = (size_t)(pkt[0] & 15) * 4;
    else if (version == 6)
        c->iphl = 40;
    else
        return 0;
    l4 = l4 ? l4 : c->iphl;
    if (l4 < c->iphl || l4 + (udp ? 8 : 20) > len)
        return 0;
    size_t thl = udp ? 8 : (size_t)(pkt[l4 + 12] >> 4) * 4, hlen = l4 + thl;
    if (mss <= 0 || thl < (udp ? 8u : 20u) || hlen > len)
        return 0;
    size_t n = len - hlen, most = n < (size_t)mss ? n : (size_t)mss;
    if (hlen + most - (version == 6 ? 40 : 0) > 0xFFFF) /* the IP length field */
        return 0;
    c->pkt = pkt, c->udp = udp, c->v4 = version == 4;
    c->l4 = l4, c->thl = thl, c->hlen = hlen, c->n = n, c->mss = (size_t)mss;
    c->count = n ? (n + (size_t)mss - 1) / (size_t)mss : 1;
    c->base = pseudo_sum(pkt, udp ? 17 : 6, 0), c->ip_id = rd16be(pkt + 4);
    c->seq = rd32be(pkt + l4 + 4);
    c->flags = udp ? 0 : pkt[l4 + 13];
    return 1;
}

/* The length of segment i (< c->count) of a planned super-packet. */
size_t cut_length(const Cut *c, size_t i)
{
    size_t off = i * c->mss;
    return c->hlen + (c->n - off < c->mss ? c->n - off : c->mss);
}

/* Write segment i of a planned super-packet to o (cut_length bytes): the headers with
 * their lengths, IPv4 id, sequence number, flags and checksums, then its payload
 * (core/ip.py segment, byte for byte). Touches no Python object: any thread may. */
void cut_write(const Cut *c, size_t i, uint8_t *o)
{
    size_t off = i * c->mss, l4 = c->l4, hlen = c->hlen;
    size_t chunk = c->n - off < c->mss ? c->n - off : c->mss, l4len = c->thl + chunk;
    size_t csum_at = l4 + (c->udp ? 6 : 16);
    memcpy(o, c->pkt, hlen);
    memcpy(o + hlen, c->pkt + hlen + off, chunk);
    if (c->v4)
        wr16be(o + 4, (c->ip_id + (unsigned)i) & 0xFFFF);
    set_ip_length(o, c->iphl, (unsigned)(l4 + l4len));
    if (c->udp) {
        wr16be(o + l4 + 4, (unsigned)l4len);
    } else {
        wr32be(o + l4 + 4, c->seq + (uint32_t)off);
        unsigned f = i == 0 ? c->flags : c->flags & ~0x80u;
        o[l4 + 13] = (uint8_t)(off + c->mss >= c->n ? f : f & ~(PSH | 0x01u));
    }
    o[csum_at] = o[csum_at + 1] = 0;
    unsigned s = ~csum(o + hlen, chunk, csum(o + l4, c->thl, c->base + l4len)) & 0xFFFF;
    wr16be(o + csum_at, c->udp && !s ? 0xFFFF : s);
}

/* Every segment of a super-packet appended to list (none if it is refused). */
static int segment(PyObject *list, const uint8_t *pkt, size_t len, int udp, Py_ssize_t mss, size_t l4)
{
    Cut c;
    if (!cut_plan(&c, pkt, len, udp, mss, l4))
        return 0;
    uint8_t *o = PyMem_Malloc(cut_length(&c, 0));
    if (o == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < c.count; i++) {
        cut_write(&c, i, o);
        if (append_bytes(list, o, cut_length(&c, i)) < 0) {
            PyMem_Free(o);
            return -1;
        }
    }
    PyMem_Free(o);
    return 0;
}

/* A super-packet (core/ip.py SuperPacket: packet, mss, l4, udp, ...) parsed; its packet's
 * buffer in *v (to release). 0, or -1 with an exception. */
int super_packet_args(PyObject *sp, Py_buffer *v, Py_ssize_t *mss, size_t *l4, int *udp)
{
    if (!PyTuple_Check(sp) || PyTuple_GET_SIZE(sp) < 4) {
        PyErr_SetString(PyExc_TypeError, "a super-packet is (packet, mss, l4, udp, ...)");
        return -1;
    }
    Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(sp, 2));
    *mss = PyLong_AsSsize_t(PyTuple_GET_ITEM(sp, 1));
    *udp = PyObject_IsTrue(PyTuple_GET_ITEM(sp, 3));
    if (PyErr_Occurred() || *udp < 0)
        return -1;
    *l4 = at < 0 ? 0xFFFFFF : (size_t)at; /* a negative offset: refused by cut_plan */
    return PyObject_GetBuffer(PyTuple_GET_ITEM(sp, 0), v, PyBUF_SIMPLE);
}

PyObject *segments(PyObject *Py_UNUSED(module), PyObject *sp)
{
    Py_buffer v;
    Py_ssize_t mss;
    size_t l4;
    int udp;
    if (super_packet_args(sp, &v, &mss, &l4, &udp) < 0)
        return NULL;
    PyObject *list = PyList_New(0);
    if (list != NULL && segment(list, v.buf, (size_t)v.len, udp, mss, l4) < 0)
        Py_CLEAR(list);
    PyBuffer_Release(&v);
    return list;
}

PyObject *split(PyObject *Py_UNUSED(module), PyObject *args)
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

/* ------------------------------------------------------------------ reads */

/* read_nowait(fd, buf) -> bytes read, or -1 when nothing waits: one read() of a
 * non-blocking descriptor (the TUN). os.readv raises BlockingIOError for the EAGAIN that
 * ends every drain, and making and catching that exception cost a lone packet (a ping)
 * tens of microseconds once the caches had gone cold. The GIL stays held: a non-blocking
 * read never waits. */
PyObject *read_nowait(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "iw*:read_nowait", &fd, &v))
        return NULL;
    ssize_t n;
    do {
        n = read(fd, v.buf, (size_t)v.len);
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    int err = errno;
    PyBuffer_Release(&v);
    if (n >= 0)
        return PyLong_FromSsize_t(n);
    if (PyErr_Occurred()) /* a signal handler raised */
        return NULL;
    if (err == EAGAIN || err == EWOULDBLOCK)
        return PyLong_FromLong(-1);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* read_packet(fd, header, size) -> bytes | None: one read of a non-blocking descriptor
 * (the TUN, with its virtio header) gathered with readv: the header into `header` (a
 * writable buffer of VNET_LEN bytes; zeros past a read shorter than that; a checksum the
 * kernel left to finish comes finished, `finish_checksum`), the packet into
 * a bytes object `size` bytes long kept for the next read (`spare`), handed over cut to
 * what came when that is more than SMALL_READ bytes, copied out when less. So a TSO read
 * of 64 KiB is kept as the kernel wrote it (read_nowait into a reused buffer needs a copy
 * out of it for every read that is kept: ~4 us for 64 KiB, 2.5% of the sending daemon),
 * and a lone packet costs what it did (a small copy, no allocation of 64 KiB: 6 us more
 * for a ping's hop when the caches are cold). None when nothing waits (EAGAIN: no
 * exception). The GIL stays held: a non-blocking read never waits, and `spare` is ours
 * but for a signal's handler (taken out of it before the read: see below). */
#define SMALL_READ 4096
static PyObject *spare; /* a bytes object no one else has seen */

/* A read whose header asks only for its checksum to be finished (NEEDS_CSUM without GSO:
 * the kernel's TCP ACKs), finished here as `split` would and its header zeroed: the caller
 * takes it for the plain packet it now is (no `split` call, no copies). One whose checksum
 * field lies past its end is left as it came (`split` drops it). */
static void finish_checksum(uint8_t *h, uint8_t *pkt, size_t len)
{
    size_t start = (size_t)(h[6] | h[7] << 8), at = start + (size_t)(h[8] | h[9] << 8);
    if (!(h[0] & 1) || (h[1] & ~0x80u) || at + 2 > len)
        return;
    unsigned c = ~csum(pkt + start, len - start, 0) & 0xFFFF; /* the field: the pseudo-sum */
    wr16be(pkt + at, c ? c : 0xFFFF); /* 0 means "none" for UDP: 0xFFFF, as split */
    memset(h, 0, VNET_LEN); /* a plain packet's header */
}

PyObject *read_packet(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    Py_buffer hdr;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "iw*n:read_packet", &fd, &hdr, &size))
        return NULL;
    PyObject *packet = NULL;
    if (hdr.len != VNET_LEN || size < 0) {
        PyErr_SetString(PyExc_ValueError, "a 10-byte header buffer and size >= 0");
        goto done;
    }
    /* taken out of `spare` first: a signal handler that PyErr_CheckSignals runs may call
     * read_packet too, and must not take (or free) the buffer this readv reads into */
    PyObject *buf = spare;
    spare = NULL;
    if (buf != NULL && Py_SIZE(buf) != size)
        Py_CLEAR(buf);
    if (buf == NULL && (buf = PyBytes_FromStringAndSize(NULL, size)) == NULL)
        goto done;
    struct iovec iov[2] = {{hdr.buf, VNET_LEN}, {PyBytes_AS_STRING(buf), (size_t)size}};
    ssize_t n;
    do {
        n = readv(fd, iov, 2);
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    int err = errno;
    if (n >= 0) {
        Py_ssize_t got = n > VNET_LEN ? (Py_ssize_t)n - VNET_LEN : 0;
        if (n < VNET_LEN)
            memset((uint8_t *)hdr.buf + n, 0, (size_t)(VNET_LEN - n));
        finish_checksum(hdr.buf, (uint8_t *)PyBytes_AS_STRING(buf), (size_t)got);
        if (got <= SMALL_READ) {
            packet = PyBytes_FromStringAndSize(PyBytes_AS_STRING(buf), got);
        } else {
            packet = buf, buf = NULL;
            _PyBytes_Resize(&packet, got); /* NULL, with the exception, if it failed */
        }
    } else if (!PyErr_Occurred()) { /* else a signal handler raised */
        if (err == EAGAIN || err == EWOULDBLOCK) {
            packet = Py_NewRef(Py_None);
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    if (buf != NULL && spare == NULL)
        spare = buf; /* for the next read (unless a handler's read left one: that one) */
    else
        Py_XDECREF(buf); /* a bytes object: its free runs no Python code */
done:
    PyBuffer_Release(&hdr);
    return packet;
}
