/* wgpy._native: the crypto threads.
 *
 * The pool runs the chunks of seal and open_batch, and the X25519 exchanges of a batch of
 * handshakes (dh.c). Sessions and sealers hold their key, not an OpenSSL context: every thread that seals or
 * opens has a context per direction of its own (made on first use, freed when the thread
 * ends), given the key with each packet's nonce (ChaCha20's key setup is a copy). So a
 * batch can be cut into chunks that several threads encrypt or decrypt at once.
 *
 * The pool: `set_threads(n)` starts n workers. `pool_run` posts a job (chunks 0..n-1 of
 * one call), works on it itself and returns when all its chunks are done; the workers it
 * wakes join in (one per chunk beyond the caller's first, as many as may be woken). One
 * job at a time: a caller that finds the pool busy does its chunks alone.
 * The workers never touch Python objects and never take the GIL; every call that uses
 * them has released it. A worker that never wakes (after fork, say) costs speed only:
 * the caller runs whatever chunks are left.
 *
 * How many may be woken (`set_spread`): all of them, or (the daemon's choice) only as
 * many as the CPUs this process may run on had to spare lately: idle time, plus the
 * workers' own, measured over the last SPREAD_PERIOD. A wake-up costs both threads a few
 * microseconds of system time and moves the batch's data to another core; with a core
 * idle that buys throughput, but where every core is busy anyway (2 cores shared by both
 * ends of a tunnel and iperf3) it only takes CPU from whoever would have run there. */

#include "native.h"

#include <ctype.h>

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
EVP_CIPHER_CTX *thread_ctx(int encrypt)
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
    int allowed;   /* how many a job may wake now (nworkers unless spare_only) */
    atomic_int spare_only; /* set_spread("spare") */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, 0, 0, 0, NULL, 0, 0};

static pthread_mutex_t pool_config = PTHREAD_MUTEX_INITIALIZER;

/* ------------------------------------------------------------------ spare CPUs */

#define SPREAD_PERIOD 100000000LL /* ns between measurements of the spare CPU time */
#define STAT_CAP (1 << 18)        /* /proc/stat with a line per CPU, up to CPU_SETSIZE */

static struct {
    pthread_mutex_t mu;  /* one measurement at a time: tried, never waited for */
    atomic_llong next;   /* CLOCK_MONOTONIC ns: when to measure again */
    long long at;        /* when the last measurement was taken (0: none yet) */
    double idle, busy;   /* CPU seconds then: idle on our CPUs, run by our workers */
    char *text;          /* /proc/stat, read here */
} spread = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, NULL};

