/* wgpy._native: the UDP sends of what the core sealed (issue 17 items 2 and 4).
 *
 *   send_runs(fd, runs, dests, dest, gso)   io/udp.py UdpSocket.send_runs, the reference,
 *                                           in one call with the GIL released
 *   UdpSender(depth=4, inline=8)            the same sends made by a thread of its own
 *                                           (stage.c), in order, from a bounded queue
 *   seal_send(fd, dests, dest, sender, packet, routes, now, mtu, unsettled)
 *                                           a lone packet's whole hop: routed, sealed, sent
 *
 * `runs` is core/output.py `Datagrams.runs()`: (buf, size, endpoint), datagrams of `size`
 * bytes back to back in buf, the last possibly shorter (an empty buf: one empty datagram,
 * its size 0 or not, as the reference sends it). A run longer than one datagram goes as
 * UDP_SEGMENT (GSO) sends of at most 64 segments and 65,000 bytes each, a lone datagram
 * as one sendmsg. Python keeps the policy and the addresses: `dests` maps an
 * endpoint to its destination ready made, (sockaddr bytes, packet info bytes or None:
 * the sticky source, an in_pktinfo of 12 bytes or an in6_pktinfo of 20), and `dest`
 * makes a missing one (None: the endpoint has no address, its run is dropped), so that
 * no address is parsed here. What the socket must learn comes back, for UdpSocket to
 * apply: (endpoint, errno, info) when a send from its source (that packet info) failed
 * as if the source were gone (the datagram went again from the kernel's choice, as did
 * the rest of the batch's to that endpoint: the runs that share its destination object,
 * which `dests` gives every equal endpoint; not any of the same address),
 * (None, errno, None) when the kernel refused GSO (the rest went one by one).
 * Errors otherwise drop the datagram, as UDP may: EMSGSIZE sends that chunk one by one
 * (IP fragments them), and so on, errno for errno as the reference. */

#include "native.h"

#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define GSO_SEGMENTS 64 /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_BYTES 65000 /* below the 64 KiB an IP datagram can carry, with headers */
#define V4_INFO 12      /* struct in_pktinfo */
#define V6_INFO 20      /* struct in6_pktinfo */

typedef struct {
    Py_buffer view; /* the run's datagrams, back to back (held until the batch is freed) */
    size_t size;    /* each datagram's; the last may be shorter */
    PyObject *endpoint;          /* borrowed from the run, which the batch's tuple holds */
    PyObject *dest;              /* (sockaddr, info), held; NULL or None: dropped */
    const struct sockaddr *addr; /* in dest's bytes */
    socklen_t alen;
    const uint8_t *info; /* the sticky source's packet info; NULL: the kernel's choice */
    size_t infolen;
    int gone; /* the errno a send from the source failed with */
} SendRun;

typedef struct {
    PyObject *runs; /* the caller's runs, as a tuple: it holds every run and its buffer */
    Py_ssize_t n, packets;
    int gso;     /* whether to try GSO; 0 once refused */
    int refused; /* the errno GSO was refused with */
    SendRun run[];
} UdpBatch;

static void udp_batch_free(UdpBatch *b)
{
    if (b == NULL)
        return;
    for (Py_ssize_t k = 0; k < b->n; k++) {
        PyBuffer_Release(&b->run[k].view); /* a no-op on one never taken (zeroed) */
        Py_XDECREF(b->run[k].dest);
    }
    Py_XDECREF(b->runs);
    PyMem_Free(b);
}

