/* wgpy._native: a pipeline stage (issue 17 item 4): a thread that does the blocking system
 * calls of batches the loop thread queued, in order, from a bounded queue. The TUN writer
 * (writer.c: writev to the TUN) and the UDP sender (send.c: GSO sendmsg) are two of them;
 * this file is what they share, the queue, the thread and how both stop and survive fork.
 *
 * Who touches what: a queued job is made by the caller with the GIL and read by the
 * stage's thread without it until it is counted done; the caller collects it (its
 * outcome, then its free), with the GIL, on a later call (a call that raises after it
 * collected, its own batch not made, keeps those outcomes for the next call: `kept`).
 * The thread never touches a Python object and never takes the GIL; the caller never
 * takes the GIL while it holds `mu`. The counters: `queued` (the caller's) under `mu`, `done` (the thread's) changed
 * under `mu` and read atomically, `collected` under the GIL. A job of at most `inline_max`
 * packets that finds nothing queued is the caller's to do itself, the GIL released: a
 * lone packet (a ping) is not handed to another thread. In a child of fork the thread is
 * gone: what the parent had queued is dropped there (the parent does it), and the child
 * does its jobs on the caller. */

#include "native.h"

static atomic_ulong fork_count; /* children of fork this process is (each fork: +1) */

static void count_fork(void)
{
    atomic_fetch_add(&fork_count, 1);
}

static void *stage_main(void *arg)
{
    Stage *s = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's */
    pthread_setname_np(pthread_self(), s->ops->name);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stopping && s->done == s->queued)
            pthread_cond_wait(&s->work, &s->mu);
        if (s->done == s->queued)
            break; /* stopping, and all done */
        StageSlot slot = s->ring[s->done % (uint64_t)s->depth];
        pthread_mutex_unlock(&s->mu);
        s->ops->run(slot.job, slot.fd, s);
        pthread_mutex_lock(&s->mu);
        s->done++;
        pthread_cond_broadcast(&s->finished);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* With the GIL: free the jobs done so far, their outcomes appended to list (if not NULL).
 * -1 with an exception: the job whose report raised is freed (what it had appended stays
 * in list, which the caller keeps: stage_raise); the done jobs after it are left as they
 * are, for the next call to report (freed and not reported, their outcomes were lost). */
int stage_collect(Stage *s, PyObject *list)
{
    uint64_t done = s->done; /* an atomic load: the jobs up to it are done with */
    while (s->collected < done) {
        StageSlot *slot = &s->ring[s->collected % (uint64_t)s->depth];
        void *job = slot->job;
        slot->job = NULL;
        s->collected++; /* before the free, which may run Python code (a __del__) */
        int rc = list != NULL ? s->ops->report(job, list) : 0;
        s->ops->free(job);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* With the GIL: the list a call's outcomes go into: the outcomes a call that raised had
 * collected (they must not be lost: a source gone, TunGone), or a new list. */
PyObject *stage_outcomes(Stage *s)
{
    PyObject *list = s->kept;
    s->kept = NULL;
    return list != NULL ? list : PyList_New(0);
}

/* With the GIL, a call raising after it collected into list: the outcomes are kept for
 * the next call (its exception stands). Where a call in between (another thread while
 * this one's `dest` or queue wait let go of the GIL, or `dest` itself) raised and kept its
 * own, both are kept, this call's (the older) first. Steals list; NULL. */
PyObject *stage_raise(Stage *s, PyObject *list)
{
    if (list != NULL && PyList_GET_SIZE(list) > 0) {
        if (s->kept == NULL) {
            s->kept = list;
            return NULL;
        }
        /* the call's exception put aside: the list call must not run with it set */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
#else
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
#endif
        if (PyList_SetSlice(s->kept, 0, 0, list) < 0)
            PyErr_Clear(); /* no memory for the longer list: the older outcomes are lost */
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(exc);
#else
        PyErr_Restore(type, value, tb);
#endif
    }
    Py_XDECREF(list); /* tuples of numbers, bytes and endpoints: no Python code runs */
    return NULL;
}

/* In a child of fork: the thread was the parent's. Its queue is dropped here (the parent
 * does it); from now on the caller does the jobs. */
static void orphan(Stage *s)
{
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->finished, NULL);
    s->done = s->queued;
    s->running = s->stopping = 0;
    s->forks = atomic_load(&fork_count);
    stage_collect(s, NULL);
}

int stage_alive(Stage *s)
{
    if (s->forks != atomic_load(&fork_count))
        orphan(s);
    return s->running;
}

/* Wait, without the GIL, until `done` passes `from` or the queue is empty. Called with
 * the GIL and without mu (the GIL is never taken while holding mu). */
static void wait_done(Stage *s, uint64_t from)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->mu);
    while (s->done == from && s->done != s->queued)
        pthread_cond_wait(&s->finished, &s->mu);
    pthread_mutex_unlock(&s->mu);
    Py_END_ALLOW_THREADS
}

