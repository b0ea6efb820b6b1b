/* The declarations the files of wgpy._native share (src/native/: one file per job).
 *
 *   module.c    the module's table and init
 *   args.c      the helpers every job uses to take its arguments (keys, buffers, locks)
 *   pool.c      the crypto worker threads and each thread's OpenSSL contexts
 *   open.c      receiving: Session (key + replay window), open_batch, and open_lone: a
 *               lone read's hop to the TUN (open, source check, write) in one call
 *   seal.c      sending: Sealer (key + counter), seal and seal_runs
 *   route.c     Routes (a mirror of the allowed IPs) and route: packets grouped by peer
 *   offload.c   the TUN's offloads: checksum, coalesce (GRO), split (TSO), cutting
 *               super-packets (for split, segments and seal_runs)
 *   spans.c     Spans: a run of opened packets, spans of one buffer, open -> coalesce
 *   dh.c        X25519 in batches for the handshakes: x25519
 *   screen.c    initiations screened in batches: up to the initiator's static key, in C
 *   stage.c     a pipeline stage: a thread doing queued batches' system calls, in order
 *   writer.c    TunWriter: the stage that makes the TUN writes
 *   send.c      the UDP sends (send_runs) and UdpSender: the stage that makes them
 *
 * Only PyInit__native is exported from the shared object (-fvisibility=hidden).
 */
#ifndef WGPY_NATIVE_H
#define WGPY_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <structmember.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KEY_LEN 32
#define TAG_LEN 16
#define HEADER_LEN 16
#define DATA_MIN (HEADER_LEN + TAG_LEN)
#define REJECT_AFTER_MESSAGES (UINT64_MAX - 8192) /* 2**64 - 2**13 - 1 */
#define WORDS 128
#define WINDOW (WORDS * 64 - 64)
#define VNET_LEN 10

