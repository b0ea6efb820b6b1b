/* wgpy._native: routing packets read from the TUN. A Routes mirrors core/allowedips.py's
 * table entry for entry (AllowedIPs tells it every change as it makes it, so the two never
 * disagree between two calls), and `route` groups a batch by the owner of each packet's
 * destination with no Python call per packet.
 *
 * The layout is the Python table's: per family and prefix length, a hash table from the
 * prefix (the address shifted right by the host bits) to its owner; a lookup probes the
 * lengths in use, longest first. Open addressing, linear probing, deletion by backward
 * shift (no tombstones), at most half full. Owners are strong references. */

#include "native.h"

typedef unsigned __int128 u128;

typedef struct {
    u128 *keys;
    PyObject **owners; /* NULL: a free slot */
    size_t cap, count; /* cap: 0 or a power of two */
} Level;

typedef struct {
    PyObject_HEAD
    Level levels[2][129]; /* [0: IPv4, 1: IPv6][prefix length] */
} Routes;

static size_t hash(u128 k)
{
    uint64_t h = (uint64_t)k ^ (uint64_t)(k >> 64) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return (size_t)(h ^ h >> 32);
}

/* The slot holding `key`, or the free slot where it would go (the level is never full). */
static size_t slot(const Level *l, u128 key)
{
    size_t mask = l->cap - 1, i = hash(key) & mask;
    while (l->owners[i] != NULL && l->keys[i] != key)
        i = (i + 1) & mask;
    return i;
}

static int grow(Level *l)
{
    Level n = {.cap = l->cap ? l->cap * 2 : 8};
    n.keys = PyMem_Calloc(n.cap, sizeof(u128));
    n.owners = PyMem_Calloc(n.cap, sizeof(PyObject *));
    if (n.keys == NULL || n.owners == NULL) {
        PyMem_Free(n.keys), PyMem_Free(n.owners);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < l->cap; i++) {
        if (l->owners[i] != NULL) {
            size_t at = slot(&n, l->keys[i]);
            n.keys[at] = l->keys[i], n.owners[at] = l->owners[i];
        }
    }
    n.count = l->count;
    PyMem_Free(l->keys), PyMem_Free(l->owners);
    *l = n;
    return 0;
}

static int level_put(Level *l, u128 key, PyObject *owner)
{
    if ((l->count + 1) * 2 > l->cap && grow(l) < 0)
        return -1;
    size_t at = slot(l, key);
    Py_INCREF(owner);
    if (l->owners[at] == NULL)
        l->count++;
    Py_XSETREF(l->owners[at], owner);
    l->keys[at] = key;
    return 0;
}

/* Remove `key`; 1 if it was there. Backward shift: an entry after the hole moves into it
 * unless its home slot lies cyclically in (hole, entry]. */
static int level_del(Level *l, u128 key)
{
    if (l->cap == 0)
        return 0;
    size_t mask = l->cap - 1, i = slot(l, key), j = i;
    if (l->owners[i] == NULL)
        return 0;
    PyObject *gone = l->owners[i];
    l->owners[i] = NULL;
    while (l->owners[j = (j + 1) & mask] != NULL) {
        size_t k = hash(l->keys[j]) & mask;
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        l->keys[i] = l->keys[j], l->owners[i] = l->owners[j], l->owners[j] = NULL;
        i = j;
    }
    l->count--;
    Py_DECREF(gone);
    return 1;
}

static void level_clear(Level *l)
{
    PyObject **owners = l->owners;
    size_t cap = l->cap;
    PyMem_Free(l->keys);
    *l = (Level){0};
    for (size_t i = 0; i < cap; i++)
        Py_XDECREF(owners[i]);
    PyMem_Free(owners);
}

static u128 prefix_of(u128 addr, int bits, int cidr)
{
    return cidr == 0 ? 0 : addr >> (bits - cidr);
}

