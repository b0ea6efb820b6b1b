/* wgpy._classify: UdpReader, the reader stage of the receive direction (issue 17 item 4).
 *
 * Without it the loop thread reads the socket (Classifier.drain's recvmmsg), then opens
 * what it read (open_batch, the loop thread one of the crypto workers) and only then reads
 * again. With it a thread of its own waits on the socket (poll, no GIL) and reads it,
 * recvmmsg(MSG_DONTWAIT), into a small ring of slots, each DRAIN reads of UDP_BUF bytes
 * with their headers, as the drain's own buffer; it signals an eventfd, which the loop
 * watches instead of the socket, when it filled one. The drain (`Classifier.drain` given
 * the reader for the socket and its buffer) classifies a filled slot exactly as it
 * classifies its own reads, while the thread reads the next one.
 *
 *   UdpReader(fd, slots=4, count=64, size=69632)   start the thread on socket fd
 *   fileno()    the eventfd: readable while a filled slot waits
 *   close()     stop and join the thread (before the socket is closed); later drains
 *               find nothing
 *   counts()    (slots filled, waits for a free slot)
 *   the buffer protocol: the slots' bytes, one after another (the reads' offsets)
 *
 * Who touches what. The slots are a ring of sequence numbers under `mu`: the thread fills
 * slot `filled` while filled - freed < slots; the caller (with the GIL) takes slot `taken`
 * while taken < filled, and gives it back (freed) on its next take: Python is done with a
 * drain's reads when it asks for the next drain (what it keeps, it copied: the opened
 * plaintext is in buffers of its own, handshake messages are bytes). A slot between
 * filled and freed is the caller's alone; one at or past filled the thread's alone. The
 * thread never takes the GIL or touches a Python object; the caller never takes the GIL
 * holding mu. The eventfd is written (once) under mu when a slot is filled and read back
 * to zero under mu when the caller took the last filled one: it is readable exactly while
 * a filled slot waits, so a level-triggered loop neither misses one nor spins. The buffer
 * lives as long as the object (a memoryview of it holds a reference); close() joins the
 * thread before anything is freed; the socket is the caller's, to close after close().
 * In a child of fork the thread is gone: there a take reads the socket itself. */

#include "classify.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS_MAX 16

typedef struct {
    Reads rd;
    int got;        /* the reads recvmmsg brought (the thread's, then the caller's) */
    unsigned dirty; /* headers the last recvmmsg may have written back */
} Slot;

typedef struct {
    PyObject_HEAD
    int fd;             /* the socket, the caller's */
    int efd;            /* readable while a filled slot waits; -1 once closed */
    int stopfd;         /* wakes the thread's poll to stop */
    uint8_t *ring;      /* slots x count x size bytes */
    size_t ring_len;
    Py_ssize_t size;    /* bytes per read */
    int count, nslots;
    Slot *slots;
    pthread_mutex_t mu;
    pthread_cond_t room; /* a slot was given back, or stopping */
    uint64_t filled, taken, freed; /* under mu */
    uint64_t waits;                /* the thread found no free slot (under mu) */
    int signalled;                 /* the eventfd holds a count (under mu) */
    int stopping, running, ready;
    unsigned long forks;
    pthread_t tid;
} UdpReader;

static atomic_ulong fork_count;

static void count_fork(void)
{
    atomic_fetch_add(&fork_count, 1);
}

void setup_reads(Reads *rd, uint8_t *buf, Py_ssize_t slot, unsigned from, unsigned count)
{
    for (unsigned i = from; i < count; i++) {
        struct msghdr *h = &rd->msgs[i].msg_hdr;
        memset(h, 0, sizeof(*h));
        rd->iov[i].iov_base = buf + (Py_ssize_t)i * slot, rd->iov[i].iov_len = (size_t)slot;
        h->msg_name = &rd->names[i], h->msg_namelen = sizeof(rd->names[i]);
        h->msg_iov = &rd->iov[i], h->msg_iovlen = 1;
        h->msg_control = rd->cmsgs[i], h->msg_controllen = CMSG_ROOM;
    }
}

void reset_reads(Reads *rd, unsigned dirty)
{
    for (unsigned i = 0; i < dirty; i++) {
        struct msghdr *h = &rd->msgs[i].msg_hdr;
        h->msg_namelen = sizeof(rd->names[i]), h->msg_controllen = CMSG_ROOM, h->msg_flags = 0;
        rd->msgs[i].msg_len = 0;
    }
}

/* One recvmmsg into slot s (which is the caller's to write: the thread's, or the caller's
 * in a child of fork); the reads, or -1 with errno. */