static inline uint32_t rd32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t rd64le(const uint8_t *p)
{
    return (uint64_t)rd32le(p) | (uint64_t)rd32le(p + 4) << 32;
}
static inline void wr32le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}
static inline void wr64le(uint8_t *p, uint64_t v)
{
    wr32le(p, (uint32_t)v);
    wr32le(p + 4, (uint32_t)(v >> 32));
}
static inline void wr16le(uint8_t *p, unsigned v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline unsigned rd16be(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static inline void wr16be(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static inline uint32_t rd32be(const uint8_t *p) { return (uint32_t)rd16be(p) << 16 | rd16be(p + 2); }
static inline void wr32be(uint8_t *p, uint32_t v)
{
    wr16be(p, v >> 16);
    wr16be(p + 2, v & 0xFFFF);
}


/* args.c */
void lock_gil_held(PyThread_type_lock lock);
int check_key(const Py_buffer *key);
Py_buffer *get_buffers(PyObject *tuple, Py_ssize_t n);
void release_buffers(Py_buffer *views, Py_ssize_t n);

/* pool.c */
typedef void (*ChunkFn)(void *arg, long chunk);
int pool_init(void);
EVP_CIPHER_CTX *thread_ctx(int encrypt);
void pool_run(ChunkFn fn, void *arg, long nchunks);
long chunks_for(Py_ssize_t n);
PyObject *set_threads(PyObject *module, PyObject *arg);
PyObject *get_threads(PyObject *module, PyObject *ignored);
PyObject *set_spread(PyObject *module, PyObject *arg);
PyObject *get_spread(PyObject *module, PyObject *ignored);

/* spans.c */
typedef struct {
    uint32_t off, len;
} Span;
typedef struct {
    PyObject_VAR_HEAD /* ob_size: the number of packets */
    PyObject *buf;    /* bytes: the plaintexts of one open_batch call */
    Span span[];      /* each packet's place in buf */
} Spans;
extern PyTypeObject SpansType;
Spans *spans_new(PyObject *buf, Py_ssize_t n);

/* open.c */
extern PyTypeObject SessionType;
PyObject *open_batch(PyObject *module, PyObject *args);
PyObject *open_lone(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* seal.c */
extern PyTypeObject SealerType;
size_t sealed_length(size_t len, size_t mtu);
int seal_one(PyObject *sealer, const uint8_t *packet, size_t len, size_t mtu, uint8_t *out);

/* route.c */
extern PyTypeObject RoutesType;
PyObject *route(PyObject *module, PyObject *args);
PyObject *routes_lookup(PyObject *routes, const uint8_t *addr, int len);
PyObject *routes_owner(PyObject *routes, const uint8_t *p, size_t n);

/* dh.c */
PyObject *x25519(PyObject *module, PyObject *jobs);
EVP_PKEY *x25519_load(const uint8_t priv[KEY_LEN], const uint8_t pub[KEY_LEN]);
int x25519_derive(EVP_PKEY *key, const uint8_t peer[KEY_LEN], uint8_t shared[KEY_LEN]);

/* screen.c */
int screen_init(void);
PyObject *screen(PyObject *module, PyObject *args);

/* offload.c */
typedef struct { /* a super-packet planned for cutting (core/ip.py segment) */
    const uint8_t *pkt;
    size_t iphl, l4, thl, hlen, n, mss, count; /* n: payload bytes; count: segments */
    int udp, v4;
    unsigned base, ip_id, flags; /* pseudo-header sum, first IPv4 id, TCP flags */
    uint32_t seq;
} Cut;
/* the longest segment cut_plan allows: an IPv6 payload length of 65535 after 40 bytes */
#define CUT_MAX (0xFFFF + 40)
int cut_plan(Cut *c, const uint8_t *pkt, size_t len, int udp, Py_ssize_t mss, size_t l4);
size_t cut_length(const Cut *c, size_t i);
void cut_write(const Cut *c, size_t i, uint8_t *o);
int super_packet_args(PyObject *sp, Py_buffer *v, Py_ssize_t *mss, size_t *l4, int *udp);
PyObject *segments(PyObject *module, PyObject *sp);
PyObject *checksum(PyObject *module, PyObject *args);
PyObject *coalesce(PyObject *module, PyObject *args, PyObject *kwds);
PyObject *split(PyObject *module, PyObject *args);
PyObject *read_nowait(PyObject *module, PyObject *args);
PyObject *read_packet(PyObject *module, PyObject *args);
PyObject *write_tun(PyObject *module, PyObject *args);
#define IOV_CAP 256 /* iovecs of one writev; a longer run is copied into one buffer */
struct iovec;
typedef struct TunBatch TunBatch; /* a planned batch of TUN writes (offload.c) */
TunBatch *tun_batch_new(PyObject *packets, int udp);
Py_ssize_t tun_batch_packets(const TunBatch *t);
void tun_batch_write(TunBatch *t, int fd, struct iovec *iov);
int tun_batch_failures(const TunBatch *t, PyObject *list);
void tun_batch_free(TunBatch *t);

/* stage.c: a thread doing the jobs a caller queues, in order (writer.c, send.c) */
#define STAGE_DEPTH_MAX 64
typedef struct Stage Stage;
typedef struct {
    const char *name;                              /* the thread's */
    void (*run)(void *job, int fd, Stage *stage);  /* on any thread, without the GIL */
    int (*report)(void *job, PyObject *list);      /* with the GIL: its outcome; -1, error */
    void (*free)(void *job);                       /* with the GIL */
} StageOps;
typedef struct {
    void *job;
    int fd;
} StageSlot;
struct Stage {
    pthread_mutex_t mu;
    pthread_cond_t work;     /* to the thread: a job queued, or stop */
    pthread_cond_t finished; /* to callers: a job done, or stopped */
    uint64_t queued, collected; /* collected <= done <= queued */
    _Atomic uint64_t done;      /* changed under mu (for the waits), read without it */
    uint64_t inlined, waits;    /* counts, for tests and benchmarks */
    long depth, inline_max;
    int ready, running, stopping;
    unsigned long forks; /* the fork count when the thread started */
    PyObject *kept; /* outcomes collected by a call that then raised: the next call's */
    const StageOps *ops;
    pthread_t tid;
    StageSlot ring[STAGE_DEPTH_MAX];
};
int stage_init(void);
int stage_start(Stage *s, const StageOps *ops, long depth, long inline_max);
int stage_alive(Stage *s);
/* Queue job (its fd, its packets: whether the caller may do it itself): 0 queued; 1 the
 * caller must do it (no thread, stopping, or idle and the job small); -1 with an
 * exception. Collects (outcomes into list) first; a full queue waits without the GIL. */
int stage_enqueue(Stage *s, void *job, int fd, Py_ssize_t packets, PyObject *list);
int stage_collect(Stage *s, PyObject *list);
/* A call's list of outcomes: those a call that raised had kept, or a new one (NULL with
 * an exception); stage_raise (with a raise: list is kept for the next call; steals it). */
PyObject *stage_outcomes(Stage *s);
PyObject *stage_raise(Stage *s, PyObject *list);
int stage_drain(Stage *s, PyObject *list);
void stage_stop(Stage *s);
void stage_destroy(Stage *s);
PyObject *stage_counts(Stage *s);

/* writer.c */
extern PyTypeObject TunWriterType;
int tun_writer_idle(PyObject *writer);
void tun_writer_inlined(PyObject *writer);

/* send.c */
extern PyTypeObject UdpSenderType;
PyObject *send_runs(PyObject *module, PyObject *args);
PyObject *seal_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

#endif