static u128 read_addr(const uint8_t *p, size_t n)
{
    u128 v = 0;
    for (size_t i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* The owner of the longest prefix holding the address of `len` (4 or 16) bytes; borrowed,
 * NULL if none. */
static PyObject *lookup(const Routes *r, const uint8_t *addr, int len)
{
    int v6 = len == 16, bits = v6 ? 128 : 32;
    u128 a = read_addr(addr, (size_t)len);
    for (int cidr = bits; cidr >= 0; cidr--) {
        const Level *l = &r->levels[v6][cidr];
        if (l->count == 0)
            continue;
        size_t at = slot(l, prefix_of(a, bits, cidr));
        if (l->owners[at] != NULL)
            return l->owners[at];
    }
    return NULL;
}

/* lookup for open.c's open_lone (routes: a Routes, checked by the caller; with the GIL). */
PyObject *routes_lookup(PyObject *routes, const uint8_t *addr, int len)
{
    return lookup((const Routes *)routes, addr, len);
}

/* (family, prefix length, prefix) of an entry's arguments; -1 with ValueError if bad. */
static int entry(PyObject *args, const char *fmt, PyObject **owner, int *v6, int *cidr, u128 *key)
{
    Py_buffer addr;
    if (!PyArg_ParseTuple(args, fmt, &addr, cidr, owner))
        return -1;
    int bits = addr.len == 4 ? 32 : addr.len == 16 ? 128 : 0;
    if (bits == 0 || *cidr < 0 || *cidr > bits) {
        PyBuffer_Release(&addr);
        PyErr_SetString(PyExc_ValueError, "a 4- or 16-byte address and a prefix length it has");
        return -1;
    }
    *v6 = bits == 128;
    *key = prefix_of(read_addr(addr.buf, (size_t)addr.len), bits, *cidr);
    PyBuffer_Release(&addr);
    return 0;
}

static PyObject *Routes_insert(Routes *self, PyObject *args)
{
    PyObject *owner;
    int v6, cidr;
    u128 key;
    if (entry(args, "y*iO:insert", &owner, &v6, &cidr, &key) < 0)
        return NULL;
    if (level_put(&self->levels[v6][cidr], key, owner) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Routes_remove(Routes *self, PyObject *args)
{
    PyObject *owner = NULL;
    int v6, cidr;
    u128 key;
    if (entry(args, "y*i|O:remove", &owner, &v6, &cidr, &key) < 0)
        return NULL;
    return PyBool_FromLong(level_del(&self->levels[v6][cidr], key));
}

static void routes_clear(Routes *self)
{
    for (int f = 0; f < 2; f++)
        for (int c = 0; c <= 128; c++)
            level_clear(&self->levels[f][c]);
}

static PyObject *Routes_clear(Routes *self, PyObject *Py_UNUSED(ignored))
{
    routes_clear(self);
    Py_RETURN_NONE;
}

static PyObject *Routes_lookup(Routes *self, PyObject *arg)
{
    Py_buffer addr;
    if (PyObject_GetBuffer(arg, &addr, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *owner = addr.len == 4 || addr.len == 16 ? lookup(self, addr.buf, (int)addr.len)
                                                     : NULL;
    PyBuffer_Release(&addr);
    return Py_NewRef(owner ? owner : Py_None);
}

static PyObject *Routes_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_Size(kwds)))
        return PyErr_Format(PyExc_TypeError, "Routes() takes no arguments");
    return type->tp_alloc(type, 0); /* zeroed: every level empty */
}

static void Routes_dealloc(Routes *self)
{
    routes_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The length of an IPv4 (4) or IPv6 (16) packet's addresses; 0 if it is neither. */
static int address_length(const uint8_t *p, size_t n)
{
    unsigned version = n ? p[0] >> 4 : 0;
    return version == 4 && n >= 20 ? 4 : version == 6 && n >= 40 ? 16 : 0;
}

/* The owner of a packet's destination (borrowed; NULL: none, or not an IP packet): for
 * seal_send (send.c), which routes one packet without making its groups. */
PyObject *routes_owner(PyObject *routes, const uint8_t *p, size_t n)
{
    int len = address_length(p, n);
    return len ? lookup((const Routes *)routes, p + (len == 4 ? 16 : 24), len) : NULL;
}

/* ---------------------------------------------------------------- route */

/* The destination address of an IPv4 or IPv6 packet (core/ip.py destination) copied to
 * key: its length (4 or 16), or 0 if the packet is neither. -1: an exception. */
static int inner_destination(PyObject *item, uint8_t key[16])
{
    PyObject *obj = PyTuple_Check(item) && PyTuple_GET_SIZE(item) ? PyTuple_GET_ITEM(item, 0) : item;
    Py_buffer v = {0};
    const uint8_t *p;
    size_t n;
    if (PyBytes_Check(obj)) {
        p = (const uint8_t *)PyBytes_AS_STRING(obj), n = (size_t)PyBytes_GET_SIZE(obj);
    } else if (PyObject_GetBuffer(obj, &v, PyBUF_SIMPLE) == 0) {
        p = v.buf, n = (size_t)v.len;
    } else {
        return -1;
    }
    int len = address_length(p, n);
    memcpy(key, p + (len == 4 ? 16 : 24), (size_t)len);
    if (v.obj != NULL)
        PyBuffer_Release(&v);
    return len;
}


typedef struct {
    PyObject *owner; /* NULL: a free slot; Py_None for "no route" */
    PyObject *group; /* borrowed: the result holds it */
} Group;

/* The group of `owner` (Py_None: no route), made and appended to `groups` if new. */
static PyObject *group_of(Group *t, size_t cap, PyObject *groups, PyObject *owner)
{
    size_t i = ((size_t)owner >> 4) * 0x9E3779B97F4A7C15ULL & (cap - 1);
    while (t[i].owner != NULL && t[i].owner != owner)
        i = (i + 1) & (cap - 1);
    if (t[i].owner != NULL)
        return t[i].group;
    PyObject *group = PyList_New(0);
    PyObject *pair = group ? PyTuple_Pack(2, owner, group) : NULL;
    int rc = pair ? PyList_Append(groups, pair) : -1;
    Py_XDECREF(pair);
    Py_XDECREF(group);
    if (rc < 0)
        return NULL;
    t[i].owner = owner, t[i].group = group;
    return group;
}

/* route(items, routes) -> (groups, bad): core/backend.py route, the reference. */
PyObject *route(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *items, *routes;
    if (!PyArg_ParseTuple(args, "OO!:route", &items, &RoutesType, &routes))
        return NULL;
    PyObject *tuple = PySequence_Tuple(items);
    if (tuple == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    size_t cap = 8;
    while (cap < 2 * (size_t)n)
        cap <<= 1;
    Group *t = PyMem_Calloc(cap, sizeof(Group));
    PyObject *groups = t ? PyList_New(0) : PyErr_NoMemory(), *bad = PyList_New(0);
    for (Py_ssize_t i = 0; groups && bad && i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i), *group = bad;
        uint8_t key[16];
        int len = inner_destination(item, key);
        if (len > 0) {
            PyObject *owner = lookup((Routes *)routes, key, len);
            group = group_of(t, cap, groups, owner ? owner : Py_None);
        }
        if (len < 0 || group == NULL || PyList_Append(group, item) < 0)
            Py_CLEAR(groups);
    }
    PyObject *result = groups && bad ? PyTuple_Pack(2, groups, bad) : NULL;
    Py_XDECREF(groups), Py_XDECREF(bad);
    PyMem_Free(t);
    Py_DECREF(tuple);
    return result;
}

static PyMethodDef Routes_methods[] = {
    {"insert", (PyCFunction)Routes_insert, METH_VARARGS,
     "insert(addr, cidr, owner): the entry (addr masked to cidr) now belongs to owner."},
    {"remove", (PyCFunction)Routes_remove, METH_VARARGS,
     "remove(addr, cidr) -> bool: drop the entry, whoever owns it."},
    {"clear", (PyCFunction)Routes_clear, METH_NOARGS, "Drop every entry."},
    {"lookup", (PyCFunction)Routes_lookup, METH_O,
     "lookup(addr) -> the owner of the longest prefix holding addr, or None."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject RoutesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wgpy._native.Routes",
    .tp_doc = "Routes(): a mirror of core/allowedips.py's table for route().",
    .tp_basicsize = sizeof(Routes),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Routes_new,
    .tp_dealloc = (destructor)Routes_dealloc,
    .tp_methods = Routes_methods,
};