/* dest (a (sockaddr, info) tuple, or None) checked and pointed into. -1 with an exception. */
static int take_dest(SendRun *r, PyObject *dest)
{
    r->dest = dest;
    if (dest == Py_None)
        return 0;
    PyObject *addr, *info;
    if (!PyTuple_Check(dest) || PyTuple_GET_SIZE(dest) != 2
        || !PyBytes_Check(addr = PyTuple_GET_ITEM(dest, 0))
        || ((info = PyTuple_GET_ITEM(dest, 1)) != Py_None && !PyBytes_Check(info))) {
        PyErr_SetString(PyExc_TypeError, "a destination is (sockaddr bytes, info bytes or None)");
        return -1;
    }
    Py_ssize_t alen = PyBytes_GET_SIZE(addr), ilen = info == Py_None ? 0 : PyBytes_GET_SIZE(info);
    if ((alen != sizeof(struct sockaddr_in) && alen != sizeof(struct sockaddr_in6))
        || (ilen != 0 && ilen != V4_INFO && ilen != V6_INFO)) {
        PyErr_SetString(PyExc_ValueError, "a sockaddr_in(6) and an in(6)_pktinfo");
        return -1;
    }
    r->addr = (const struct sockaddr *)PyBytes_AS_STRING(addr);
    r->alen = (socklen_t)alen;
    r->info = ilen ? (const uint8_t *)PyBytes_AS_STRING(info) : NULL;
    r->infolen = (size_t)ilen;
    return 0;
}

/* Run k of the batch from item (buf, size, endpoint): its buffer held, its destination
 * looked up (made by dest_fn where dests has none). -1 with an exception. */
static int take_run(UdpBatch *b, Py_ssize_t k, PyObject *item, PyObject *dests, PyObject *dest_fn)
{
    SendRun *r = &b->run[k];
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
        PyErr_SetString(PyExc_TypeError, "a run is (buf, size, endpoint)");
        return -1;
    }
    Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
    if (size < 0 && PyErr_Occurred())
        return -1;
    r->size = (size_t)size;
    r->endpoint = PyTuple_GET_ITEM(item, 2);
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 0), &r->view, PyBUF_SIMPLE) < 0)
        return -1;
    if (size < 0 || (size == 0 && r->view.len > 0)) { /* 0: an empty run, one empty datagram */
        PyErr_SetString(PyExc_ValueError, "a run's size is at least 1 (0: an empty run)");
        return -1;
    }
    PyObject *dest = PyDict_GetItemWithError(dests, r->endpoint);
    if (dest != NULL)
        Py_INCREF(dest);
    else if (PyErr_Occurred() || (dest = PyObject_CallOneArg(dest_fn, r->endpoint)) == NULL)
        return -1;
    b->packets += r->view.len <= size ? 1 : (r->view.len + size - 1) / size;
    return take_dest(r, dest);
}

/* With the GIL: a batch of runs ready to send without it. NULL with an exception. */
static UdpBatch *udp_batch_new(PyObject *runs, PyObject *dests, PyObject *dest_fn, int gso)
{
    /* a tuple, not the list: taking a buffer or making a destination may run Python code,
     * which must not change the runs under us */
    PyObject *tuple = PySequence_Tuple(runs);
    if (tuple == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    UdpBatch *b = PyMem_Calloc(1, sizeof *b + (size_t)n * sizeof(SendRun));
    if (b == NULL) {
        Py_DECREF(tuple);
        return (UdpBatch *)PyErr_NoMemory();
    }
    b->runs = tuple, b->n = n, b->gso = gso;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (take_run(b, k, PyTuple_GET_ITEM(tuple, k), dests, dest_fn) < 0) {
            udp_batch_free(b);
            return NULL;
        }
    }
    return b;
}

/* One sendmsg of n bytes at p to r's address, from `info` (NULL: the kernel's choice), as
 * GSO segments of `seg` bytes (0: one datagram). 0, or the errno. */
