/* wgpy._native: X25519 in batches, for the handshakes (issue 18).
 *
 * One X25519 costs ~35 us whichever way it is called, and `cryptography` holds the GIL
 * through it, so a Python thread works a handshake's four off one after the other. Here a
 * batch of them (the device's queued handshakes, core/device.py) runs on the crypto pool
 * (pool.c) without the GIL, in two stages:
 *
 *   A  per job (one private key): the key loaded, its public key computed if the caller
 *      does not know it (that costs an X25519 of its own);
 *   B  per exchange (a key and a peer's public key): the shared secret, or a refusal
 *      where the result is all zeros (a low-order point), as core/crypto.dh refuses.
 *
 * Stage B's threads share stage A's keys read-only (OpenSSL 3's EVP_PKEY is safe to use
 * from several threads at once; each exchange makes its own context). The inputs are
 * copied out of their `bytes` with the GIL; the private keys and secrets are cleansed
 * before the memory is freed. core/backend.py `x25519` is the reference. */

#include "native.h"

#include <openssl/core_names.h>
#include <openssl/params.h>

typedef struct {
    uint8_t priv[KEY_LEN], pub[KEY_LEN];
    int known;     /* the caller gave the public key */
    EVP_PKEY *key; /* stage A's; NULL if OpenSSL failed */
} DhKey;

typedef struct {
    Py_ssize_t key; /* which DhKey */
    uint8_t peer[KEY_LEN], shared[KEY_LEN];
    int ok; /* 1: shared is the secret; 0: refused; -1: not worked out (no memory) */
} DhOp;

typedef struct {
    DhKey *keys;
    DhOp *ops;
} DhBatch;

/* A private key whose public key is known: no scalar multiplication to load it (the
 * public key is taken as given); NULL if OpenSSL refused it. */
EVP_PKEY *x25519_load(const uint8_t priv[KEY_LEN], const uint8_t pub[KEY_LEN])
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PRIV_KEY, (void *)priv, KEY_LEN),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pub, KEY_LEN),
        OSSL_PARAM_construct_end(),
    };
    EVP_PKEY *key = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "X25519", NULL);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1
        || EVP_PKEY_fromdata(ctx, &key, EVP_PKEY_KEYPAIR, params) != 1)
        key = NULL;
    EVP_PKEY_CTX_free(ctx);
    return key;
}

/* Whether OpenSSL's errors (taken off its queue) include a failed allocation. */
static int out_of_memory(void)
{
    int oom = 0;
    for (unsigned long e; (e = ERR_get_error()) != 0;)
        oom |= ERR_GET_REASON(e) == ERR_R_MALLOC_FAILURE;
    return oom;
}

/* DH(key, peer) into shared: 1; 0 where OpenSSL refuses the exchange (an all-zero
 * result, a low-order point: the peer's doing; the reference's `cryptography` raises
 * ValueError there); -1 where it could not be worked out for want of memory (the peer's
 * key or the context not made, or OpenSSL's errors naming a failed allocation, whichever
 * step it hit: its provider allocates in them too; no verdict on the peer) or `key` is
 * NULL (not loaded). Any thread, without the GIL: `key` is only read (OpenSSL 3's
 * EVP_PKEY is safe to share), the context is this call's own. */
int x25519_derive(EVP_PKEY *key, const uint8_t peer[KEY_LEN], uint8_t shared[KEY_LEN])
{
    EVP_PKEY *pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer, KEY_LEN);
    EVP_PKEY_CTX *ctx = key != NULL && pk != NULL ? EVP_PKEY_CTX_new(key, NULL) : NULL;
    size_t len = KEY_LEN;
    /* OpenSSL refuses an all-zero result itself (the derive fails); the check makes sure */
    static const uint8_t zero[KEY_LEN];
    int ok = -1; /* till the key and the context are made */
    if (ctx != NULL)
        ok = EVP_PKEY_derive_init(ctx) == 1 && EVP_PKEY_derive_set_peer(ctx, pk) == 1
             && EVP_PKEY_derive(ctx, shared, &len) == 1 && len == KEY_LEN
             && CRYPTO_memcmp(shared, zero, KEY_LEN) != 0;
    if (ok != 1 && out_of_memory())
        ok = -1;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(pk);
    return ok;
}

static void load_key(void *arg, long c)
{
    DhKey *k = &((DhBatch *)arg)->keys[c];
    if (k->known) {
        k->key = x25519_load(k->priv, k->pub);
    } else {
        size_t len = KEY_LEN;
        k->key = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, k->priv, KEY_LEN);
        if (k->key != NULL && (EVP_PKEY_get_raw_public_key(k->key, k->pub, &len) != 1
                               || len != KEY_LEN)) {
            EVP_PKEY_free(k->key);
            k->key = NULL;
        }
    }
    if (k->key == NULL)
        ERR_clear_error();
}

static void exchange(void *arg, long c)
{
    DhBatch *b = arg;
    DhOp *op = &b->ops[c];
    op->ok = x25519_derive(b->keys[op->key].key, op->peer, op->shared);
}

static int copy_key(PyObject *obj, uint8_t *to, const char *what)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != KEY_LEN) {
        PyErr_Format(PyExc_ValueError, "%s: 32 bytes", what);
        return -1;
    }
    memcpy(to, PyBytes_AS_STRING(obj), KEY_LEN);
    return 0;
}

