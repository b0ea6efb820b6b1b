/* wgpy._native: initiations screened in batches, up to the initiator's static key (issue 18).
 *
 * A spoofed flood within the per-source rates sends initiations with a valid mac1 from
 * static keys we do not know. Each one costs the responder the first half of Noise_IKpsk2's
 * message 1 before it can tell: DH(our static, their ephemeral), two KDFs, two hashes
 * and the AEAD that hides the initiator's static key. Here a batch of them (the device's
 * queued initiations, core/device.py `_work_off`) goes through those steps on the crypto
 * pool (pool.c) without the GIL, one message a chunk:
 *
 *   ck, h = HASH(CONSTRUCTION), HASH(HASH(ck || IDENTIFIER) || our public key)   (per call)
 *   shared = DH(our static, e)            refused where the result is all zeros
 *   ck = KDF1(ck, e); h = HASH(h || e)
 *   ck, key = KDF2(ck, shared)
 *   static = AEAD-open(key, 0, encrypted static, h)     refused where the tag fails
 *   h = HASH(h || encrypted static)
 *
 * and hands back per message (the initiator's static key, ck, h) or None. Python then
 * drops a stranger's initiation at once (it looks the key up among its peers) and goes on
 * from (ck, h) with a peer's (core/handshake.py `consume_initiation`): nothing is done
 * twice. core/backend.py `screen` is the reference (core/noise.py's arithmetic);
 * tests/native/test_screen.py holds the two to identical answers.
 *
 * BLAKE2s, HMAC-BLAKE2s and ChaCha20-Poly1305 are libcrypto's (EVP); every thread has its
 * own hash, HMAC and cipher contexts (made on first use, freed when the thread ends). The
 * messages are copied out of their buffers with the GIL; our key is loaded once per call
 * and only read by the workers; keys, secrets and chaining keys are cleansed. */

#include "native.h"

#include <openssl/core_names.h>
#include <openssl/params.h>

#define HASH_LEN 32
#define INITIATION_LEN 148
#define EPHEMERAL_AT 8 /* the initiation's unencrypted ephemeral */
#define STATIC_AT 40   /* its encrypted static: 32 bytes and a tag */
#define SEALED_STATIC (KEY_LEN + TAG_LEN)

static const char CONSTRUCTION[] = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
static const char IDENTIFIER[] = "WireGuard v1 zx2c4 Jason@zx2c4.com";

static EVP_MD *blake2s;  /* fetched once (screen_init) */
static EVP_MAC *hmac_alg;
static pthread_key_t hash_key;

typedef struct {
    EVP_MD_CTX *md;   /* BLAKE2s-256 */
    EVP_MAC_CTX *mac; /* HMAC over BLAKE2s-256 */
} HashCtx;

typedef struct {
    uint8_t e[KEY_LEN], sealed[SEALED_STATIC]; /* from the message */
    uint8_t initiator[KEY_LEN], ck[HASH_LEN], h[HASH_LEN]; /* the answer */
    int ok; /* 1: answered; 0: refused (the message's doing); -1: not worked out (memory) */
} Screened;

typedef struct {
    EVP_PKEY *key;                      /* our static key, read-only for the workers */
    uint8_t ck[HASH_LEN], h[HASH_LEN];  /* the state before any message */
    Screened *m;
} ScreenBatch;

static void free_hash_ctx(void *p)
{
    HashCtx *t = p;
    EVP_MD_CTX_free(t->md);
    EVP_MAC_CTX_free(t->mac);
    free(t);
}

/* This thread's hash and HMAC contexts; NULL if OpenSSL failed. */
static HashCtx *thread_hash(void)
{
    HashCtx *t = pthread_getspecific(hash_key);
    if (t != NULL)
        return t;
    t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "BLAKE2S-256", 0),
        OSSL_PARAM_construct_end(),
    };
    t->md = EVP_MD_CTX_new();
    t->mac = EVP_MAC_CTX_new(hmac_alg);
    if (t->md == NULL || t->mac == NULL || EVP_MAC_CTX_set_params(t->mac, params) != 1
        || pthread_setspecific(hash_key, t) != 0) {
        ERR_clear_error();
        free_hash_ctx(t);
        return NULL;
    }
    return t;
}

