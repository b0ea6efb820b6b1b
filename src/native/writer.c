/* wgpy._native: TunWriter, the writer stage of the receive direction (issue 17 item 4).
 *
 * A TUN write is where the kernel runs the decrypted packets up the network stack (TCP's
 * receive path, a socket's wake-up): a large share of the loop thread's time. With a
 * TunWriter the loop thread plans a batch's writes (write_tun's coalescing, with the GIL)
 * and queues them; the stage's thread (stage.c) makes them, in order, while the loop
 * thread goes on reading and decrypting the next batch.
 *
 *   write(fd, packets, udp=True)  plan and queue; returns the failed writes of batches that
 *                                 have been written since the last call ([(errno, bytes)],
 *                                 as write_tun's); a full queue waits without the GIL
 *   flush()                       wait until every queued batch is written; their failures
 *   close()                       flush, and stop the thread (later writes: on the caller)
 *
 * A queued batch (its plan, and through its tuple the packets' buffers) lives until the
 * caller collects it, with the GIL, on a later call; stage.c says who touches what. */

#include "native.h"

#include <sys/uio.h>

typedef struct {
    PyObject_HEAD
    Stage stage;
} TunWriter;

static void run_batch(void *job, int fd, Stage *Py_UNUSED(stage))
{
    struct iovec iov[IOV_CAP];
    tun_batch_write(job, fd, iov);
}

static int report_batch(void *job, PyObject *list)
{
    return tun_batch_failures(job, list);
}

static void free_batch(void *job)
{
    tun_batch_free(job);
}

static const StageOps writer_ops = {"wgpy-tunwrite", run_batch, report_batch, free_batch};

static PyObject *TunWriter_write(TunWriter *w, PyObject *args)
{
    int fd, udp = 1;
    PyObject *packets;
    if (!PyArg_ParseTuple(args, "iO|p:write", &fd, &packets, &udp))
        return NULL;
    PyObject *list = stage_outcomes(&w->stage);
    if (list == NULL)
        return NULL;
    TunBatch *t = stage_collect(&w->stage, list) == 0 ? tun_batch_new(packets, udp) : NULL;
    int rc = t == NULL ? -1 : 0, queued = 0;
    if (t != NULL && tun_batch_packets(t) > 0) {
        rc = stage_enqueue(&w->stage, t, fd, tun_batch_packets(t), list);
        queued = rc == 0;
    }
    if (rc == 1) { /* the caller's to write, the GIL released (as write_tun) */
        Py_BEGIN_ALLOW_THREADS
        run_batch(t, fd, NULL);
        Py_END_ALLOW_THREADS
        w->stage.inlined++;
        rc = tun_batch_failures(t, list);
    }
    if (!queued)
        tun_batch_free(t);
    return rc < 0 ? stage_raise(&w->stage, list) : list; /* the earlier outcomes kept */
}

/* Whether the caller may write a lone packet itself now, as `write` would (open.c's
 * open_lone): nothing queued, nothing written and not yet collected, no outcome kept,
 * a packet small enough to inline. Read with the GIL: `queued` and `collected` are the
 * caller's, `done` is read atomically. */
int tun_writer_idle(PyObject *writer)
{
    Stage *s = &((TunWriter *)writer)->stage;
    (void)stage_alive(s); /* in a child of fork: the parent's queue dropped first */
    return s->kept == NULL && s->collected == s->queued && s->done == s->queued
           && s->inline_max >= 1;
}

/* A lone packet written by the caller (counts: as `write`'s inlined batches). */
void tun_writer_inlined(PyObject *writer)
{
    ((TunWriter *)writer)->stage.inlined++;
}

static PyObject *TunWriter_flush(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = stage_outcomes(&w->stage);
    if (list != NULL && stage_drain(&w->stage, list) < 0)
        return stage_raise(&w->stage, list);
    return list;
}

static PyObject *TunWriter_close(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    stage_stop(&w->stage);
    Py_RETURN_NONE;
}

static PyObject *TunWriter_counts(TunWriter *w, PyObject *Py_UNUSED(ignored))
{
    return stage_counts(&w->stage);
}

static PyObject *TunWriter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"depth", "inline", NULL};
    long depth = 4, inline_max = 8;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ll:TunWriter", kwlist, &depth, &inline_max))
        return NULL;
    TunWriter *w = (TunWriter *)type->tp_alloc(type, 0);
    if (w != NULL && stage_start(&w->stage, &writer_ops, depth, inline_max) < 0)
        Py_CLEAR(w);
    return (PyObject *)w;
}

static void TunWriter_dealloc(TunWriter *w)
{
    stage_destroy(&w->stage);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef TunWriter_methods[] = {
    {"write", (PyCFunction)TunWriter_write, METH_VARARGS,
     "write(fd, packets, udp=True) -> [(errno, write)]: write_tun's writes, queued for the\n"
     "writer thread (a small batch that finds the queue empty: written here); returns the\n"
     "failed writes of the batches written since the last call. A call that raises passes\n"
     "what it had collected on to the next call, which returns it first."},
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