/* Job j of `jobs` (its shape checked by count_ops) into keys[j] and its exchanges
 * from ops[*nops] on. */
static int copy_job(PyObject *job, Py_ssize_t j, DhBatch *b, Py_ssize_t *nops)
{
    PyObject *pub = PyTuple_GET_ITEM(job, 1), *peers = PyTuple_GET_ITEM(job, 2);
    DhKey *k = &b->keys[j];
    if (copy_key(PyTuple_GET_ITEM(job, 0), k->priv, "a private key") < 0)
        return -1;
    k->known = pub != Py_None;
    if (k->known && copy_key(pub, k->pub, "a public key") < 0)
        return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(peers); i++, (*nops)++) {
        b->ops[*nops].key = j;
        if (copy_key(PyTuple_GET_ITEM(peers, i), b->ops[*nops].peer, "a peer's public key") < 0)
            return -1;
    }
    return 0;
}

/* Whether every exchange has an answer (a secret, or a refusal). */
static int worked_out(const DhOp *ops, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (ops[i].ok < 0)
            return 0;
    return 1;
}

/* The answer: per job (public, secret or None per peer). */
static PyObject *results(PyObject *jobs, const DhBatch *b)
{
    Py_ssize_t njobs = PyTuple_GET_SIZE(jobs), o = 0;
    PyObject *out = PyList_New(njobs);
    for (Py_ssize_t j = 0; out != NULL && j < njobs; j++) {
        Py_ssize_t n = PyTuple_GET_SIZE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(jobs, j), 2));
        PyObject *row = PyTuple_New(n + 1);
        if (row == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, j, row);
        PyObject *pub = PyBytes_FromStringAndSize((const char *)b->keys[j].pub, KEY_LEN);
        PyTuple_SET_ITEM(row, 0, pub);
        for (Py_ssize_t i = 1; pub != NULL && i <= n; i++, o++) {
            const DhOp *op = &b->ops[o];
            PyObject *s = op->ok ? PyBytes_FromStringAndSize((const char *)op->shared, KEY_LEN)
                                 : Py_NewRef(Py_None);
            PyTuple_SET_ITEM(row, i, s);
            pub = s; /* NULL stops the loop */
        }
        if (pub == NULL)
            Py_CLEAR(out);
    }
    return out;
}

static void free_batch(DhBatch *b, Py_ssize_t njobs, Py_ssize_t nops)
{
    for (Py_ssize_t j = 0; b->keys != NULL && j < njobs; j++)
        EVP_PKEY_free(b->keys[j].key);
    if (b->keys != NULL)
        OPENSSL_cleanse(b->keys, (size_t)njobs * sizeof *b->keys);
    if (b->ops != NULL)
        OPENSSL_cleanse(b->ops, (size_t)nops * sizeof *b->ops);
    PyMem_Free(b->keys);
    PyMem_Free(b->ops);
}

/* How many exchanges the jobs ask for; -1 with an exception if a job is malformed. */
static Py_ssize_t count_ops(PyObject *jobs)
{
    Py_ssize_t nops = 0;
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(jobs); j++) {
        PyObject *job = PyTuple_GET_ITEM(jobs, j);
        if (!PyTuple_Check(job) || PyTuple_GET_SIZE(job) != 3
            || !PyTuple_Check(PyTuple_GET_ITEM(job, 2))) {
            PyErr_SetString(PyExc_TypeError, "a job is (private, public or None, (peers...))");
            return -1;
        }
        nops += PyTuple_GET_SIZE(PyTuple_GET_ITEM(job, 2));
    }
    return nops;
}

PyObject *x25519(PyObject *Py_UNUSED(module), PyObject *jobs)
{
    if (!PyTuple_Check(jobs)) {
        PyErr_SetString(PyExc_TypeError, "x25519(jobs): a tuple of jobs");
        return NULL;
    }
    Py_ssize_t njobs = PyTuple_GET_SIZE(jobs), nops = count_ops(jobs), o = 0;
    int loaded = 1;
    if (nops < 0)
        return NULL;
    DhBatch b = {PyMem_Calloc(njobs ? (size_t)njobs : 1, sizeof(DhKey)),
                 PyMem_Calloc(nops ? (size_t)nops : 1, sizeof(DhOp))};
    PyObject *out = NULL;
    if (b.keys == NULL || b.ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < njobs; j++)
        if (copy_job(PyTuple_GET_ITEM(jobs, j), j, &b, &o) < 0)
            goto done;
    Py_BEGIN_ALLOW_THREADS
    pool_run(load_key, &b, (long)njobs);
    for (Py_ssize_t j = 0; j < njobs; j++)
        loaded &= b.keys[j].key != NULL;
    if (loaded)
        pool_run(exchange, &b, (long)nops);
    Py_END_ALLOW_THREADS
    if (!loaded)
        PyErr_SetString(PyExc_OSError, "OpenSSL could not load an X25519 key");
    else if (!worked_out(b.ops, nops))
        PyErr_NoMemory(); /* not a refusal: the caller would count a forged handshake */
    else
        out = results(jobs, &b);
done:
    free_batch(&b, njobs, nops);
    return out;
}
