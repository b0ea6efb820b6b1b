/* wgpy._classify: the handshake intake of core/intake.py for whole reads, in C.
 *
 * A flood is junk, handshake messages for a key we don't have, or valid ones from a source
 * over its rate; in Python each cost 6-16 us before it was refused or answered. Here one
 * call walks the datagrams of a GRO read (`classify`), or reads the socket itself, 64
 * reads a recvmmsg (`drain`), and gives each datagram the verdict intake.py's `admit` would:
 * message type and size, mac1 (keyed BLAKE2s-128 through libcrypto's BLAKE2SMAC), the two
 * token buckets of core/ratelimit.py (no cookie: 50/s burst 50; valid mac2: 20/s burst 5),
 * the queue bound and the under-load state (LoadMeter). The cookie replies a flood is owed
 * are made here, byte for byte as CookieChecker.make_reply, and `drain` sends them
 * (sendmmsg, GSO for runs to one address, from the address each message came to). Only
 * what passes comes back to Python, as (offset, verdict) pairs; refusals come back as
 * counts by Drop reason; data messages are only counted: the open path takes them. The
 * Python path is the reference, and tests/native/test_classify.py holds the two to
 * identical verdicts, counts and reply bytes.
 *
 * Floating point is done in the same order as the Python (and built with
 * -ffp-contract=off): a bucket's tokens are the same doubles on both paths.
 */
#include "classify.h"

#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdint.h>
#include <string.h>

#define MAC_LEN 16
#define KEY_LEN 32
#define INITIATION_LEN 148
#define RESPONSE_LEN 92
#define COOKIE_REPLY_LEN 64
#define DATA_MIN_LEN 32
#define KNOWN_LEN 19 /* an endpoint as a cookie's source bytes (18 at most), then their length */

/* verdicts of what passes, as in HandshakeIntake.admit's branches */
enum { ENQUEUE = 1, ENQUEUE_COOKIE = 2, SEND_COOKIE = 3, COOKIE_REPLY = 4, COOKIE_MADE = 5 };
/* refusals, named as core/output.py's Drop values */
enum { BAD_SIZE, UNKNOWN_TYPE, BAD_MAC1, RATE_LIMITED, QUEUE_FULL, NO_PRIVATE_KEY, REPLY_SHED,
       N_DROPS };
static const char *const drop_names[N_DROPS] = {"bad_size",   "unknown_type",   "bad_mac1",
                                                "rate_limited", "queue_full", "no_private_key",
                                                "reply_shed"};

/* ---- token buckets: RateLimiter of core/ratelimit.py ------------------------------------ */

typedef struct {
    uint8_t used, len; /* len 4: an IPv4 address; 8: the /64 of an IPv6 one */
    uint8_t key[8];
    double tokens, at;
} Bucket;

typedef struct {
    double rate, burst;
    Py_ssize_t count, max, mask; /* mask + 1 slots, at least twice max: probes stay short */
    uint64_t seed;
    Bucket *slots;
} Limiter;

typedef struct {
    uint8_t len;
    uint8_t key[8];
} SourceKey;

static uint64_t hash_key(const Limiter *l, const SourceKey *k) {
    uint64_t x = l->seed ^ k->len;
    for (int i = 0; i < 8; i++) { /* a seeded mix: sources are the attacker's to choose */
        x ^= k->key[i];
        x *= 0x100000001b3ULL;
        x ^= x >> 29;
    }
    return x;
}

static Bucket *find(Limiter *l, const SourceKey *k, int *found) {
    Py_ssize_t i = (Py_ssize_t)(hash_key(l, k) & (uint64_t)l->mask);
    for (;; i = (i + 1) & l->mask) {
        Bucket *b = &l->slots[i];
        if (!b->used) {
            *found = 0;
            return b;
        }
        if (b->len == k->len && memcmp(b->key, k->key, 8) == 0) {
            *found = 1;
            return b;
        }
    }
}

static int limiter_init(Limiter *l, double rate, double burst, Py_ssize_t max, uint64_t seed) {
    Py_ssize_t size = 1;
    while (size < 2 * max)
        size <<= 1;
    l->slots = PyMem_Calloc((size_t)size, sizeof(Bucket));
    if (l->slots == NULL)
        return -1;
    l->rate = rate, l->burst = burst, l->max = max, l->mask = size - 1, l->count = 0;
    l->seed = seed;
    return 0;
}

static int spent(Limiter *l, const SourceKey *k, double now) {
    int found;
    Bucket *b = find(l, k, &found);
    return found && b->tokens + (now - b->at) * l->rate < 1.0;
}

/* RateLimiter.collect: forget full buckets (all, if none is), by rebuilding the table. */
static void collect(Limiter *l, double now) {
    Py_ssize_t size = l->mask + 1, kept = 0;
    double full = (l->burst - 1.0) / l->rate;
    Bucket *old = PyMem_Malloc((size_t)size * sizeof(Bucket));
    if (old == NULL) { /* no memory for the copy: forget all, as when none is full */
        memset(l->slots, 0, (size_t)size * sizeof(Bucket));
        l->count = 0;
        return;
    }
    memcpy(old, l->slots, (size_t)size * sizeof(Bucket));
    memset(l->slots, 0, (size_t)size * sizeof(Bucket));
    l->count = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (old[i].used && !(now - old[i].at >= full)) {
            SourceKey k = {old[i].len, {0}};
            int found;
            memcpy(k.key, old[i].key, 8);
            *find(l, &k, &found) = old[i];
            kept++;
        }
    }
    l->count = kept;
    PyMem_Free(old);
    if (l->count >= l->max) {
        memset(l->slots, 0, (size_t)size * sizeof(Bucket));
        l->count = 0;
    }
}

static int allow(Limiter *l, const SourceKey *k, double now) {
    int found;
    Bucket *b = find(l, k, &found);
    double tokens = found ? b->tokens : l->burst, at = found ? b->at : now;
    double t = tokens + (now - at) * l->rate;
    tokens = t < l->burst ? t : l->burst; /* Python's min(burst, t) */
    if (tokens < 1.0) {
        b->tokens = tokens, b->at = now; /* found: a new bucket is never short */
        return 0;
    }
    if (!found && l->count >= l->max) {
        collect(l, now);
        b = find(l, k, &found);
    }
    if (!found) {
        b->used = 1, b->len = k->len;
        memcpy(b->key, k->key, 8);
        l->count++;
    }
    b->tokens = tokens - 1.0, b->at = now;
    return 1;
}