static long long now_ns(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Seconds the CPUs in `cpus` spent idle (idle + iowait) so far, from /proc/stat; -1 if it
 * cannot be read or does not list every one of them (a container's /proc/stat rewritten
 * by LXCFS numbers its CPUs from 0, whatever our affinity mask says). */
static double idle_seconds(const cpu_set_t *cpus)
{
    if (spread.text == NULL && (spread.text = malloc(STAT_CAP)) == NULL)
        return -1;
    int fd = open("/proc/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    ssize_t got;
    while (len < STAT_CAP - 1 && (got = read(fd, spread.text + len, STAT_CAP - 1 - len)) > 0)
        len += (size_t)got;
    close(fd);
    spread.text[len] = 0;
    unsigned long long ticks = 0;
    int found = 0;
    for (char *line = spread.text; line != NULL && strncmp(line, "cpu", 3) == 0;) {
        unsigned cpu;
        unsigned long long user, nice, sys, idle, iowait;
        /* "cpuN ...": the first line ("cpu  ...", all of them) has no digit there, and %u
         * would skip the blanks and read its first count as a CPU's number */
        if (isdigit((unsigned char)line[3])
            && sscanf(line, "cpu%u %llu %llu %llu %llu %llu", &cpu, &user, &nice, &sys, &idle,
                      &iowait) == 6 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, cpus)) {
            ticks += idle + iowait;
            found++;
        }
        line = strchr(line, '\n');
        line = line ? line + 1 : NULL;
    }
    if (found < CPU_COUNT(cpus))
        return -1;
    return (double)ticks / (double)sysconf(_SC_CLK_TCK);
}

/* CPU seconds our workers have run so far; under pool.mu (their threads not joined). */
static double workers_seconds(void)
{
    double busy = 0;
    for (int i = 0; i < pool.nworkers; i++) {
        clockid_t clock;
        if (pthread_getcpuclockid(pool.tids[i], &clock) == 0)
            busy += (double)now_ns(clock) / 1e9;
    }
    return busy;
}

/* Every SPREAD_PERIOD, on whichever caller comes first: how many workers the spare CPU
 * time of the last period allows (idle time on the CPUs we may run on, plus our workers'
 * own, which they would leave idle), rounded, at most one per CPU beside the caller's. */
static void measure_spare(void)
{
    long long now = now_ns(CLOCK_MONOTONIC);
    if (now < atomic_load_explicit(&spread.next, memory_order_relaxed)
        || pthread_mutex_trylock(&spread.mu) != 0)
        return;
    atomic_store_explicit(&spread.next, now + SPREAD_PERIOD, memory_order_relaxed);
    cpu_set_t cpus;
    double idle = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? idle_seconds(&cpus) : -1;
    pthread_mutex_lock(&pool.mu);
    double busy = workers_seconds();
    int most = idle >= 0 ? CPU_COUNT(&cpus) - 1 : pool.nworkers;
    most = most < pool.nworkers ? most : pool.nworkers;
    if (idle < 0) {
        pool.allowed = most; /* the idle time unknown: never starve the workers for good */
    } else if (spread.at > 0 && now > spread.at) {
        double ran = busy > spread.busy ? busy - spread.busy : 0; /* 0 across set_threads */
        double spare = (idle - spread.idle + ran) / ((double)(now - spread.at) / 1e9);
        int n = spare > 0 ? (int)(spare + 0.5) : 0;
        pool.allowed = n < most ? n : most;
    }
    pthread_mutex_unlock(&pool.mu);
    spread.at = idle >= 0 ? now : 0, spread.idle = idle, spread.busy = busy;
    pthread_mutex_unlock(&spread.mu);
}

/* How many workers a job may wake now. */
static int wakeable(void)
{
    if (atomic_load_explicit(&pool.spare_only, memory_order_relaxed))
        measure_spare();
    pthread_mutex_lock(&pool.mu);
    int n = pool.allowed;
    pthread_mutex_unlock(&pool.mu);
    return n;
}

/* ------------------------------------------------------------------ jobs */

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

/* fn(arg, c) for c in 0..nchunks-1, here and on the workers it may wake (one for each
 * chunk beyond the first, no more: the others sleep on); without the GIL. */
void pool_run(ChunkFn fn, void *arg, long nchunks)
{
    Job job = {fn, arg, nchunks, 0, 0};
    int shared = 0;
    if (nchunks > 1) {
        if (atomic_load_explicit(&pool.spare_only, memory_order_relaxed))
            measure_spare();
        pthread_mutex_lock(&pool.mu);
        long wake = pool.allowed < nchunks - 1 ? pool.allowed : nchunks - 1;
        if (pool.job == NULL && wake > 0) {
            pool.job = &job;
            pool.gen++;
            shared = 1;
            while (wake-- > 0) /* each signal wakes one sleeping worker */
                pthread_cond_signal(&pool.work);
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
 * chunk if no worker may be woken. A lone packet is never worth a wake-up: it is done on
 * the calling thread at once. */
#define CHUNK 8
long chunks_for(Py_ssize_t n)
{
    return n > CHUNK && wakeable() ? (long)((n + CHUNK - 1) / CHUNK) : 1;
}

static void stop_workers(void)
{
    pthread_mutex_lock(&pool.mu);
    pool.stopping = 1;
    pthread_cond_broadcast(&pool.work);
    int n = pool.nworkers;
    pthread_t *tids = pool.tids;
    pool.nworkers = pool.allowed = 0;
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
    pthread_mutex_init(&pool_config, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pthread_mutex_init(&spread.mu, NULL);
    pool.job = NULL;
    pool.nworkers = pool.allowed = 0;
    pool.stopping = 0;
    free(pool.tids);
    pool.tids = NULL;
}

PyObject *set_threads(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "0 <= workers <= 1024");
        return NULL;
    }
    long started = 0;
    pthread_t *tids = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&pool_config); /* one set_threads at a time: the old workers joined */
    stop_workers();                   /* before the new start */
    tids = calloc(n ? (size_t)n : 1, sizeof(pthread_t));
    pthread_mutex_lock(&pool.mu);
    for (; tids != NULL && started < n; started++)
        if (pthread_create(&tids[started], NULL, worker_main, NULL) != 0)
            break;
    pool.tids = tids;
    pool.nworkers = pool.allowed = (int)started;
    atomic_store(&pool.spare_only, 0); /* any of them: set_spread(True) after, for less */
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool_config);
    Py_END_ALLOW_THREADS
    if (tids == NULL)
        return PyErr_NoMemory();
    if (started < n)
        return PyErr_Format(PyExc_OSError, "started %ld of %ld crypto threads", started, n);
    Py_RETURN_NONE;
}

PyObject *get_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&pool.mu);
    int n = pool.nworkers;
    pthread_mutex_unlock(&pool.mu);
    return PyLong_FromLong(n);
}

/* set_spread(spare: bool): wake only as many workers as the CPUs had to spare lately
 * (True), or all of them for every batch worth it (False, as set_threads leaves it). */
PyObject *set_spread(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int spare = PyObject_IsTrue(arg);
    if (spare < 0)
        return NULL;
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.spare_only, spare);
    pool.allowed = pool.nworkers; /* all until measured: a period from now */
    pthread_mutex_unlock(&pool.mu);
    atomic_store(&spread.next, 0);
    Py_RETURN_NONE;
}

/* spread() -> (spare_only, workers a batch may wake now) */
PyObject *get_spread(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&pool.mu);
    int allowed = pool.allowed;
    pthread_mutex_unlock(&pool.mu);
    return Py_BuildValue("(Oi)", atomic_load(&pool.spare_only) ? Py_True : Py_False, allowed);
}

/* Once per process: the contexts' thread key, and no workers in a child of fork. */
int pool_init(void)
{
    static int once;
    if (!once) {
        if (pthread_key_create(&ctx_key, free_thread_ctx) != 0
            || pthread_atfork(NULL, NULL, pool_after_fork) != 0)
            return -1;
        once = 1;
    }
    return 0;
}
