/* wgpy._native: TunWriter, the writer stage of the receive direction (issue 17 item 4).
 *
 * A TUN write is where the kernel runs the decrypted packets up the network stack (TCP's
 * receive path, a socket's wake-up): a large share of the loop thread's time. With a
 * TunWriter the loop thread plans a batch's writes (write_tun's coalescing, with the GIL)
 * and queues them; one thread of the writer's makes them, in order, while the loop thread
 * goes on reading and decrypting the next batch.
 *
 *   write(fd, packets, udp=True)  plan and queue; returns the failed writes of batches that
 *                                 have been written since the last call ([(errno, bytes)],
 *                                 as write_tun's); a full queue waits without the GIL
 *   flush()                       wait until every queued batch is written; their failures
 *   close()                       flush, and stop the thread (later writes: on the caller)
 *
 * Who touches what: a queued batch (its plan, and through its tuple the packets' buffers)
 * is made by the caller with the GIL and read by the writer thread without it until it is
 * counted written; the caller frees it, with the GIL, on a later call (`collect`). The
 * writer thread never touches a Python object and never takes the GIL; the caller never
 * takes the GIL while it holds `mu`. The counters: `queued` (the caller's) under `mu`,
 * `written` (the writer's) changed under `mu` and read atomically, `collected` under the
 * GIL. A batch of at most `inline` packets that finds nothing queued is written by the
 * caller itself, the GIL released, as write_tun does: a lone packet (a ping) is not handed
 * to another thread. In a child of fork the thread is gone: what the parent had queued is
 * dropped there, and the child writes on the caller. */

#include "native.h"

#include <errno.h>
#include <sys/uio.h>

#define DEPTH_MAX 64

typedef struct {
    TunBatch *batch;
    int fd;
} Slot;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work; /* to the writer: a batch queued, or stop */
    pthread_cond_t done; /* to callers: a batch written, or stopped */
    uint64_t queued, collected; /* collected <= written <= queued */
    _Atomic uint64_t written;   /* changed under mu (for the waits), read without it */
    uint64_t inlined, waits;             /* counts, for tests and benchmarks */
    long depth, inline_max;
    int running, stopping;
    unsigned long forks; /* fork_count when the thread started */
    pthread_t tid;
    struct iovec iov[IOV_CAP]; /* the writer thread's */
    Slot ring[DEPTH_MAX];
} TunWriter;

static atomic_ulong fork_count; /* children of fork this process is (each fork: +1) */

static void count_fork(void)
{
    atomic_fetch_add(&fork_count, 1);
}

static void *writer_main(void *arg)
{
    TunWriter *w = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's */
    pthread_setname_np(pthread_self(), "wgpy-tunwrite");
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->stopping && w->written == w->queued)
            pthread_cond_wait(&w->work, &w->mu);
        if (w->written == w->queued)
            break; /* stopping, and all written */
        Slot s = w->ring[w->written % (uint64_t)w->depth];
        pthread_mutex_unlock(&w->mu);
        tun_batch_write(s.batch, s.fd, w->iov);
        pthread_mutex_lock(&w->mu);
        w->written++;
        pthread_cond_broadcast(&w->done);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* With the GIL: free the batches written so far, their failed writes appended to list
 * (if not NULL). -1 with an exception (the batches are freed all the same). */
static int collect(TunWriter *w, PyObject *list)
{
    uint64_t written = w->written; /* an atomic load: the batches up to it are done with */
    int rc = 0;
    while (w->collected < written) {
        Slot *s = &w->ring[w->collected % (uint64_t)w->depth];
        TunBatch *t = s->batch;
        s->batch = NULL;
        w->collected++; /* before the free, which may run Python code (a __del__) */
        if (rc == 0 && list != NULL)
            rc = tun_batch_failures(t, list);
        tun_batch_free(t);
    }
    return rc;
}

/* In a child of fork: the thread was the parent's. Its queue is dropped here (the parent
 * writes it); from now on the caller writes. */
static void orphan(TunWriter *w)
{
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    w->written = w->queued;
    w->running = w->stopping = 0;
    w->forks = atomic_load(&fork_count);
    collect(w, NULL);
}

/* Whether the thread is there to write (not in a child of fork, not stopped). */
static int alive(TunWriter *w)
{
    if (w->forks != atomic_load(&fork_count))
        orphan(w);
    return w->running;
}

/* Wait, without the GIL, until `written` passes `from` or the writer stops. Called with
 * the GIL and without mu (the GIL is never taken while holding mu). */
static void wait_written(TunWriter *w, uint64_t from)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    while (w->written == from && w->written != w->queued)
        pthread_cond_wait(&w->done, &w->mu);
    pthread_mutex_unlock(&w->mu);
    Py_END_ALLOW_THREADS
}

/* Queue t for the writer: 0; 1 when the caller must write it itself (the writer is
 * stopping, or idle and t small); -1 with an exception. A full queue waits. */
static int enqueue(TunWriter *w, TunBatch *t, int fd, PyObject *list)
{
    for (;;) {
        if (collect(w, list) < 0)
            return -1;
        pthread_mutex_lock(&w->mu);
        uint64_t written = w->written;
        int idle = written == w->queued;
        if (w->stopping || (idle && tun_batch_packets(t) <= w->inline_max)) {
            pthread_mutex_unlock(&w->mu);
            return 1;
        }
        if (w->queued - w->collected < (uint64_t)w->depth) {
            w->ring[w->queued % (uint64_t)w->depth] = (Slot){t, fd};
            w->queued++;
            pthread_cond_signal(&w->work);
            pthread_mutex_unlock(&w->mu);
            return 0;
        }
        w->waits++;
        pthread_mutex_unlock(&w->mu);
        if (written == w->collected) /* nothing to collect: wait for the writer */
            wait_written(w, written);
    }
}

