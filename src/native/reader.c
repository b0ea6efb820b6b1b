/* wgpy._classify: UdpReader, the reader stage of the receive direction (issue 17 item 4).
 *
 * Without it the loop thread reads the socket (Classifier.drain's recvmmsg), then opens
 * what it read (open_batch, the loop thread one of the crypto workers) and only then reads
 * again. With it, while there is a backlog, a thread of its own reads the socket,
 * recvmmsg(MSG_DONTWAIT), into a small ring of slots (each DRAIN reads of UDP_BUF bytes
 * with their headers, as the drain's own buffer) while the loop thread classifies and
 * opens the reads before, and signals an eventfd when it filled one. The drain
 * (`Classifier.drain` given the reader for the socket and its buffer) takes the oldest
 * filled slot and classifies it exactly as it classifies its own reads; when none is
 * filled it reads the socket itself, into the next slot. A read that brought `arm` reads
 * or more (2: more than a lone packet, a backlog) arms the thread: it reads on, slot
 * after slot, until a read finds nothing (the socket ran dry); then it sleeps, and the
 * loop, woken by the socket as without a thread, reads itself. So a lone packet (a ping)
 * is read by the loop thread at once, no thread woken on its way; under load the reads
 * overlap the opening.
 *
 *   UdpReader(fd, slots=4, count=64, size=69632, arm=2)   the thread for socket fd
 *   fileno()    the eventfd: readable while a slot the thread filled waits
 *   close()     stop and join the thread (before the socket is closed); later drains
 *               read nothing: the slots it had filled are dropped, not drained
 *   counts()    (slots filled, of them by the thread, its waits for a free slot)
 *   the buffer protocol: the slots' bytes, one after another (the reads' offsets)
 *
 * Who touches what. The slots are a ring of sequence numbers under `mu`: a slot is filled
 * by whoever reads (the thread, or the caller when none is filled), one read at a time
 * (`reading`), in the order of `filled`, so the slots hold the socket's datagrams in
 * order; the caller (with the GIL) takes slot `taken` while taken < filled, and gives it
 * back (freed) on its next take: Python is done with a drain's reads when it asks for the
 * next drain (what it keeps, it copied: the opened plaintext is in buffers of its own,
 * handshake messages are bytes). A slot between freed and filled is the caller's alone;
 * the one being read, the reader's alone. The thread never takes the GIL or touches a
 * Python object; the caller never takes the GIL holding mu. The eventfd is written (once)
 * under mu when the thread filled a slot and read back to zero under mu when the caller
 * took the last filled one. The buffer lives as long as the object (a memoryview of it
 * holds a reference); close() joins the thread before anything is freed; the socket is the
 * caller's, to close after close(). In a child of fork the thread is gone: there the
 * caller does all the reads, and the eventfd (the parent's) is closed. One caller at a
 * time (the loop's thread): a take from another thread while one is under way raises
 * RuntimeError; close() may come from any thread. */

#include "classify.h"

#include <errno.h>
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
    int over;       /* full, and the socket's queue was over half full after it */
    unsigned dirty; /* headers the last recvmmsg may have written back */
} Slot;