/* HASH(a || b) */
static int hash2(EVP_MD_CTX *md, uint8_t out[HASH_LEN], const void *a, size_t na,
                 const void *b, size_t nb)
{
    unsigned int len = 0;
    return EVP_DigestInit_ex(md, blake2s, NULL) == 1 && EVP_DigestUpdate(md, a, na) == 1
           && EVP_DigestUpdate(md, b, nb) == 1 && EVP_DigestFinal_ex(md, out, &len) == 1
           && len == HASH_LEN;
}

/* HMAC(key, a || b) */
static int hmac2(EVP_MAC_CTX *mac, uint8_t out[HASH_LEN], const uint8_t key[HASH_LEN],
                 const uint8_t *a, size_t na, const uint8_t *b, size_t nb)
{
    size_t len = 0;
    return EVP_MAC_init(mac, key, HASH_LEN, NULL) == 1 && EVP_MAC_update(mac, a, na) == 1
           && EVP_MAC_update(mac, b, nb) == 1 && EVP_MAC_final(mac, out, &len, HASH_LEN) == 1
           && len == HASH_LEN;
}

/* KDF1 (second NULL) or KDF2 of the whitepaper: prk = HMAC(ck, in); first =
 * HMAC(prk, 0x1); second = HMAC(prk, first || 0x2). `first` may be `ck`. */
static int kdf(EVP_MAC_CTX *mac, const uint8_t ck[HASH_LEN], const uint8_t in[KEY_LEN],
               uint8_t first[HASH_LEN], uint8_t second[HASH_LEN])
{
    static const uint8_t one = 1, two = 2;
    uint8_t prk[HASH_LEN], t1[HASH_LEN];
    int ok = hmac2(mac, prk, ck, in, KEY_LEN, NULL, 0) && hmac2(mac, t1, prk, &one, 1, NULL, 0)
             && (second == NULL || hmac2(mac, second, prk, t1, HASH_LEN, &two, 1));
    memcpy(first, t1, HASH_LEN);
    OPENSSL_cleanse(prk, sizeof prk);
    OPENSSL_cleanse(t1, sizeof t1);
    return ok;
}

/* ChaCha20-Poly1305 open of the sealed static key, nonce 0, `h` as associated data: 1;
 * 0 where the tag fails; -1 where OpenSSL failed before (no context: no memory). */
static int open_static(EVP_CIPHER_CTX *ctx, const uint8_t key[KEY_LEN], const uint8_t h[HASH_LEN],
                       const uint8_t sealed[SEALED_STATIC], uint8_t out[KEY_LEN])
{
    static const uint8_t nonce[12];
    int n = 0;
    if (ctx == NULL || EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) != 1
        || EVP_DecryptUpdate(ctx, NULL, &n, h, HASH_LEN) != 1
        || EVP_DecryptUpdate(ctx, out, &n, sealed, KEY_LEN) != 1 || n != KEY_LEN
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, (void *)(sealed + KEY_LEN)) != 1)
        return -1;
    return EVP_DecryptFinal_ex(ctx, out + KEY_LEN, &n) == 1;
}

/* One message, on any thread of the pool. Only an exchange OpenSSL refuses (x25519_derive's
 * 0: a low-order ephemeral) and a static whose tag fails are the message's: any other
 * failure is OpenSSL's (no memory for a context or a key), -1, which makes `screen` raise
 * rather than count a forged handshake. */
static void screen_one(void *arg, long c)
{
    ScreenBatch *b = arg;
    Screened *m = &b->m[c];
    HashCtx *t = thread_hash();
    uint8_t shared[KEY_LEN], key[KEY_LEN], h[HASH_LEN];
    int dh = t != NULL ? x25519_derive(b->key, m->e, shared) : -1, opened = -1;
    int ok = dh == 1 && kdf(t->mac, b->ck, m->e, m->ck, NULL)
             && hash2(t->md, h, b->h, HASH_LEN, m->e, KEY_LEN)
             && kdf(t->mac, m->ck, shared, m->ck, key)
             && (opened = open_static(thread_ctx(0), key, h, m->sealed, m->initiator)) == 1
             && hash2(t->md, m->h, h, HASH_LEN, m->sealed, SEALED_STATIC);
    m->ok = ok ? 1 : dh == 0 || (dh == 1 && opened == 0) ? 0 : -1;
    if (m->ok != 1) {
        ERR_clear_error();
        OPENSSL_cleanse(m->ck, HASH_LEN);
        OPENSSL_cleanse(m->initiator, KEY_LEN);
    }
    OPENSSL_cleanse(shared, sizeof shared);
    OPENSSL_cleanse(key, sizeof key);
}