/* The batch written on the calling thread, the GIL released (as write_tun). */
static int write_here(TunWriter *w, TunBatch *t, int fd, PyObject *list)
{
    struct iovec iov[IOV_CAP];
    Py_BEGIN_ALLOW_THREADS
    tun_batch_write(t, fd, iov);
    Py_END_ALLOW_THREADS
    w->inlined++;
    return tun_batch_failures(t, list);
}

static PyObject *TunWriter_write(TunWriter *w, PyObject *args)
{
    int fd, udp = 1;
    PyObject *packets;
    if (!PyArg_ParseTuple(args, "iO|p:write", &fd, &packets, &udp))
        return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    int running = alive(w);
    TunBatch *t = collect(w, list) == 0 ? tun_batch_new(packets, udp) : NULL;
    int rc = t == NULL ? -1 : 0, queued = 0;
    if (t != NULL && tun_batch_packets(t) > 0) {
        rc = running ? enqueue(w, t, fd, list) : 1;
        queued = rc == 0;
        if (rc == 1)
            rc = write_here(w, t, fd, list);
    }
    if (!queued)
        tun_batch_free(t);
    if (rc < 0)
        Py_CLEAR(list);
    return list;
}

/* Wait until everything queued is written; collect it. -1 with an exception. */
static int drain(TunWriter *w, PyObject *list)
{
    for (;;) {
        pthread_mutex_lock(&w->mu);
        uint64_t written = w->written, queued = w->queued;
        pthread_mutex_unlock(&w->mu);
        if (written == queued)
            return collect(w, list);
        wait_written(w, written);
    }
}

static PyObject *TunWriter_flush(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list != NULL && alive(w) && drain(w, list) < 0)
        Py_CLEAR(list);
    return list;
}

/* Stop the thread once everything queued is written (it writes the queue out first). */
static void stop(TunWriter *w)
{
    if (!alive(w))
        return;
    pthread_mutex_lock(&w->mu);
    int first = !w->stopping;
    w->stopping = 1;
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->mu);
    if (first) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(w->tid, NULL);
        Py_END_ALLOW_THREADS
        w->running = 0;
    } else {
        drain(w, NULL); /* another thread is joining: wait for the queue all the same */
    }
    collect(w, NULL);
}

static PyObject *TunWriter_close(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    stop(w);
    Py_RETURN_NONE;
}

static PyObject *TunWriter_counts(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    (void)alive(w); /* in a child of fork: the mutex made anew before it is taken */
    pthread_mutex_lock(&w->mu);
    uint64_t queued = w->queued;
    pthread_mutex_unlock(&w->mu);
    return Py_BuildValue("(KKK)", (unsigned long long)queued, (unsigned long long)w->inlined,
                         (unsigned long long)w->waits);
}

static PyObject *TunWriter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"depth", "inline", NULL};
    long depth = 4, inline_max = 8;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ll:TunWriter", kwlist, &depth, &inline_max))
        return NULL;
    if (depth < 1 || depth > DEPTH_MAX) {
        PyErr_Format(PyExc_ValueError, "1 <= depth <= %d", DEPTH_MAX);
        return NULL;
    }
    TunWriter *w = (TunWriter *)type->tp_alloc(type, 0);
    if (w == NULL)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    w->depth = depth, w->inline_max = inline_max;
    w->forks = atomic_load(&fork_count);
    int err = pthread_create(&w->tid, NULL, writer_main, w);
    if (err != 0) {
        Py_DECREF(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    w->running = 1;
    return (PyObject *)w;
}

static void TunWriter_dealloc(TunWriter *w)
{
    stop(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef TunWriter_methods[] = {
    {"write", (PyCFunction)TunWriter_write, METH_VARARGS,
     "write(fd, packets, udp=True) -> [(errno, write)]: write_tun's writes, queued for the\n"
     "writer thread (a small batch that finds the queue empty: written here); returns the\n"
     "failed writes of the batches written since the last call."},
    {"flush", (PyCFunction)TunWriter_flush, METH_NOARGS,
     "flush() -> [(errno, write)]: wait until every queued batch is written."},
    {"close", (PyCFunction)TunWriter_close, METH_NOARGS,
     "close(): write what is queued and stop the thread; later writes are made here."},
    {"counts", (PyCFunction)TunWriter_counts, METH_NOARGS,
     "counts() -> (batches queued, batches written by the caller, waits for room)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject TunWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.TunWriter",
    .tp_doc = "TunWriter(depth=4, inline=8): a thread making TUN writes from a queue.",
    .tp_basicsize = sizeof(TunWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = TunWriter_new,
    .tp_dealloc = (destructor)TunWriter_dealloc,
    .tp_methods = TunWriter_methods,
};

/* Once per process: count forks, so that a writer knows its thread is not there. */
int writer_init(void)
{
    static int once;
    if (!once) {
        if (pthread_atfork(NULL, NULL, count_fork) != 0)
            return -1;
        once = 1;
    }
    return 0;
}