/* ---- one bucket: core/tokenbucket.py's TokenBucket, for the replies strangers still get
 * while shedding (a peer that roamed, one with no endpoint yet, core/ratelimit.py) ---- */

typedef struct {
    double rate, burst, tokens, at;
    int started; /* `at` set: TokenBucket's at is not None */
} Spare;

static int spare_allow(Spare *s, double now) {
    double tokens = s->tokens;
    if (s->started && now > s->at) {
        double t = tokens + (now - s->at) * s->rate;
        tokens = s->burst < t ? s->burst : t; /* Python's min(burst, t) */
    }
    if (!s->started || now > s->at)
        s->at = now, s->started = 1;
    if (tokens < 1.0) {
        s->tokens = tokens;
        return 0;
    }
    s->tokens = tokens - 1.0;
    return 1;
}

/* ---- the classifier ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Limiter plain, cookie;   /* no cookie needed; with a valid mac2 */
    EVP_MAC_CTX *mac1;       /* keyed with the mac1 key once; re-initialised per message */
    EVP_MAC_CTX *mac;        /* for the cookie and mac2: keys change per source */
    EVP_CIPHER_CTX *aead;    /* ChaCha20-Poly1305 for cookie replies */
    int has_key;             /* a private key is set (mac1 key known) */
    int gso;                 /* cookie replies to one address go as one GSO send */
    uint8_t secret[KEY_LEN]; /* CookieChecker's cookie secret, pushed from Python */
    double secret_born, refresh;
    Py_ssize_t queue_size, threshold;
    double hold;
    uint8_t (*known)[KNOWN_LEN]; /* the peers' endpoints (address, port), sorted: set_known */
    Py_ssize_t nknown;
    double shed_until; /* drain: replies to strangers are shed until then */
    Spare spare;       /* while shedding, the replies strangers still get */
    struct Reads *reads;        /* drain's message headers, kept from call to call */
    uint8_t *reads_buf;         /* ... set up for this buffer, */
    Py_ssize_t reads_slot;      /* ... read slots of this size, */
    unsigned reads_ready;       /* ... this many of them; */
    unsigned reads_dirty;       /* the ones the last recvmmsg wrote back */
    int reads_busy;             /* a drain holds `reads` (the GIL released in recvmmsg) */
    struct sockaddr_in6 last_name; /* the last kept read's source, */
    PyObject *last_ep;          /* ... as the (host, port) Python has it */
    PyObject *last_info;        /* the last kept read's packet info (bytes) */
} Classifier;

static EVP_MAC *blake2smac;

static EVP_MAC_CTX *new_mac(void) {
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(blake2smac);
    size_t size = MAC_LEN;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_SIZE, &size),
                           OSSL_PARAM_construct_end()};
    if (ctx != NULL && !EVP_MAC_CTX_set_params(ctx, params)) {
        EVP_MAC_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* MAC(key, data): BLAKE2s-128; key NULL: the key the context was last given. */
static int mac(EVP_MAC_CTX *ctx, const uint8_t *key, const uint8_t *data, size_t n,
               uint8_t out[MAC_LEN]) {
    size_t len;
    return EVP_MAC_init(ctx, key, key ? KEY_LEN : 0, NULL) && EVP_MAC_update(ctx, data, n) &&
           EVP_MAC_final(ctx, out, &len, MAC_LEN) && len == MAC_LEN;
}

static void Classifier_dealloc(Classifier *self) {
    PyMem_Free(self->known);
    PyMem_Free(self->plain.slots);
    PyMem_Free(self->cookie.slots);
    EVP_MAC_CTX_free(self->mac1);
    EVP_MAC_CTX_free(self->mac);
    EVP_CIPHER_CTX_free(self->aead);
    OPENSSL_cleanse(self->secret, KEY_LEN);
    PyMem_Free(self->reads);
    Py_XDECREF(self->last_ep);
    Py_XDECREF(self->last_info);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Classifier_init(Classifier *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"seed", "rate", "burst", "cookie_rate", "cookie_burst",
                             "max_sources", "queue_size", "hold", "refresh", "shed_rate",
                             "shed_burst", NULL};
    Py_buffer seed;
    double rate, burst, crate, cburst;
    Py_ssize_t max;
    double srate = 0, sburst = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*ddddnndd|dd", kwlist, &seed, &rate, &burst,
                                     &crate, &cburst, &max, &self->queue_size, &self->hold,
                                     &self->refresh, &srate, &sburst))
        return -1;
    self->spare = (Spare){srate, sburst, sburst, 0.0, 0};
    uint64_t s = 0;
    memcpy(&s, seed.buf, seed.len < 8 ? (size_t)seed.len : 8);
    PyBuffer_Release(&seed);
    if (max < 1 || rate <= 0 || crate <= 0) {
        PyErr_SetString(PyExc_ValueError, "rates and max_sources must be positive");
        return -1;
    }
    if (self->plain.slots || self->mac1) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    self->threshold = self->queue_size / 8;
    self->gso = 1;
    self->secret_born = -INFINITY;
    self->mac1 = new_mac();
    self->mac = new_mac();
    self->aead = EVP_CIPHER_CTX_new();
    if (self->mac1 == NULL || self->mac == NULL || self->aead == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "BLAKE2SMAC unavailable");
        return -1;
    }
    if (limiter_init(&self->plain, rate, burst, max, s) < 0 ||
        limiter_init(&self->cookie, crate, cburst, max, s * 0x9e3779b97f4a7c15ULL + 1) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *Classifier_set_mac1_key(Classifier *self, PyObject *arg) {
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = key.len == 0 || key.len == KEY_LEN;
    if (ok && key.len)
        ok = EVP_MAC_init(self->mac1, key.buf, KEY_LEN, NULL);
    self->has_key = ok && key.len;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "a mac1 key is 32 bytes, or empty for none");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Classifier_set_cookie_secret(Classifier *self, PyObject *args) {
    Py_buffer secret;
    double born;
    if (!PyArg_ParseTuple(args, "y*d", &secret, &born))
        return NULL;
    if (secret.len != KEY_LEN && secret.len != 0) {
        PyBuffer_Release(&secret);
        PyErr_SetString(PyExc_ValueError, "a cookie secret is 32 bytes");
        return NULL;
    }
    memset(self->secret, 0, KEY_LEN);
    memcpy(self->secret, secret.buf, (size_t)secret.len);
    self->secret_born = secret.len ? born : -INFINITY;
    PyBuffer_Release(&secret);
    Py_RETURN_NONE;
}

/* A read's source: the rate limiter's key and the bytes the cookie is made of (the
 * address packed, then the port big-endian), as core/ratelimit.py and core/cookie.py. */
typedef struct {
    SourceKey key;
    uint8_t host[18];
    size_t host_len;
} Source;

static int parse_source(const char *host, Py_ssize_t n, int port, Source *s) {
    char text[INET6_ADDRSTRLEN + 1];
    const char *scope = memchr(host, '%', (size_t)n);
    if (scope != NULL)
        n = scope - host;
    if (n <= 0 || n >= (Py_ssize_t)sizeof(text))
        return -1;
    memcpy(text, host, (size_t)n);
    text[n] = 0;
    memset(s, 0, sizeof(*s));
    if (inet_pton(AF_INET, text, s->host) == 1) {
        s->host_len = 4, s->key.len = 4;
    } else if (inet_pton(AF_INET6, text, s->host) == 1) {
        s->host_len = 16, s->key.len = 8;
    } else {
        return -1;
    }
    memcpy(s->key.key, s->host, s->key.len);
    s->host[s->host_len] = (uint8_t)(port >> 8);
    s->host[s->host_len + 1] = (uint8_t)port;
    s->host_len += 2;
    return 0;
}

/* ---- the peers' endpoints: who still gets a cookie reply while replies are shed ---- */

/* An endpoint as set_known keeps it: its address and port (an IPv4-mapped address as the
 * IPv4 one, as intake.py's _known_key: a source given as ::ffff:a.b.c.d is that peer). */
static void known_key(const Source *s, uint8_t key[KNOWN_LEN]) {
    static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    size_t skip = s->host_len == 18 && memcmp(s->host, v4mapped, 12) == 0 ? 12 : 0;
    memset(key, 0, KNOWN_LEN);
    memcpy(key, s->host + skip, s->host_len - skip);
    key[KNOWN_LEN - 1] = (uint8_t)(s->host_len - skip);
}

static int cmp_known(const void *a, const void *b) { return memcmp(a, b, KNOWN_LEN); }

static int is_known(const Classifier *self, const Source *s) {
    uint8_t key[KNOWN_LEN];
    known_key(s, key);
    return self->nknown && bsearch(key, self->known, (size_t)self->nknown, KNOWN_LEN, cmp_known);
}

/* set_known([(host, port), ...]): the endpoints of the device's peers (intake.py pushes
 * them at most once a second); one that does not parse is left out. */
static PyObject *Classifier_set_known(Classifier *self, PyObject *arg) {
    PyObject *items = PySequence_Tuple(arg);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items), kept = 0;
    uint8_t(*known)[KNOWN_LEN] = PyMem_Malloc(n ? (size_t)n * KNOWN_LEN : 1);
    if (known == NULL) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *host;
        Py_ssize_t len;
        int port;
        Source src;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(items, i), "s#i", &host, &len, &port)) {
            PyMem_Free(known);
            Py_DECREF(items);
            return NULL;
        }
        if (port >= 0 && port <= 0xFFFF && parse_source(host, len, port, &src) == 0)
            known_key(&src, known[kept++]);
    }
    Py_DECREF(items);
    qsort(known, (size_t)kept, KNOWN_LEN, cmp_known);
    PyMem_Free(self->known);
    self->known = known, self->nknown = kept;
    Py_RETURN_NONE;
}