/* The messages' ephemerals and sealed statics into b->m; -1 with an exception. */
static int copy_messages(PyObject *messages, Screened *m, Py_ssize_t n)
{
    Py_buffer *views = get_buffers(messages, n);
    if (views == NULL)
        return -1;
    int ok = 1;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        const uint8_t *p = views[i].buf;
        ok = views[i].len == INITIATION_LEN;
        if (ok) {
            memcpy(m[i].e, p + EPHEMERAL_AT, KEY_LEN);
            memcpy(m[i].sealed, p + STATIC_AT, SEALED_STATIC);
        }
    }
    release_buffers(views, n);
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "an initiation is 148 bytes");
    return ok ? 0 : -1;
}

/* The state before any message: ck = HASH(CONSTRUCTION), h = HASH(HASH(ck || ID) || pub). */
static int initial_state(ScreenBatch *b, const uint8_t pub[KEY_LEN])
{
    HashCtx *t = thread_hash();
    uint8_t h0[HASH_LEN];
    return t != NULL && hash2(t->md, b->ck, CONSTRUCTION, sizeof CONSTRUCTION - 1, NULL, 0)
           && hash2(t->md, h0, b->ck, HASH_LEN, IDENTIFIER, sizeof IDENTIFIER - 1)
           && hash2(t->md, b->h, h0, HASH_LEN, pub, KEY_LEN);
}

/* The answer: per message (initiator, ck, h) or None; MemoryError where one was not
 * worked out (no verdict: its None would count a forged handshake). */
static PyObject *screened(const Screened *m, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (m[i].ok < 0)
            return PyErr_NoMemory();
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *row = m[i].ok ? Py_BuildValue("(y#y#y#)", (const char *)m[i].initiator,
                                                (Py_ssize_t)KEY_LEN, (const char *)m[i].ck,
                                                (Py_ssize_t)HASH_LEN, (const char *)m[i].h,
                                                (Py_ssize_t)HASH_LEN)
                                : Py_NewRef(Py_None);
        if (row == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, row);
    }
    return out;
}

/* Our keys, checked and loaded; NULL with an exception. */
static EVP_PKEY *our_key(const Py_buffer *priv, const Py_buffer *pub)
{
    if (check_key(priv) < 0 || check_key(pub) < 0)
        return NULL;
    EVP_PKEY *key = x25519_load(priv->buf, pub->buf);
    if (key == NULL) {
        ERR_clear_error();
        PyErr_SetString(PyExc_OSError, "OpenSSL could not load an X25519 key");
    }
    return key;
}

PyObject *screen(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer priv = {0}, pub = {0};
    PyObject *messages, *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*O!:screen", &priv, &pub, &PyTuple_Type, &messages))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(messages);
    ScreenBatch b = {our_key(&priv, &pub), {0}, {0},
                     PyMem_Calloc(n ? (size_t)n : 1, sizeof(Screened))};
    if (b.key == NULL || b.m == NULL) {
        if (b.m == NULL && !PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    if (copy_messages(messages, b.m, n) < 0)
        goto done;
    if (!initial_state(&b, pub.buf)) {
        ERR_clear_error();
        PyErr_SetString(PyExc_OSError, "OpenSSL could not hash");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    pool_run(screen_one, &b, (long)n);
    Py_END_ALLOW_THREADS
    out = screened(b.m, n); /* NULL, MemoryError, where one was not worked out */
done:
    EVP_PKEY_free(b.key);
    if (b.m != NULL)
        OPENSSL_cleanse(b.m, (size_t)n * sizeof *b.m);
    PyMem_Free(b.m);
    OPENSSL_cleanse(b.ck, sizeof b.ck);
    PyBuffer_Release(&priv);
    PyBuffer_Release(&pub);
    return out;
}

/* Once per process: BLAKE2s and HMAC fetched, the contexts' thread key made. */
int screen_init(void)
{
    static int once;
    if (once)
        return 0;
    blake2s = EVP_MD_fetch(NULL, "BLAKE2S-256", NULL);
    hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (blake2s == NULL || hmac_alg == NULL || pthread_key_create(&hash_key, free_hash_ctx) != 0) {
        ERR_clear_error();
        return -1;
    }
    once = 1;
    return 0;
}
