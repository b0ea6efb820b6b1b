/* What every file of wgpy._native uses to take its arguments from Python: a key's length
 * checked, the buffers of a tuple's items held, a per-object lock taken with the GIL held.
 * Apart from module.c, which only registers the files' functions and types, so that no
 * file depends on the one that depends on them all. */

#include "native.h"

/* Take a per-object lock while holding the GIL: wait, if we must, without it. */
void lock_gil_held(PyThread_type_lock lock)
{
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

int check_key(const Py_buffer *key)
{
    if (key->len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "a key is 32 bytes");
        return -1;
    }
    return 0;
}

/* Py_buffers for every item of a tuple (one allocation); NULL with an exception. A tuple,
 * not PySequence_Fast's list: since Python 3.12 PyObject_GetBuffer may run Python code
 * (`__buffer__`) that empties a list under us, whereas a tuple holds its items. */
Py_buffer *get_buffers(PyObject *tuple, Py_ssize_t n)
{
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(tuple, i), &views[i], PyBUF_SIMPLE) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            PyMem_Free(views);
            return NULL;
        }
    }
    return views;
}

void release_buffers(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
}