/* CookieChecker's reply state (nonce prefix, HChaCha20 subkey, counter), given when a
 * reply would draw nothing new: then replies are made here, byte for byte as make_reply. */
typedef struct {
    uint8_t prefix[16], subkey[KEY_LEN];
    unsigned long long counter;
    uint8_t *out;    /* 64 bytes per reply */
    uint16_t *reads; /* drain: the read each reply answers */
    Py_ssize_t made, room;
    int keyed; /* the AEAD context has the subkey (this call): each reply sets its nonce */
} Replies;

static void replies_free(Replies *r) {
    OPENSSL_cleanse(r->subkey, KEY_LEN);
    PyMem_Free(r->out);
    PyMem_Free(r->reads);
    r->out = NULL, r->reads = NULL;
}

static int parse_reply_state(PyObject *state, Replies *r) {
    const char *prefix, *subkey;
    Py_ssize_t plen, slen;
    if (!PyArg_ParseTuple(state, "y#y#K", &prefix, &plen, &subkey, &slen, &r->counter))
        return -1;
    if (plen != 16 || slen != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "reply state: a 16-byte prefix, a 32-byte key");
        return -1;
    }
    memcpy(r->prefix, prefix, 16);
    memcpy(r->subkey, subkey, KEY_LEN);
    return 0;
}

/* One batch's running state: the queue's length and the under-load deadline move as
 * messages are admitted, exactly as the deque and LoadMeter do in Python. */
typedef struct {
    const Source *src;
    double now, until;
    Py_ssize_t queued;
    int forced;
    Py_ssize_t drops[N_DROPS];
    Replies *replies; /* NULL: cookie replies are Python's to make */
    uint16_t read;    /* drain: the read at hand */
    int sends;        /* drain: the replies made are sent in C, not handed to Python */
    int shed;         /* the socket overflowed: cookie replies only to the peers' endpoints */
} Batch;

static int check_mac1(Classifier *self, const uint8_t *m, size_t n) {
    uint8_t want[MAC_LEN];
    return mac(self->mac1, NULL, m, n - 2 * MAC_LEN, want) &&
           CRYPTO_memcmp(want, m + n - 2 * MAC_LEN, MAC_LEN) == 0;
}

static int check_mac2(Classifier *self, const Batch *b, const uint8_t *m, size_t n) {
    uint8_t cookie[MAC_LEN], want[MAC_LEN];
    if (b->now - self->secret_born > self->refresh)
        return 0; /* no cookie handed out under the current secret */
    if (!mac(self->mac, self->secret, b->src->host, b->src->host_len, cookie))
        return 0;
    size_t len; /* the cookie (16 bytes) keys mac2 */
    int ok = EVP_MAC_init(self->mac, cookie, MAC_LEN, NULL) &&
             EVP_MAC_update(self->mac, m, n - MAC_LEN) &&
             EVP_MAC_final(self->mac, want, &len, MAC_LEN) && len == MAC_LEN &&
             CRYPTO_memcmp(want, m + n - MAC_LEN, MAC_LEN) == 0;
    OPENSSL_cleanse(cookie, MAC_LEN);
    return ok;
}