int stage_enqueue(Stage *s, void *job, int fd, Py_ssize_t packets, PyObject *list)
{
    if (!stage_alive(s))
        return 1;
    for (;;) {
        if (stage_collect(s, list) < 0)
            return -1;
        pthread_mutex_lock(&s->mu);
        uint64_t done = s->done;
        int idle = done == s->queued;
        if (s->stopping || (idle && packets <= s->inline_max)) {
            pthread_mutex_unlock(&s->mu);
            return 1;
        }
        if (s->queued - s->collected < (uint64_t)s->depth) {
            s->ring[s->queued % (uint64_t)s->depth] = (StageSlot){job, fd};
            s->queued++;
            pthread_cond_signal(&s->work);
            pthread_mutex_unlock(&s->mu);
            return 0;
        }
        s->waits++;
        pthread_mutex_unlock(&s->mu);
        if (done == s->collected) /* nothing to collect: wait for the thread */
            wait_done(s, done);
    }
}

/* Wait until everything queued is done; collect it. -1 with an exception. */
int stage_drain(Stage *s, PyObject *list)
{
    if (!stage_alive(s))
        return 0;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        uint64_t done = s->done, queued = s->queued;
        pthread_mutex_unlock(&s->mu);
        if (done == queued)
            return stage_collect(s, list);
        wait_done(s, done);
    }
}

/* Stop the thread once everything queued is done (it works the queue off first). */
void stage_stop(Stage *s)
{
    if (!stage_alive(s))
        return;
    pthread_mutex_lock(&s->mu);
    int first = !s->stopping;
    s->stopping = 1;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
    if (first) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->tid, NULL);
        Py_END_ALLOW_THREADS
        s->running = 0;
    } else {
        stage_drain(s, NULL); /* another thread is joining: wait for the queue all the same */
    }
    stage_collect(s, NULL);
}

PyObject *stage_counts(Stage *s)
{
    (void)stage_alive(s); /* in a child of fork: the mutex made anew before it is taken */
    pthread_mutex_lock(&s->mu);
    uint64_t queued = s->queued;
    pthread_mutex_unlock(&s->mu);
    return Py_BuildValue("(KKK)", (unsigned long long)queued, (unsigned long long)s->inlined,
                         (unsigned long long)s->waits);
}

/* Set up s and start its thread: 0, or -1 with an exception (ValueError, OSError). */
int stage_start(Stage *s, const StageOps *ops, long depth, long inline_max)
{
    if (depth < 1 || depth > STAGE_DEPTH_MAX) {
        PyErr_Format(PyExc_ValueError, "1 <= depth <= %d", STAGE_DEPTH_MAX);
        return -1;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->finished, NULL);
    s->ops = ops;
    s->depth = depth, s->inline_max = inline_max;
    s->forks = atomic_load(&fork_count);
    s->ready = 1;
    int err = pthread_create(&s->tid, NULL, stage_main, s);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->running = 1;
    return 0;
}

/* Stop the thread and free what is left (a dealloc's part; s may never have started). */
void stage_destroy(Stage *s)
{
    if (!s->ready)
        return;
    stage_stop(s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->finished);
    Py_CLEAR(s->kept);
    s->ready = 0;
}

/* Once per process: count forks, so that a stage knows its thread is not there. */
int stage_init(void)
{
    static int once;
    if (!once) {
        if (pthread_atfork(NULL, NULL, count_fork) != 0)
            return -1;
        once = 1;
    }
    return 0;
}