static int transmit(int fd, const SendRun *r, const uint8_t *p, size_t n, const uint8_t *info,
                    size_t seg)
{
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(V6_INFO)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {(void *)p, n};
    struct msghdr m = {.msg_name = (void *)r->addr, .msg_namelen = r->alen, .msg_iov = &iov,
                       .msg_iovlen = 1};
    if (seg || info) {
        memset(&ctl, 0, sizeof ctl);
        size_t len = 0;
        if (seg) {
            struct cmsghdr *c = (struct cmsghdr *)ctl.buf;
            uint16_t size = (uint16_t)seg;
            c->cmsg_level = SOL_UDP, c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof size);
            memcpy(CMSG_DATA(c), &size, sizeof size);
            len += CMSG_SPACE(sizeof size);
        }
        if (info) {
            struct cmsghdr *c = (struct cmsghdr *)(ctl.buf + len);
            int v4 = r->infolen == V4_INFO;
            c->cmsg_level = v4 ? IPPROTO_IP : IPPROTO_IPV6;
            c->cmsg_type = v4 ? IP_PKTINFO : IPV6_PKTINFO;
            c->cmsg_len = CMSG_LEN(r->infolen);
            memcpy(CMSG_DATA(c), info, r->infolen);
            len += CMSG_SPACE(r->infolen);
        }
        m.msg_control = ctl.buf, m.msg_controllen = len;
    }
    ssize_t sent;
    do
        sent = sendmsg(fd, &m, 0);
    while (sent < 0 && errno == EINTR);
    return sent < 0 ? errno : 0;
}

/* io/udp.py _SOURCE_GONE: a send from a remembered source failed because it is gone */
static int source_gone(int err)
{
    return err == EINVAL || err == EADDRNOTAVAIL || err == ENETUNREACH || err == ENODEV
           || err == ENXIO;
}

/* io/udp.py _GSO_REFUSED: the kernel cannot do GSO on this socket */
static int gso_refused(int err)
{
    return err == EIO || err == ENOPROTOOPT || err == EINVAL || err == EOPNOTSUPP;
}

/* Run k's source failed with err: it and the batch's later runs to its endpoint go from
 * the kernel's choice (UdpSocket._source_failed forgets the endpoint's source). The runs
 * to its endpoint are those with its destination object: `dests` holds one per endpoint
 * (UdpSocket._dest stores the one it makes), and one endpoint's never serves another (two
 * spellings of one address, "127.0.0.1" and "::ffff:127.0.0.1", keep their own sources).
 * So no endpoint is compared, and a batch costs nothing here till a source is gone. The
 * one miss, `dests` cleared between two runs to one endpoint, costs the later run one
 * more failed send and a second finding, which UdpSocket._learn ignores (the source is
 * forgotten by then). */
static void forget(UdpBatch *b, Py_ssize_t k, int err)
{
    b->run[k].gone = err;
    const PyObject *dest = b->run[k].dest;
    for (Py_ssize_t j = k; j < b->n; j++)
        if (b->run[j].dest == dest)
            b->run[j].info = NULL;
}

/* UdpSocket.send: one datagram, from r's source if it has one; if that fails as if the
 * source were gone, again from the kernel's choice. Other errors drop it. The errno of
 * the source's failure (it is to be forgotten), or 0. */
static int send_datagram(const SendRun *r, const uint8_t *p, size_t n, int fd)
{
    if (r->info != NULL) {
        int err = transmit(fd, r, p, n, r->info, 0);
        if (!source_gone(err))
            return 0; /* sent, or dropped */
        (void)transmit(fd, r, p, n, NULL, 0);
        return err;
    }
    (void)transmit(fd, r, p, n, NULL, 0);
    return 0;
}

static void send_one(UdpBatch *b, Py_ssize_t k, const uint8_t *p, size_t n, int fd)
{
    int gone = send_datagram(&b->run[k], p, n, fd);
    if (gone)
        forget(b, k, gone);
}

/* UdpSocket._send_gso: one GSO send; 1 when its datagrams must go one by one instead. */
static int send_gso(UdpBatch *b, Py_ssize_t k, const uint8_t *p, size_t n, int fd)
{
    const SendRun *r = &b->run[k];
    for (;;) {
        int err = transmit(fd, r, p, n, r->info, r->size);
        if (err == 0)
            return 0;
        if (r->info != NULL && source_gone(err)) {
            forget(b, k, err); /* once more, from the kernel's choice */
            continue;
        }
        if (gso_refused(err)) { /* the kernel can't here: stop asking */
            b->gso = 0, b->refused = err;
            return 1;
        }
        return err == EMSGSIZE; /* above the path MTU: one by one (IP fragments them) */
    }
}