static int read_slot(UdpReader *r, Slot *s)
{
    reset_reads(&s->rd, s->dirty);
    int got = recvmmsg(r->fd, s->rd.msgs, (unsigned)r->count, MSG_DONTWAIT, NULL);
    unsigned touched = (unsigned)(got > 0 ? got : 0) + 1;
    s->dirty = touched < (unsigned)r->count ? touched : (unsigned)r->count;
    return got;
}

/* Wait until the socket is readable (or has an error queued) or the thread is to stop. A
 * socket poll refuses (gone: never, the caller closes it after close()) is waited out on
 * stopfd alone, not spun on. */
static void wait_readable(UdpReader *r)
{
    struct pollfd p[2] = {{r->stopfd, POLLIN, 0}, {r->fd, POLLIN, 0}};
    if (poll(p, 2, -1) < 0 && errno != EINTR)
        return;
    if (p[1].revents & POLLNVAL)
        poll(p, 1, -1);
}

static void signal_filled(UdpReader *r)
{
    uint64_t one = 1;
    if (!r->signalled && write(r->efd, &one, sizeof(one)) == sizeof(one))
        r->signalled = 1;
}

static void *reader_main(void *arg)
{
    UdpReader *r = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's */
    pthread_setname_np(pthread_self(), "wgpy-udpread");
    pthread_mutex_lock(&r->mu);
    while (!r->stopping) {
        if (r->filled - r->freed == (uint64_t)r->nslots) {
            r->waits++;
            pthread_cond_wait(&r->room, &r->mu);
            continue;
        }
        Slot *s = &r->slots[r->filled % (uint64_t)r->nslots];
        pthread_mutex_unlock(&r->mu);
        int got = read_slot(r, s);
        if (got <= 0) /* ran dry: wait; an error (ICMP's) was taken, and poll says if more */
            wait_readable(r);
        pthread_mutex_lock(&r->mu);
        if (got > 0) {
            s->got = got;
            r->filled++;
            signal_filled(r);
        }
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* In a child of fork: the thread was the parent's; the mutex is made anew and the filled
 * slots are dropped (the parent reads them), from now on takes read themselves. */
static void orphan(UdpReader *r)
{
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->room, NULL);
    r->filled = r->taken = r->freed;
    r->signalled = r->running = 0;
    r->forks = atomic_load(&fork_count);
}

/* Stop and join the thread; close the eventfds. */
static void reader_stop(UdpReader *r)
{
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    if (r->running) {
        uint64_t one = 1;
        pthread_mutex_lock(&r->mu);
        r->stopping = 1;
        pthread_cond_broadcast(&r->room);
        pthread_mutex_unlock(&r->mu);
        if (write(r->stopfd, &one, sizeof(one)) != sizeof(one))
            abort(); /* an eventfd at 1 takes a write: never */
        Py_BEGIN_ALLOW_THREADS
        pthread_join(r->tid, NULL);
        Py_END_ALLOW_THREADS
        r->running = 0;
    }
    r->stopping = 1;
    if (r->efd >= 0)
        close(r->efd);
    if (r->stopfd >= 0)
        close(r->stopfd);
    r->efd = r->stopfd = -1;
}

/* In a child of fork (no thread): a read into the next slot, the GIL released. */
static void read_here(UdpReader *r)
{
    if (r->stopping || r->filled - r->freed == (uint64_t)r->nslots)
        return;
    Slot *s = &r->slots[r->filled % (uint64_t)r->nslots];
    int got;
    Py_BEGIN_ALLOW_THREADS
    got = read_slot(r, s);
    Py_END_ALLOW_THREADS
    if (got > 0)
        s->got = got, r->filled++;
}

int reader_take(PyObject *reader, const Py_buffer *buf, Py_ssize_t slot, Py_ssize_t count,
                ReaderSlot *out)
{
    UdpReader *r = (UdpReader *)reader;
    if (buf->obj != reader || slot != r->size || count != r->count) {
        PyErr_SetString(PyExc_ValueError, "a reader's drain: its buffer, size and count");
        return -1;
    }
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    pthread_mutex_lock(&r->mu);
    if (r->freed < r->taken) { /* the last drain's reads: Python is done with them */
        r->freed++;
        pthread_cond_signal(&r->room);
    }
    pthread_mutex_unlock(&r->mu);
    if (!r->running)
        read_here(r);
    pthread_mutex_lock(&r->mu);
    out->fd = r->fd, out->got = 0, out->rd = NULL, out->buf = NULL, out->base = 0;
    if (r->taken < r->filled) {
        uint64_t at = r->taken++ % (uint64_t)r->nslots;
        out->rd = &r->slots[at].rd, out->got = r->slots[at].got;
        out->base = (Py_ssize_t)at * r->size * r->count, out->buf = r->ring + out->base;
    }
    uint64_t drained;
    if (r->taken == r->filled && r->signalled && read(r->efd, &drained, sizeof(drained)) > 0)
        r->signalled = 0;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static int start(UdpReader *r)
{
    r->ring_len = (size_t)r->nslots * (size_t)r->count * (size_t)r->size;
    void *ring = mmap(NULL, r->ring_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0); /* pages are made as reads touch them: a GRO read's 64 KiB */
    r->slots = PyMem_Calloc((size_t)r->nslots, sizeof(Slot));
    if (ring == MAP_FAILED || r->slots == NULL) {
        if (ring != MAP_FAILED)
            munmap(ring, r->ring_len);
        PyErr_NoMemory();
        return -1;
    }
    r->ring = ring;
    for (int i = 0; i < r->nslots; i++) {
        uint8_t *at = r->ring + (size_t)i * (size_t)r->count * (size_t)r->size;
        setup_reads(&r->slots[i].rd, at, r->size, 0, (unsigned)r->count);
    }
    r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->room, NULL);
    r->forks = atomic_load(&fork_count);
    r->ready = 1;
    int err = r->efd < 0 || r->stopfd < 0 ? errno : pthread_create(&r->tid, NULL, reader_main, r);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->running = 1;
    return 0;
}

static PyObject *UdpReader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "slots", "count", "size", NULL};
    int fd, slots = 4, count = 64;
    Py_ssize_t size = 65536 + 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|iin:UdpReader", kwlist, &fd, &slots, &count,
                                     &size))
        return NULL;
    if (fd < 0 || slots < 2 || slots > SLOTS_MAX || count < 1 || count > MAX_READS || size < 1 ||
        size > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "fd >= 0, 2 <= slots <= %d, 1 <= count <= %d, size",
                     SLOTS_MAX, MAX_READS);
        return NULL;
    }
    UdpReader *r = (UdpReader *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->fd = fd, r->nslots = slots, r->count = count, r->size = size;
    r->efd = r->stopfd = -1;
    if (start(r) < 0)
        Py_CLEAR(r);
    return (PyObject *)r;
}