/* CookieChecker.make_reply: type 3, the message's sender, the nonce (prefix, counter),
 * the cookie sealed under the subkey with the message's mac1 as associated data. */
static int make_reply(Classifier *self, Batch *b, const uint8_t *m, size_t n) {
    Replies *r = b->replies;
    if (r->made == r->room) {
        Py_ssize_t room = r->room ? 2 * r->room : 64;
        uint8_t *out = PyMem_Realloc(r->out, (size_t)room * 64);
        if (out != NULL)
            r->out = out;
        uint16_t *reads = out ? PyMem_Realloc(r->reads, (size_t)room * sizeof(uint16_t)) : NULL;
        if (reads == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->reads = reads, r->room = room;
    }
    r->reads[r->made] = b->read;
    uint8_t *p = r->out + r->made * 64, cookie[MAC_LEN];
    uint8_t iv[12] = {0};
    int len, ok = mac(self->mac, self->secret, b->src->host, b->src->host_len, cookie);
    r->counter++;
    memcpy(p, "\x03\0\0\0", 4);
    memcpy(p + 4, m + 4, 4);
    memcpy(p + 8, r->prefix, 16);
    for (int i = 0; i < 8; i++)
        p[24 + i] = iv[4 + i] = (uint8_t)(r->counter >> (8 * i));
    const EVP_CIPHER *cipher = r->keyed ? NULL : EVP_chacha20_poly1305();
    ok = ok && EVP_EncryptInit_ex(self->aead, cipher, NULL, r->keyed ? NULL : r->subkey, iv);
    r->keyed = ok;
    ok = ok &&
         EVP_EncryptUpdate(self->aead, NULL, &len, m + n - 2 * MAC_LEN, MAC_LEN) &&
         EVP_EncryptUpdate(self->aead, p + 32, &len, cookie, MAC_LEN) && len == MAC_LEN &&
         EVP_EncryptFinal_ex(self->aead, p + 48, &len) &&
         EVP_CIPHER_CTX_ctrl(self->aead, EVP_CTRL_AEAD_GET_TAG, 16, p + 48);
    OPENSSL_cleanse(cookie, MAC_LEN);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "cookie reply: libcrypto failed");
        return -1;
    }
    return (int)(r->made++);
}

static int enqueue(Classifier *self, Batch *b, int verdict) {
    if (b->queued >= self->queue_size) {
        b->drops[QUEUE_FULL]++;
        return 0;
    }
    if (++b->queued > self->threshold)
        b->until = b->now + self->hold;
    return verdict;
}

/* intake.py's `admit` for one initiation or response: a verdict, or 0 with a drop counted. */
static int admit(Classifier *self, Batch *b, const uint8_t *m, size_t n) {
    static const uint8_t zero[MAC_LEN];
    const SourceKey *k = &b->src->key;
    int needs_cookie = b->forced || b->now < b->until || spent(&self->plain, k, b->now);
    int has_mac2 = memcmp(m + n - MAC_LEN, zero, MAC_LEN) != 0;
    if (needs_cookie && has_mac2 && spent(&self->cookie, k, b->now)) {
        b->drops[RATE_LIMITED]++;
        return 0;
    }
    if (!check_mac1(self, m, n)) {
        b->drops[BAD_MAC1]++;
        return 0;
    }
    if (!needs_cookie) {
        allow(&self->plain, k, b->now);
        return enqueue(self, b, ENQUEUE);
    }
    if (!(has_mac2 && check_mac2(self, b, m, n))) {
        if (!b->shed || is_known(self, b->src) || spare_allow(&self->spare, b->now))
            return SEND_COOKIE;
        b->drops[REPLY_SHED]++;
        return 0;
    }
    if (allow(&self->cookie, k, b->now))
        return enqueue(self, b, ENQUEUE_COOKIE);
    b->drops[RATE_LIMITED]++;
    return 0;
}

/* The verdict for one datagram that is not a data message (HandshakeIntake.offer). */
static int classify_one(Classifier *self, Batch *b, const uint8_t *m, size_t n) {
    uint32_t t = n >= 4 ? (uint32_t)m[0] | (uint32_t)m[1] << 8 | (uint32_t)m[2] << 16 |
                              (uint32_t)m[3] << 24
                        : 0;
    int exact = (t == 1 && n == INITIATION_LEN) || (t == 2 && n == RESPONSE_LEN) ||
                (t == 3 && n == COOKIE_REPLY_LEN);
    if (!exact) {
        b->drops[n < 4 || (t >= 1 && t <= 4) ? BAD_SIZE : UNKNOWN_TYPE]++;
        return 0;
    }
    if (t == 3)
        return COOKIE_REPLY;
    if (!self->has_key) {
        b->drops[NO_PRIVATE_KEY]++;
        return 0;
    }
    return admit(self, b, m, n);
}

static int append_pass(PyObject *passed, Py_ssize_t offset, int verdict) {
    PyObject *t = Py_BuildValue("(ni)", offset, verdict);
    int rc = t == NULL ? -1 : PyList_Append(passed, t);
    Py_XDECREF(t);
    return rc;
}