/* UdpSocket.send_runs for run k (send_segments where it is more than one datagram). */
static void send_run(UdpBatch *b, Py_ssize_t k, int fd)
{
    const SendRun *r = &b->run[k];
    if (r->addr == NULL)
        return; /* no address: dropped */
    const uint8_t *p = r->view.buf;
    size_t len = (size_t)r->view.len, size = r->size;
    if (len <= size) {
        send_one(b, k, p, len, fd);
        return;
    }
    size_t per = GSO_BYTES / size;
    size_t step = size * (per < 1 ? 1 : per > GSO_SEGMENTS ? GSO_SEGMENTS : per);
    for (size_t start = 0; start < len; start += step) {
        size_t chunk = len - start < step ? len - start : step;
        if (b->gso && chunk > size && !send_gso(b, k, p + start, chunk, fd))
            continue; /* sent, or dropped as UDP may */
        for (size_t i = 0; i < chunk; i += size)
            send_one(b, k, p + start + i, chunk - i < size ? chunk - i : size, fd);
    }
}

/* Every run of the batch, in order (no Python object touched: any thread, no GIL). */
static void udp_batch_send(UdpBatch *b, int fd)
{
    for (Py_ssize_t k = 0; k < b->n; k++)
        send_run(b, k, fd);
}

static int append_report(PyObject *list, PyObject *endpoint, int err, PyObject *info)
{
    PyObject *t = Py_BuildValue("(OiO)", endpoint, err, info);
    int rc = t ? PyList_Append(list, t) : -1;
    Py_XDECREF(t);
    return rc;
}

/* What the socket must learn from a sent batch, appended to list; -1 with an exception. */
static int udp_batch_report(UdpBatch *b, PyObject *list)
{
    for (Py_ssize_t k = 0; k < b->n; k++) {
        const SendRun *r = &b->run[k];
        if (r->gone && append_report(list, r->endpoint, r->gone, PyTuple_GET_ITEM(r->dest, 1)) < 0)
            return -1;
    }
    return b->refused ? append_report(list, Py_None, b->refused, Py_None) : 0;
}

