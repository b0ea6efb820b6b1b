/* wgpy._native: the crypto threads.
 *
 * The pool runs the chunks of seal and open_batch, and the X25519 exchanges of a batch of
 * handshakes (dh.c). Sessions and sealers hold their key, not an OpenSSL context: every thread that seals or
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

#include "native.h"

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
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, 0, 0, 0, NULL};

static pthread_mutex_t pool_config = PTHREAD_MUTEX_INITIALIZER;

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
void pool_run(ChunkFn fn, void *arg, long nchunks)
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
long chunks_for(Py_ssize_t n)
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
    pthread_mutex_init(&pool_config, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.job = NULL;
    pool.nworkers = 0;
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
    pool.nworkers = (int)started;
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