static PyObject *drops_dict(const Batch *b) {
    PyObject *d = PyDict_New();
    for (int i = 0; d != NULL && i < N_DROPS; i++) {
        if (!b->drops[i])
            continue;
        PyObject *v = PyLong_FromSsize_t(b->drops[i]);
        if (v == NULL || PyDict_SetItemString(d, drop_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(v);
    }
    return d;
}

/* The datagrams of one read: data messages counted, the rest classified; what passes is
 * appended to *passed (made on the first), as (offset, verdict). */
static int classify_read(Classifier *self, Batch *b, const uint8_t *p, Py_ssize_t n,
                         Py_ssize_t seg, PyObject **passed, Py_ssize_t *data) {
    if (n == 0) { /* an empty datagram: too short for any type (as the open path counts it) */
        b->drops[BAD_SIZE]++;
        return 0;
    }
    Py_ssize_t step = seg > 0 && seg < n ? seg : n;
    for (Py_ssize_t at = 0; at < n; at += step) {
        size_t len = (size_t)(at + step <= n ? step : n - at);
        const uint8_t *m = p + at;
        if (len >= DATA_MIN_LEN && m[0] == 4 && !m[1] && !m[2] && !m[3]) {
            ++*data;
            continue;
        }
        int verdict = classify_one(self, b, m, len);
        Py_ssize_t where = at;
        if (verdict == SEND_COOKIE && b->replies != NULL) {
            int made = make_reply(self, b, m, len);
            if (made < 0)
                return -1;
            where = (Py_ssize_t)made * 64, verdict = COOKIE_MADE;
            if (b->sends)
                continue;
        }
        if (!verdict)
            continue;
        if (*passed == NULL && (*passed = PyList_New(0)) == NULL)
            return -1;
        if (append_pass(*passed, where, verdict) < 0)
            return -1;
    }
    return 0;
}

static PyObject *Classifier_classify(Classifier *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t n, seg, host_len, data = 0;
    const char *host;
    int port, forced, shed = 0;
    Source src;
    Batch b = {0};
    Replies r = {0};
    PyObject *state, *passed = NULL, *drops = NULL, *replies = NULL;
    if (!PyArg_ParseTuple(args, "y*nns#iddnpO|p", &buf, &n, &seg, &host, &host_len, &port, &b.now,
                          &b.until, &b.queued, &forced, &state, &shed))
        return NULL;
    b.forced = forced, b.src = &src, b.shed = shed;
    if (n < 0 || n > buf.len || seg < 0) {
        PyErr_SetString(PyExc_ValueError, "n or seg out of range");
        goto fail;
    }
    if (state != Py_None) {
        if (parse_reply_state(state, &r) < 0)
            goto fail;
        b.replies = &r;
    }
    if (parse_source(host, host_len, port, &src) < 0) {
        PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
        goto fail;
    }
    if (classify_read(self, &b, buf.buf, n, seg, &passed, &data) < 0)
        goto fail;
    if (passed == NULL && (passed = PyList_New(0)) == NULL)
        goto fail;
    if ((drops = drops_dict(&b)) == NULL)
        goto fail;
    if (r.made) {
        replies = PyBytes_FromStringAndSize((const char *)r.out, r.made * 64);
        if (replies == NULL)
            goto fail;
    } else {
        replies = Py_None;
        Py_INCREF(Py_None);
    }
    replies_free(&r);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(NndNNK)", passed, data, b.until, drops, replies, r.counter);
fail:
    Py_XDECREF(passed);
    Py_XDECREF(drops);
    replies_free(&r);
    PyBuffer_Release(&buf);
    return NULL;
}


/* ---- drain: the socket read here, in batches (recvmmsg) ------------------------------- */

#define SOL_UDP_ 17
#define UDP_GRO_ 104

/* The source of a read as UdpSocket.recv_into gives it (an IPv4-mapped address as
 * IPv4), for the buckets and the cookie; -1 for an address family we never read. */
static int source_of(const struct sockaddr_in6 *sa, Source *s) {
    memset(s, 0, sizeof(*s));
    const uint8_t *a;
    size_t len;
    if (sa->sin6_family == AF_INET) {
        a = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr, len = 4;
    } else if (sa->sin6_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&sa->sin6_addr)) {
        a = sa->sin6_addr.s6_addr + 12, len = 4;
    } else if (sa->sin6_family == AF_INET6) {
        a = sa->sin6_addr.s6_addr, len = 16;
    } else {
        return -1;
    }
    uint16_t port = ntohs(sa->sin6_port); /* same place in sockaddr_in */
    memcpy(s->host, a, len);
    s->host[len] = (uint8_t)(port >> 8), s->host[len + 1] = (uint8_t)port;
    s->host_len = len + 2;
    s->key.len = len == 4 ? 4 : 8;
    memcpy(s->key.key, a, s->key.len);
    return 0;
}

/* (host, port) as Python's socket module writes it (getnameinfo: a scope as %name). */
static PyObject *endpoint_of(const struct sockaddr_in6 *sa) {
    char host[NI_MAXHOST];
    struct sockaddr_in v4;
    const struct sockaddr *name = (const struct sockaddr *)sa;
    socklen_t len = sa->sin6_family == AF_INET ? sizeof(v4) : sizeof(*sa);
    if (sa->sin6_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&sa->sin6_addr)) {
        memset(&v4, 0, sizeof(v4));
        v4.sin_family = AF_INET, v4.sin_port = sa->sin6_port;
        memcpy(&v4.sin_addr, sa->sin6_addr.s6_addr + 12, 4);
        name = (const struct sockaddr *)&v4, len = sizeof(v4);
    }
    if (getnameinfo(name, len, host, sizeof(host), NULL, 0, NI_NUMERICHOST) != 0)
        return NULL;
    return Py_BuildValue("(si)", host, ntohs(sa->sin6_port));
}

/* endpoint_of, the same object again while the source is the last one's: a run of reads
 * from one peer formats its address once (getnameinfo is no small call, cold). Comparing
 * all of the name is safe: bytes the kernel left from an earlier read can only make two
 * equal sources look different. */
static PyObject *endpoint_cached(Classifier *self, const struct sockaddr_in6 *sa) {
    if (self->last_ep != NULL && memcmp(sa, &self->last_name, sizeof(*sa)) == 0)
        return Py_NewRef(self->last_ep);
    PyObject *ep = endpoint_of(sa);
    if (ep != NULL) {
        Py_XSETREF(self->last_ep, Py_NewRef(ep));
        self->last_name = *sa;
    }
    return ep;
}

/* The GRO segment size of a read (0: one datagram). */
static Py_ssize_t gro_size(struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        size_t len = c->cmsg_len - CMSG_LEN(0);
        if (c->cmsg_level != SOL_UDP_ || c->cmsg_type != UDP_GRO_)
            continue;
        if (len >= sizeof(int)) {
            int v;
            memcpy(&v, CMSG_DATA(c), sizeof(v));
            return v;
        }
        if (len >= 2) {
            uint16_t v;
            memcpy(&v, CMSG_DATA(c), 2);
            return v;
        }
    }
    return 0;
}

/* Whether this drain sheds the cookie replies to strangers: for `hold` seconds after a
 * full read (a backlog) found the socket's receive queue more than half full (`over`,
 * `overflowing` in reader.c, asked right after the read). The socket is not read as fast
 * as the datagrams come, so the reads go to the peers we have rather than to answering
 * the flood (a reply costs a send, 5-8 us here, reading and refusing ~1.5 us). Half full:
 * shedding from before the first drop keeps the peers' datagrams from being dropped at
 * all. Not the kernel's drop count: a datagram with a bad UDP checksum, which anyone can
 * send, counts as a drop when it is read, and one a second would keep the device
 * shedding. Only a full read looks, so a socket that keeps up costs no extra system call. */