PyObject *send_runs(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, gso;
    PyObject *runs, *dests, *dest_fn;
    if (!PyArg_ParseTuple(args, "iOO!Op:send_runs", &fd, &runs, &PyDict_Type, &dests, &dest_fn,
                          &gso))
        return NULL;
    UdpBatch *b = udp_batch_new(runs, dests, dest_fn, gso);
    if (b == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    udp_batch_send(b, fd);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    if (list != NULL && udp_batch_report(b, list) < 0)
        Py_CLEAR(list);
    udp_batch_free(b);
    return list;
}

/* ------------------------------------------------------------------ UdpSender */

typedef struct {
    PyObject_HEAD
    Stage stage;
    _Atomic int refused; /* GSO refused on a batch: the later ones do not ask again */
} UdpSender;

static void run_sends(void *job, int fd, Stage *stage)
{
    UdpBatch *b = job;
    UdpSender *u = (UdpSender *)((char *)stage - offsetof(UdpSender, stage));
    if (atomic_load(&u->refused))
        b->gso = 0;
    udp_batch_send(b, fd);
    if (b->refused)
        atomic_store(&u->refused, b->refused);
}

static int report_sends(void *job, PyObject *list)
{
    return udp_batch_report(job, list);
}

static void free_sends(void *job)
{
    udp_batch_free(job);
}

static const StageOps sender_ops = {"wgpy-udpsend", run_sends, report_sends, free_sends};

static PyObject *UdpSender_send(UdpSender *u, PyObject *args)
{
    int fd, gso;
    PyObject *runs, *dests, *dest_fn;
    if (!PyArg_ParseTuple(args, "iOO!Op:send", &fd, &runs, &PyDict_Type, &dests, &dest_fn, &gso))
        return NULL;
    PyObject *list = stage_outcomes(&u->stage);
    if (list == NULL)
        return NULL;
    UdpBatch *b = stage_collect(&u->stage, list) == 0 ? udp_batch_new(runs, dests, dest_fn, gso)
                                                      : NULL;
    int rc = b == NULL ? -1 : 0, queued = 0;
    if (b != NULL && b->n > 0) {
        rc = stage_enqueue(&u->stage, b, fd, b->packets, list);
        queued = rc == 0;
    }
    if (rc == 1) { /* the caller's to send, the GIL released (as send_runs) */
        Py_BEGIN_ALLOW_THREADS
        run_sends(b, fd, &u->stage);
        Py_END_ALLOW_THREADS
        u->stage.inlined++;
        rc = udp_batch_report(b, list);
    }
    if (!queued)
        udp_batch_free(b);
    return rc < 0 ? stage_raise(&u->stage, list) : list; /* the earlier findings kept */
}

static PyObject *UdpSender_flush(UdpSender *u, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = stage_outcomes(&u->stage);
    if (list != NULL && stage_drain(&u->stage, list) < 0)
        return stage_raise(&u->stage, list);
    return list;
}

static PyObject *UdpSender_close(UdpSender *u, PyObject *Py_UNUSED(ignored))
{
    stage_stop(&u->stage);
    Py_RETURN_NONE;
}

static PyObject *UdpSender_counts(UdpSender *u, PyObject *Py_UNUSED(ignored))
{
    return stage_counts(&u->stage);
}

static PyObject *UdpSender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"depth", "inline", NULL};
    long depth = 4, inline_max = 8;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ll:UdpSender", kwlist, &depth, &inline_max))
        return NULL;
    UdpSender *u = (UdpSender *)type->tp_alloc(type, 0);
    if (u != NULL && stage_start(&u->stage, &sender_ops, depth, inline_max) < 0)
        Py_CLEAR(u);
    return (PyObject *)u;
}

static void UdpSender_dealloc(UdpSender *u)
{
    stage_destroy(&u->stage);
    Py_TYPE(u)->tp_free((PyObject *)u);
}