typedef struct {
    PyObject_HEAD
    int fd;             /* the socket, the caller's */
    int efd;            /* readable while a slot the thread filled waits; -1 once closed */
    uint8_t *ring;      /* slots x count x size bytes */
    size_t ring_len;
    Py_ssize_t size;    /* bytes per read */
    int count, nslots;
    Slot *slots;
    pthread_mutex_t mu;
    pthread_cond_t wake; /* for the thread: armed, a slot given back, or stopping */
    pthread_cond_t read; /* for the caller: the thread's read is done */
    uint64_t filled, taken, freed; /* under mu */
    uint64_t by_thread, waits;     /* slots the thread filled; it found none free (mu) */
    int signalled;                 /* the eventfd holds a count (under mu) */
    int armed;                     /* a backlog: the thread reads on (under mu) */
    int arm;                       /* a read of this many reads arms the thread */
    int reading;                   /* a read is under way, the thread's or the caller's */
    int busy;                      /* a take is under way (under mu): one caller at a time */
    int stopping, running, ready;  /* running: under mu once started */
    int joining;                   /* a closer joins the thread (under mu) */
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

#define SO_MEMINFO_ 55 /* what the socket holds and may hold: its queue's bytes, truesize */
enum { MEMINFO_RMEM_ALLOC = 0, MEMINFO_RCVBUF = 1, MEMINFO_N = 2 };

int overflowing(int fd)
{
    uint32_t info[16] = {0};
    socklen_t len = sizeof(info);
    return getsockopt(fd, SOL_SOCKET, SO_MEMINFO_, info, &len) == 0 &&
           len >= MEMINFO_N * sizeof(uint32_t) &&
           info[MEMINFO_RMEM_ALLOC] > info[MEMINFO_RCVBUF] / 2;
}

/* One recvmmsg into slot s (the reader's to write: the thread, or the caller when it
 * reads); the reads, or -1 with errno. A full one asks at once whether the queue it left
 * is over half full: asked later, the thread's next read would have emptied it. */
static int read_slot(UdpReader *r, Slot *s)
{
    reset_reads(&s->rd, s->dirty);
    int got = recvmmsg(r->fd, s->rd.msgs, (unsigned)r->count, MSG_DONTWAIT, NULL);
    unsigned touched = (unsigned)(got > 0 ? got : 0) + 1;
    s->dirty = touched < (unsigned)r->count ? touched : (unsigned)r->count;
    s->over = got == r->count && overflowing(r->fd);
    return got;
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
        int full = r->filled - r->freed == (uint64_t)r->nslots;
        if (!r->armed || r->reading || full) {
            r->waits += r->armed && full;
            pthread_cond_wait(&r->wake, &r->mu);
            continue;
        }
        Slot *s = &r->slots[r->filled % (uint64_t)r->nslots];
        r->reading = 1;
        pthread_mutex_unlock(&r->mu);
        int got = read_slot(r, s);
        pthread_mutex_lock(&r->mu);
        r->reading = 0;
        if (got > 0) {
            s->got = got;
            r->filled++, r->by_thread++;
            signal_filled(r);
        }
        if (got <= 0)
            r->armed = 0; /* read dry (or an error): the loop waits on the socket again */
        pthread_cond_broadcast(&r->read);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* In a child of fork: the thread was the parent's; the mutex is made anew and the filled
 * slots are dropped (the parent reads them), from now on takes read themselves. The
 * eventfd is the parent's too (one kernel object, readable whenever the parent's thread
 * fills a slot): fileno() is -1 there. Its number is left alone, not closed: noticed
 * late (here, at the child's first use), the child may have closed it since and the
 * number be another file's now. */
static void orphan(UdpReader *r)
{
    r->efd = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->wake, NULL);
    pthread_cond_init(&r->read, NULL);
    r->filled = r->taken = r->freed;
    r->signalled = r->running = r->joining = r->armed = r->reading = r->busy = 0;
    r->forks = atomic_load(&fork_count);
}

/* Stop and join the thread (it is waiting, or in a recvmmsg that does not block); close
 * the eventfd. Closers on several threads (the GIL let go while one joins): one joins,
 * the others wait, without the GIL, until it has (two joins of one thread: undefined,
 * glibc's second one hung). */
static void reader_stop(UdpReader *r)
{
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    pthread_mutex_lock(&r->mu);
    int join = r->running && !r->joining;
    r->stopping = 1, r->joining |= join;
    pthread_cond_broadcast(&r->wake);
    pthread_mutex_unlock(&r->mu);
    int efd;
    Py_BEGIN_ALLOW_THREADS
    if (join)
        pthread_join(r->tid, NULL);
    pthread_mutex_lock(&r->mu);
    if (join)
        r->running = 0, pthread_cond_broadcast(&r->read);
    while (r->running)
        pthread_cond_wait(&r->read, &r->mu);
    efd = r->efd; /* a take elsewhere reads it under mu: gone, or not yet */
    r->efd = -1;
    pthread_mutex_unlock(&r->mu);
    Py_END_ALLOW_THREADS
    if (efd >= 0)
        close(efd);
}

/* With mu held, no read under way and none filled: the caller reads the socket into the
 * next slot itself, mu released and the GIL too, and takes it; a full read arms the
 * thread to read on while the caller opens this one. */
static void read_here(UdpReader *r, ReaderSlot *out)
{
    uint64_t at = r->filled % (uint64_t)r->nslots;
    Slot *s = &r->slots[at];
    int got;
    r->reading = 1;
    pthread_mutex_unlock(&r->mu);
    Py_BEGIN_ALLOW_THREADS
    got = read_slot(r, s);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&r->mu);
    r->reading = 0;
    r->armed = got >= r->arm && r->running; /* more than a lone packet: a backlog */
    if (r->armed)
        pthread_cond_signal(&r->wake);
    if (got <= 0)
        return;
    s->got = got;
    r->filled++, r->taken++;
    out->rd = &s->rd, out->got = got, out->over = s->over;
    out->base = (Py_ssize_t)at * r->size * r->count, out->buf = r->ring + out->base;
}