static int shedding(Classifier *self, int over, double now) {
    if (over)
        self->shed_until = now + self->hold;
    return now < self->shed_until;
}

/* The packet info of a read as bytes (UdpSocket.last_info), or None; the last one's
 * object again when it is the same (reads to one local address, one after another). */
static PyObject *packet_info(Classifier *self, struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (!((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) ||
              (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO)))
            continue;
        const char *data = (const char *)CMSG_DATA(c);
        Py_ssize_t len = (Py_ssize_t)(c->cmsg_len - CMSG_LEN(0));
        PyObject *last = self->last_info;
        if (last != NULL && PyBytes_GET_SIZE(last) == len &&
            memcmp(PyBytes_AS_STRING(last), data, (size_t)len) == 0)
            return Py_NewRef(last);
        PyObject *info = PyBytes_FromStringAndSize(data, len);
        if (info != NULL)
            Py_XSETREF(self->last_info, Py_NewRef(info));
        return info;
    }
    Py_RETURN_NONE;
}

/* The cookie replies made, each to the source of the read it answers; what the socket
 * refuses (a full buffer) is lost, as a datagram on the wire may be. Replies in a row to
 * one address (a flood from one source) go as one GSO send of 64-byte segments: the
 * kernel's cost per reply is most of what such a flood costs. */
#define UDP_SEGMENT_ 103
#define GSO_RUN 64

/* The packet info control message of a read, or NULL. */
static struct cmsghdr *pktinfo_of(struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c))
        if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) ||
            (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO))
            return c;
    return NULL;
}

/* Two reads from one address to one of ours: their replies may go as one GSO send. */
static int same_way(struct msghdr *a, struct msghdr *b) {
    if (a->msg_namelen != b->msg_namelen || memcmp(a->msg_name, b->msg_name, a->msg_namelen))
        return 0;
    struct cmsghdr *x = pktinfo_of(a), *y = pktinfo_of(b);
    return x == NULL ? y == NULL
                     : y != NULL && x->cmsg_len == y->cmsg_len &&
                           memcmp(CMSG_DATA(x), CMSG_DATA(y), x->cmsg_len - CMSG_LEN(0)) == 0;
}

/* The reply leaves from the local address the message came to (as Linux's WireGuard
 * answers from the skb's destination), written as io/udp.py writes a sticky source:
 * IPv4 the spec_dst alone, IPv6 the address, and the interface for link-local only. */
static size_t put_source(struct msghdr *from, struct cmsghdr *c) {
    struct cmsghdr *got = pktinfo_of(from);
    if (got == NULL)
        return 0;
    c->cmsg_level = got->cmsg_level, c->cmsg_type = got->cmsg_type;
    if (got->cmsg_level == IPPROTO_IP) {
        struct in_pktinfo in, out = {0};
        memcpy(&in, CMSG_DATA(got), sizeof(in));
        out.ipi_spec_dst = in.ipi_spec_dst;
        c->cmsg_len = CMSG_LEN(sizeof(out));
        memcpy(CMSG_DATA(c), &out, sizeof(out));
        return CMSG_SPACE(sizeof(out));
    }
    struct in6_pktinfo in6, out6 = {0};
    memcpy(&in6, CMSG_DATA(got), sizeof(in6));
    out6.ipi6_addr = in6.ipi6_addr;
    if (IN6_IS_ADDR_LINKLOCAL(&in6.ipi6_addr))
        out6.ipi6_ifindex = in6.ipi6_ifindex;
    c->cmsg_len = CMSG_LEN(sizeof(out6));
    memcpy(CMSG_DATA(c), &out6, sizeof(out6));
    return CMSG_SPACE(sizeof(out6));
}

/* One sendmmsg of up to 64 messages from reply `at` on; *next: the first reply after. */
static int send_some(int fd, Reads *rd, const Replies *r, Py_ssize_t at, int gso,
                     Py_ssize_t *next, Py_ssize_t *sent) {
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    union {
        struct cmsghdr align;
        uint8_t buf[CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(sizeof(struct in6_pktinfo))];
    } cmsgs[64];
    Py_ssize_t runs[64];
    unsigned k = 0;
    for (; k < 64 && at < r->made; k++) {
        struct msghdr *from = &rd->msgs[r->reads[at]].msg_hdr;
        Py_ssize_t run = 1;
        while (gso && run < GSO_RUN && at + run < r->made &&
               same_way(from, &rd->msgs[r->reads[at + run]].msg_hdr))
            run++;
        struct msghdr *h = &msgs[k].msg_hdr;
        memset(h, 0, sizeof(*h));
        iov[k].iov_base = r->out + at * 64, iov[k].iov_len = (size_t)run * 64;
        h->msg_name = from->msg_name, h->msg_namelen = from->msg_namelen;
        h->msg_iov = &iov[k], h->msg_iovlen = 1;
        uint8_t *control = cmsgs[k].buf;
        size_t used = 0;
        memset(control, 0, sizeof(cmsgs[k].buf));
        if (run > 1) {
            struct cmsghdr *c = (struct cmsghdr *)control;
            c->cmsg_level = SOL_UDP_, c->cmsg_type = UDP_SEGMENT_;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t size = 64;
            memcpy(CMSG_DATA(c), &size, sizeof(size));
            used = CMSG_SPACE(sizeof(uint16_t));
        }
        used += put_source(from, (struct cmsghdr *)(control + used));
        if (used)
            h->msg_control = control, h->msg_controllen = used;
        runs[k] = run, at += run;
    }
    *next = at;
    int done = sendmmsg(fd, msgs, k, MSG_DONTWAIT);
    for (int i = 0; i < done; i++)
        *sent += runs[i];
    return done < 0 ? -1 : 0;
}

static Py_ssize_t send_replies(Classifier *self, int fd, Reads *rd, const Replies *r) {
    Py_ssize_t sent = 0, at = 0, next;
    while (at < r->made) {
        if (send_some(fd, rd, r, at, self->gso, &next, &sent) < 0 && self->gso &&
            (errno == EIO || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOPROTOOPT)) {
            self->gso = 0; /* no UDP GSO here: one datagram a message from now on */
            continue;
        }
        at = next;
    }
    return sent;
}