static PyMethodDef UdpSender_methods[] = {
    {"send", (PyCFunction)UdpSender_send, METH_VARARGS,
     "send(fd, runs, dests, dest, gso) -> [(endpoint or None, errno, info)]: send_runs's\n"
     "sends, queued for the sender thread (a small batch that finds the queue empty: sent\n"
     "here);\n"
     "returns what the batches sent since the last call found (send_runs's report). A call\n"
     "that raises (a bad run, `dest` raising, no memory: its batch not sent) passes what it\n"
     "had collected on to the next call (send or flush), which returns it first."},
    {"flush", (PyCFunction)UdpSender_flush, METH_NOARGS,
     "flush() -> [(endpoint or None, errno, info)]: wait until every queued batch is sent\n"
     "(a flush that raises passes its findings on, as send)."},
    {"close", (PyCFunction)UdpSender_close, METH_NOARGS,
     "close(): send what is queued and stop the thread; later sends are made here."},
    {"counts", (PyCFunction)UdpSender_counts, METH_NOARGS,
     "counts() -> (batches queued, batches sent by the caller, waits for room)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject UdpSenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.UdpSender",
    .tp_doc = "UdpSender(depth=4, inline=8): a thread making UDP sends from a queue.",
    .tp_basicsize = sizeof(UdpSender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = UdpSender_new,
    .tp_dealloc = (destructor)UdpSender_dealloc,
    .tp_methods = UdpSender_methods,
};

/* ------------------------------------------------------------------ seal_send */

/* A lone packet read from the TUN (a ping), from its route to its sendmsg in one call:
 * core/device.py Device.seal_one, then UdpSocket.send_runs, which stay the reference
 * (and the pure path's way). The tests are seal_one's, made on the core's own objects
 * with the GIL held, so nothing is mirrored or published for them: the destination's
 * owner in the routes (the allowed IPs' mirror), no packet staged before this one, an
 * endpoint, a current session not expired (`now < expires`) whose Sealer is this
 * module's, with a counter left; the sender thread has nothing queued (the datagram must
 * not pass what it has). Any other way: None, nothing changed, and the caller takes
 * `send`'s. A change to seal_one's or Keypair.can_send's tests is one here too. Python
 * calls: none of its own, where seal_one and send_runs made 6 (docs/design.md,
 * "Latency"). */

static struct {
    PyObject *staged, *endpoint, *current, *expires, *sealer;
} names;

/* The names, interned once (those a failed call left NULL, again on the next). */
static int intern_names(void)
{
    PyObject **slot[] = {&names.staged, &names.endpoint, &names.current, &names.expires,
                         &names.sealer};
    const char *text[] = {"staged", "endpoint", "current", "expires", "sealer"};
    for (size_t i = 0; i < sizeof slot / sizeof *slot; i++)
        if (*slot[i] == NULL && (*slot[i] = PyUnicode_InternFromString(text[i])) == NULL)
            return -1;
    return 0;
}

typedef struct { /* the lone packet's way: new references */
    PyObject *peer, *endpoint, *kp, *sealer;
} Way;

static void way_clear(Way *w)
{
    Py_CLEAR(w->peer);
    Py_CLEAR(w->endpoint);
    Py_CLEAR(w->kp);
    Py_CLEAR(w->sealer);
}

/* seal_one's tests of the peer and its session: 1, the way (w); 0, not; -1, an exception. */
static int lone_way(Way *w, PyObject *routes, const uint8_t *p, size_t n, double now)
{
    PyObject *owner = routes_owner(routes, p, n);
    if (owner == NULL)
        return 0;
    w->peer = Py_NewRef(owner); /* (the attributes' lookups could change the routes) */
    PyObject *staged = PyObject_GetAttr(w->peer, names.staged);
    int busy = staged ? PyObject_IsTrue(staged) : -1;
    Py_XDECREF(staged);
    if (busy != 0)
        return busy < 0 ? -1 : 0;
    if ((w->endpoint = PyObject_GetAttr(w->peer, names.endpoint)) == NULL)
        return -1;
    if (w->endpoint == Py_None || (w->kp = PyObject_GetAttr(w->peer, names.current)) == NULL)
        return w->endpoint == Py_None ? 0 : -1;
    if (w->kp == Py_None)
        return 0;
    PyObject *expires = PyObject_GetAttr(w->kp, names.expires);
    double until = expires ? PyFloat_AsDouble(expires) : -1.0;
    Py_XDECREF(expires);
    if (until == -1.0 && PyErr_Occurred())
        return -1;
    if (!(now < until) || (w->sealer = PyObject_GetAttr(w->kp, names.sealer)) == NULL)
        return now < until ? -1 : 0;
    return Py_IS_TYPE(w->sealer, &SealerType);
}

/* Whether the sender (a UdpSender, or None: the caller's thread sends) has nothing queued
 * that this datagram could pass. (Its finished batches are left for its next `send` or
 * `UdpSocket.collect` to collect, findings and all.) */
static int sender_idle(PyObject *sender)
{
    if (sender == Py_None)
        return 1;
    Stage *s = &((UdpSender *)sender)->stage;
    if (!stage_alive(s))
        return 1;
    pthread_mutex_lock(&s->mu);
    int idle = s->stopping || s->done == s->queued;
    pthread_mutex_unlock(&s->mu);
    return idle;
}

/* With the way found: the destination, then the seal and the send (the GIL released).
 * The findings (send_runs's report), or None where the way ends here. An endpoint with
 * no address has its message sealed and dropped, as send_runs drops it (`dest` is not
 * asked twice: it may resolve a name). */
static PyObject *seal_and_send(Way *w, int fd, PyObject *dests, PyObject *dest_fn,
                               PyObject *sender, const uint8_t *p, size_t n, size_t mtu,
                               PyObject *unsettled)
{
    SendRun r = {.endpoint = w->endpoint};
    PyObject *dest = PyDict_GetItemWithError(dests, w->endpoint);
    if (dest != NULL)
        Py_INCREF(dest);
    else if (PyErr_Occurred() || (dest = PyObject_CallOneArg(dest_fn, w->endpoint)) == NULL)
        return NULL;
    PyObject *result = NULL, *entry = NULL;
    uint8_t *buf = NULL;
    size_t size = sealed_length(n, mtu);
    if (take_dest(&r, dest) < 0)
        goto done;
    if (r.addr != NULL && !sender_idle(sender)) { /* behind the sender's queue: send's way */
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* made before the send: once the datagram is out, only the append can fail */
    entry = Py_BuildValue("(OOnO)", w->peer, w->kp, (Py_ssize_t)size, Py_True);
    if (entry == NULL || (buf = PyMem_Malloc(size)) == NULL) {
        if (entry != NULL)
            PyErr_NoMemory();
        goto done;
    }
    int sealed, gone = 0;
    Py_BEGIN_ALLOW_THREADS
    sealed = seal_one(w->sealer, p, n, mtu, buf);
    if (sealed == 1 && r.addr != NULL)
        gone = send_datagram(&r, buf, size, fd);
    Py_END_ALLOW_THREADS
    if (sealed < 0)
        PyErr_SetString(PyExc_ValueError, "the key is wiped (or OpenSSL failed)");
    else if (sealed == 0) /* spent: nothing sealed */
        result = Py_NewRef(Py_None);
    else if (PyList_Append(unsettled, entry) == 0 && (result = PyList_New(0)) != NULL && gone
             && append_report(result, w->endpoint, gone, PyTuple_GET_ITEM(dest, 1)) < 0)
        Py_CLEAR(result);
    if (sealed == 1 && r.addr != NULL && sender != Py_None)
        ((UdpSender *)sender)->stage.inlined++; /* (counts: sent by the caller) */
done:
    PyMem_Free(buf);
    Py_XDECREF(entry);
    Py_DECREF(dest);
    return result;
}

PyObject *seal_send(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "seal_send takes 9 arguments");
        return NULL;
    }
    PyObject *dests = args[1], *dest_fn = args[2], *sender = args[3], *packet = args[4];
    PyObject *routes = args[5], *unsettled = args[8];
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    double now = PyFloat_AsDouble(args[6]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t mtu = PyLong_AsSsize_t(args[7]);
    if (mtu == -1 && PyErr_Occurred())
        return NULL;
    if (!PyDict_Check(dests) || !PyList_Check(unsettled) || mtu < 0 || fd < 0 || fd > INT_MAX
        || (sender != Py_None && !Py_IS_TYPE(sender, &UdpSenderType))) {
        PyErr_SetString(PyExc_TypeError, "seal_send(fd, dict, dest, UdpSender or None, packet, "
                                         "routes, now, mtu >= 0, list)");
        return NULL;
    }
    if (names.sealer == NULL && intern_names() < 0) /* the last one interned */
        return NULL;
    /* not a plain packet (a super-packet), or no mirror yet (send makes it): send's way */
    if (!PyBytes_CheckExact(packet) || !Py_IS_TYPE(routes, &RoutesType)
        || PyBytes_GET_SIZE(packet) > 0xFFFFFF)
        Py_RETURN_NONE;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(packet);
    size_t n = (size_t)PyBytes_GET_SIZE(packet);
    Way w = {0};
    int way = lone_way(&w, routes, p, n, now);
    PyObject *result = way < 0 ? NULL
                       : way == 0
                           ? Py_NewRef(Py_None)
                           : seal_and_send(&w, (int)fd, dests, dest_fn, sender, p, n, (size_t)mtu, unsettled);
    way_clear(&w);
    return result;
}