/* With mu held: wait, without the GIL, until the thread's read under way is done. */
static void wait_read(UdpReader *r)
{
    pthread_mutex_unlock(&r->mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->mu);
    while (r->reading && r->taken == r->filled)
        pthread_cond_wait(&r->read, &r->mu);
    pthread_mutex_unlock(&r->mu);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&r->mu);
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
    out->fd = r->fd, out->got = out->over = 0, out->rd = NULL, out->buf = NULL, out->base = 0;
    pthread_mutex_lock(&r->mu);
    if (r->busy) { /* another thread's take, its mu (and GIL) let go while it reads */
        pthread_mutex_unlock(&r->mu);
        PyErr_SetString(PyExc_RuntimeError, "a reader's drain: one caller at a time");
        return -1;
    }
    r->busy = 1;
    if (r->freed < r->taken) { /* the last drain's reads: Python is done with them */
        r->freed++;
        if (r->armed) /* (only an armed thread waits for room: no futex call for a ping) */
            pthread_cond_signal(&r->wake);
    }
    if (!r->stopping && r->taken == r->filled && r->reading)
        wait_read(r); /* the thread's read: the datagrams before any the socket still has */
    if (r->stopping) {
        /* closed: what the thread had read is stale (the socket may be closed by now, its
         * number another file's): nothing taken, so no reply goes out for it */
    } else if (r->taken < r->filled) {
        uint64_t at = r->taken++ % (uint64_t)r->nslots;
        out->rd = &r->slots[at].rd, out->got = r->slots[at].got, out->over = r->slots[at].over;
        out->base = (Py_ssize_t)at * r->size * r->count, out->buf = r->ring + out->base;
    } else {
        read_here(r, out);
    }
    if (r->taken == r->filled && r->signalled) {
        uint64_t drained; /* (non-blocking: a failure, EAGAIN, means it holds 0 already) */
        ssize_t n = r->efd >= 0 ? read(r->efd, &drained, sizeof(drained)) : 0;
        (void)n;
        r->signalled = 0; /* cleared whatever read said: else no fill would write it again */
    }
    r->busy = 0;
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
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->wake, NULL);
    pthread_cond_init(&r->read, NULL);
    r->forks = atomic_load(&fork_count);
    r->ready = 1;
    int err = r->efd < 0 ? errno : pthread_create(&r->tid, NULL, reader_main, r);
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
    static char *kwlist[] = {"fd", "slots", "count", "size", "arm", NULL};
    int fd, slots = 4, count = 64, arm = 2;
    Py_ssize_t size = 65536 + 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|iini:UdpReader", kwlist, &fd, &slots,
                                     &count, &size, &arm))
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
    r->fd = fd, r->nslots = slots, r->count = count, r->size = size, r->arm = arm < 1 ? 1 : arm;
    r->efd = -1;
    if (start(r) < 0)
        Py_CLEAR(r);
    return (PyObject *)r;
}

static void UdpReader_dealloc(UdpReader *r)
{
    if (r->ready) {
        reader_stop(r);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->wake);
        pthread_cond_destroy(&r->read);
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
    unsigned long long filled = r->filled, by_thread = r->by_thread, waits = r->waits;
    pthread_mutex_unlock(&r->mu);
    return Py_BuildValue("(KKK)", filled, by_thread, waits);
}

static PyObject *UdpReader_running(UdpReader *r, void *Py_UNUSED(closure))
{
    if (r->forks != atomic_load(&fork_count))
        orphan(r);
    pthread_mutex_lock(&r->mu);
    int running = r->running;
    pthread_mutex_unlock(&r->mu);
    return PyBool_FromLong(running);
}

static int UdpReader_getbuffer(UdpReader *r, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)r, r->ring, (Py_ssize_t)r->ring_len, 0, flags);
}

static PyBufferProcs UdpReader_as_buffer = {(getbufferproc)UdpReader_getbuffer, NULL};

static PyGetSetDef UdpReader_getset[] = {
    {"running", (getter)UdpReader_running, NULL, "whether the thread is there (not: a child)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef UdpReader_methods[] = {
    {"fileno", (PyCFunction)UdpReader_fileno, METH_NOARGS,
     "fileno() -> the eventfd, readable while a slot the thread filled waits (-1 once\n"
     "closed); the loop watches it beside the socket."},
    {"close", (PyCFunction)UdpReader_close, METH_NOARGS,
     "close(): stop and join the thread (then the socket may be closed)."},
    {"counts", (PyCFunction)UdpReader_counts, METH_NOARGS,
     "counts() -> (slots filled, of them by the thread, its waits for a free slot)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject UdpReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._classify.UdpReader",
    .tp_doc = "UdpReader(fd, slots=4, count=64, size=69632, arm=2): a thread reading socket\n"
              "fd into a ring of slots for Classifier.drain (given the reader as fd and buf)\n"
              "while a read brings `arm` reads or more.",
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