/* The headers for a drain: the classifier's own, kept from call to call, only what the
 * last recvmmsg wrote back (lengths, flags) set again: a lone datagram's drain touches
 * two headers, not 64 made anew in 44 KiB malloc'd per call (a ping's hop, cold). When
 * another drain holds them (the GIL is released in recvmmsg), a set of its own. */
static Reads *reads_take(Classifier *self, uint8_t *buf, Py_ssize_t slot, unsigned count) {
    Reads *rd;
    if (self->reads_busy) {
        if ((rd = PyMem_Malloc(sizeof(Reads))) != NULL)
            setup_reads(rd, buf, slot, 0, count);
        return rd;
    }
    if (self->reads == NULL && (self->reads = PyMem_Malloc(sizeof(Reads))) == NULL)
        return NULL;
    rd = self->reads;
    if (buf != self->reads_buf || slot != self->reads_slot)
        self->reads_buf = buf, self->reads_slot = slot, self->reads_ready = 0;
    reset_reads(rd, self->reads_dirty < self->reads_ready ? self->reads_dirty : self->reads_ready);
    if (count > self->reads_ready) {
        setup_reads(rd, buf, slot, self->reads_ready, count);
        self->reads_ready = count;
    }
    self->reads_busy = 1;
    return rd;
}

/* A drain is done with its headers: `got` of them read (the one after may have been
 * written too). */
static void reads_give(Classifier *self, Reads *rd, int got, unsigned count) {
    if (rd != self->reads) {
        PyMem_Free(rd);
        return;
    }
    unsigned touched = (unsigned)(got > 0 ? got : 0) + 1;
    self->reads_dirty = touched < count ? touched : count;
    self->reads_busy = 0;
}

/* A read that brought something for Python: (offset, n, seg, (host, port), info, passed,
 * data messages); the offset is in the caller's buffer, whose `base` the reads begin at. */
static int keep_read(Classifier *self, PyObject *kept, Reads *rd, unsigned i, Py_ssize_t at,
                     Py_ssize_t seg, PyObject *passed, Py_ssize_t data) {
    PyObject *ep = endpoint_cached(self, &rd->names[i]);
    if (ep == NULL)
        return 0; /* no name for it: as if never read */
    PyObject *info = packet_info(self, &rd->msgs[i].msg_hdr);
    if (info == NULL) {
        Py_DECREF(ep);
        return -1;
    }
    if (passed == NULL)
        passed = Py_None;
    PyObject *t = Py_BuildValue("(nInNNOn)", at, rd->msgs[i].msg_len, seg, ep, info, passed,
                                data);
    int rc = t == NULL ? -1 : PyList_Append(kept, t);
    Py_XDECREF(t);
    return rc;
}