static void UdpReader_dealloc(UdpReader *r)
{
    if (r->ready) {
        reader_stop(r);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->room);
    } else {
        if (r->efd >= 0)
            close(r->efd);
        if (r->stopfd >= 0)
            close(r->stopfd);
    }
    if (r->ring != NULL)
        munmap(r->ring, r->ring_len);
    PyMem_Free(r->slots);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *UdpReader_fileno(UdpReader *r, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(r->efd);
}

static PyObject *UdpReader_close(UdpReader *r, PyObject *Py_UNUSED(ignored))
{
    reader_stop(r);
    Py_RETURN_NONE;
}

static PyObject *UdpReader_counts(UdpReader *r, PyObject *Py_UNUSED(ignored))
{
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    pthread_mutex_lock(&r->mu);
    unsigned long long filled = r->filled, waits = r->waits;
    pthread_mutex_unlock(&r->mu);
    return Py_BuildValue("(KK)", filled, waits);
}

static PyObject *UdpReader_running(UdpReader *r, void *Py_UNUSED(closure))
{
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    return PyBool_FromLong(r->running);
}

static int UdpReader_getbuffer(UdpReader *r, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)r, r->ring, (Py_ssize_t)r->ring_len, 0, flags);
}

static PyBufferProcs UdpReader_as_buffer = {(getbufferproc)UdpReader_getbuffer, NULL};

static PyGetSetDef UdpReader_getset[] = {
    {"running", (getter)UdpReader_running, NULL, "whether the thread reads (else a take)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef UdpReader_methods[] = {
    {"fileno", (PyCFunction)UdpReader_fileno, METH_NOARGS,
     "fileno() -> the eventfd, readable while a filled slot waits (-1 once closed)."},
    {"close", (PyCFunction)UdpReader_close, METH_NOARGS,
     "close(): stop and join the thread (then the socket may be closed)."},
    {"counts", (PyCFunction)UdpReader_counts, METH_NOARGS,
     "counts() -> (slots filled, waits for a free slot)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject UdpReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._classify.UdpReader",
    .tp_doc = "UdpReader(fd, slots=4, count=64, size=69632): a thread reading socket fd into\n"
              "a ring of slots for Classifier.drain (given the reader as fd and buf).",
    .tp_basicsize = sizeof(UdpReader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = UdpReader_new,
    .tp_dealloc = (destructor)UdpReader_dealloc,
    .tp_methods = UdpReader_methods,
    .tp_getset = UdpReader_getset,
    .tp_as_buffer = &UdpReader_as_buffer,
};

/* Once per process: count forks, so that a reader knows its thread is not there. */
int reader_init(void)
{
    static int once;
    if (!once) {
        if (pthread_atfork(NULL, NULL, count_fork) != 0)
            return -1;
        once = 1;
    }
    return PyType_Ready(&UdpReaderType);
}