/* Every read of a drain classified; those with something for Python kept. */
static int classify_reads(Classifier *self, Batch *b, Reads *rd, int got, uint8_t *buf,
                          Py_ssize_t slot, Py_ssize_t base, PyObject *kept) {
    for (int i = 0; i < got; i++) {
        Source src;
        PyObject *passed = NULL;
        Py_ssize_t data = 0, n = (Py_ssize_t)rd->msgs[i].msg_len;
        if (source_of(&rd->names[i], &src) < 0)
            continue;
        Py_ssize_t seg = gro_size(&rd->msgs[i].msg_hdr);
        b->src = &src, b->read = (uint16_t)i;
        int rc = classify_read(self, b, buf + i * slot, n, seg, &passed, &data);
        if (rc == 0 && (passed != NULL || data))
            rc = keep_read(self, kept, rd, (unsigned)i, base + i * slot, seg, passed, data);
        Py_XDECREF(passed);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* The reads of a drain, however read (the drain's own recvmmsg or a reader's slot):
 * classified, the cookie replies sent, drain's answer made. `over`: the read was full and
 * left the socket's queue over half full (shedding). */
static PyObject *drained(Classifier *self, Batch *b, Replies *r, int fd, Reads *rd, int got,
                         int over, uint8_t *buf, Py_ssize_t slot, Py_ssize_t base) {
    b->shed = shedding(self, over, b->now);
    PyObject *kept = PyList_New(0), *drops = NULL;
    if (kept == NULL || classify_reads(self, b, rd, got, buf, slot, base, kept) < 0)
        goto fail;
    Py_ssize_t sent = r->made ? send_replies(self, fd, rd, r) : 0;
    if ((drops = drops_dict(b)) == NULL)
        goto fail;
    return Py_BuildValue("(NidNnK)", kept, got, b->until, drops, sent, r->counter);
fail:
    Py_XDECREF(kept);
    return NULL;
}

/* drain's reads from the socket itself: one recvmmsg into buf, the GIL released. */
static PyObject *drain_socket(Classifier *self, Batch *b, Replies *r, int fd, Py_buffer *buf,
                              Py_ssize_t slot, Py_ssize_t count) {
    int got = 0;
    Reads *rd = reads_take(self, buf->buf, slot, (unsigned)count);
    if (rd == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    got = recvmmsg(fd, rd->msgs, (unsigned)count, MSG_DONTWAIT, NULL);
    Py_END_ALLOW_THREADS
    if (got < 0)
        got = 0; /* nothing waits, or an ICMP error queued on the socket: nothing read */
    int over = got == count && overflowing(fd);
    PyObject *result = drained(self, b, r, fd, rd, got, over, buf->buf, slot, 0);
    reads_give(self, rd, got, (unsigned)count);
    return result;
}

/* Whether buf is a UdpReader's ring: the reader itself, or a memoryview of it (a view's
 * base is the exporter, however many views deep). */
static int readers_buffer(const Py_buffer *buf) {
    PyObject *obj = buf->obj;
    if (obj != NULL && PyMemoryView_Check(obj))
        obj = PyMemoryView_GET_BASE(obj);
    return obj != NULL && PyObject_TypeCheck(obj, &UdpReaderType);
}

/* drain's reads from a UdpReader (reader.c): the slot its thread filled, in its buffer. */
static PyObject *drain_reader(Classifier *self, Batch *b, Replies *r, PyObject *reader,
                              Py_buffer *buf, Py_ssize_t slot, Py_ssize_t count) {
    ReaderSlot s;
    if (reader_take(reader, buf, slot, count, &s) < 0)
        return NULL;
    return drained(self, b, r, s.fd, s.rd, s.got, s.over, s.buf, slot, s.base);
}

static PyObject *Classifier_drain(Classifier *self, PyObject *args) {
    int forced;
    Py_buffer buf;
    Py_ssize_t slot, count;
    Batch b = {0};
    Replies r = {0};
    PyObject *from, *state, *result = NULL;
    if (!PyArg_ParseTuple(args, "Ow*nnddnpO", &from, &buf, &slot, &count, &b.now, &b.until,
                          &b.queued, &forced, &state))
        return NULL;
    b.forced = forced, b.sends = 1;
    int reader = PyObject_TypeCheck(from, &UdpReaderType);
    long fd = reader ? 0 : PyLong_AsLong(from);
    if (!reader && (fd < 0 || fd > INT_MAX)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "fd: a descriptor or a UdpReader");
        goto done;
    }
    if (!reader && readers_buffer(&buf)) { /* a recvmmsg into the ring its thread writes */
        PyErr_SetString(PyExc_ValueError, "a reader's buffer is drained through the reader");
        goto done;
    }
    if (count < 1 || count > MAX_READS || slot < 1 || slot * count > buf.len) {
        PyErr_SetString(PyExc_ValueError, "count (1-256) x slot must fit in buf");
        goto done;
    }
    if (state != Py_None) {
        if (parse_reply_state(state, &r) < 0)
            goto done;
        b.replies = &r;
    }
    result = reader ? drain_reader(self, &b, &r, from, &buf, slot, count)
                    : drain_socket(self, &b, &r, (int)fd, &buf, slot, count);
done:
    replies_free(&r);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *Classifier_sources(Classifier *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("(nn)", self->plain.count, self->cookie.count);
}

static PyMethodDef Classifier_methods[] = {
    {"classify", (PyCFunction)Classifier_classify, METH_VARARGS,
     "classify(buf, n, seg, host, port, now, until, queued, forced, reply_state, shed=False)\n"
     "-> (passed, data, until, drops, replies, counter)\n\n"
     "The intake of one read of n bytes (datagrams of seg bytes if GRO merged them) from\n"
     "(host, port): passed: [(offset, verdict)] in order, verdict 1 queue it, 2 queue it\n"
     "(it came with a valid mac2), 3 answer it with a cookie reply, 4 a cookie reply for\n"
     "us, 5 answered: the reply is at `offset` in `replies` (64 bytes each; None if\n"
     "none). reply_state: (nonce prefix, subkey, counter) of CookieChecker when a reply\n"
     "draws nothing new, else None (then no 5, only 3s); counter: after the replies made.\n"
     "data: the data messages, left for the open path; until: the under-load deadline\n"
     "after the batch (LoadMeter); drops: {Drop value: count}. shed: the socket overflowed:\n"
     "a cookie reply only to a source set_known named, or while the bucket of shed_rate and\n"
     "shed_burst has a token (else dropped as reply_shed)."},
    {"drain", (PyCFunction)Classifier_drain, METH_VARARGS,
     "drain(fd, buf, slot, count, now, until, queued, forced, reply_state)\n"
     "-> (reads, count_read, until, drops, cookies_sent, counter)\n\n"
     "Up to `count` reads of the UDP socket `fd` (recvmmsg, each into `slot` bytes of buf),\n"
     "classified as `classify` does, the state carried from read to read; the cookie\n"
     "replies made are sent here (sendmmsg, each to the source of its read). reads: those\n"
     "with something for Python, as (offset, n, seg, (host, port), packet info or None,\n"
     "passed or None, data messages); passed as `classify` gives it, without verdict 5.\n"
     "It sheds (classify's shed) for `hold` seconds after a full drain found the socket's\n"
     "queue over half full (SO_MEMINFO).\n\n"
     "fd and buf a UdpReader (reader.c): its oldest filled slot instead of a recvmmsg,\n"
     "the offsets in the reader's buffer, slot and count its size and count; the slot the\n"
     "last such drain took is given back to the reader's thread first; after the reader's\n"
     "close(), nothing (0 reads, no reply sent). A descriptor with a reader's buffer, or a\n"
     "reader with another buffer: ValueError."},
    {"set_known", (PyCFunction)Classifier_set_known, METH_O,
     "set_known(endpoints): the peers' (host, port) endpoints: while the socket overflows,\n"
     "only they get cookie replies."},
    {"set_mac1_key", (PyCFunction)Classifier_set_mac1_key, METH_O,
     "The mac1 key (HASH(label || our public key)), or b'' without a private key."},
    {"set_cookie_secret", (PyCFunction)Classifier_set_cookie_secret, METH_VARARGS,
     "set_cookie_secret(secret, born): the cookie secret CookieChecker drew at `born`."},
    {"sources", (PyCFunction)Classifier_sources, METH_NOARGS,
     "(sources in the plain table, in the cookie table)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ClassifierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "wgpy._classify.Classifier",
    .tp_basicsize = sizeof(Classifier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Classifier(seed, rate, burst, cookie_rate, cookie_burst, max_sources, "
              "queue_size, hold, refresh, shed_rate=0, shed_burst=0): Device's handshake "
              "intake in C; shed_*: the bucket of replies strangers get while shedding.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Classifier_init,
    .tp_dealloc = (destructor)Classifier_dealloc,
    .tp_methods = Classifier_methods,
};

static PyObject *mac_fn(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer key, data;
    if (!PyArg_ParseTuple(args, "y*y*", &key, &data))
        return NULL;
    uint8_t out[MAC_LEN];
    EVP_MAC_CTX *ctx = key.len == KEY_LEN ? new_mac() : NULL;
    int ok = ctx != NULL && mac(ctx, key.buf, data.buf, (size_t)data.len, out);
    EVP_MAC_CTX_free(ctx);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "mac: a 32-byte key");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, MAC_LEN);
}

static PyMethodDef module_methods[] = {
    {"mac", mac_fn, METH_VARARGS, "mac(key, data): keyed BLAKE2s-128, as core.crypto.mac."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef classify_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wgpy._classify",
    .m_doc = "Device's handshake intake for a whole read, in C (see core/intake.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__classify(void) {
    blake2smac = EVP_MAC_fetch(NULL, "BLAKE2SMAC", NULL);
    if (blake2smac == NULL) {
        PyErr_SetString(PyExc_ImportError, "libcrypto has no BLAKE2SMAC");
        return NULL;
    }
    if (PyType_Ready(&ClassifierType) < 0 || reader_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&classify_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ClassifierType);
    if (PyModule_AddObject(m, "Classifier", (PyObject *)&ClassifierType) < 0) {
        Py_DECREF(&ClassifierType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "UdpReader", (PyObject *)&UdpReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
