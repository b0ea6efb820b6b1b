/* wgpy._native: the per-packet loops of wgpy's datapath in C, over OpenSSL's libcrypto.
 *
 * Optional: wgpy works without it. It is one of the data path's two backends behind one
 * contract (wgpy/core/backend.py); the pure-Python one there is the reference, and the
 * tests in tests/native prove that these files compute byte for byte the same thing.
 *
 *   Session(key, expires)              a receiving session: key + replay window
 *   Sealer(key, index, counter=0)      a sending key and its counter: seal(packets, mtu),
 *                                      seal_runs(items, mtu) (GSO runs, super-packets cut)
 *   Routes(), route(items, routes)     the allowed IPs mirrored; a batch grouped by peer
 *   open_batch(buf, nbytes, seg, sessions, now)   one UDP GRO read opened (its docstring)
 *   open_lone(...)                     a lone read opened, checked and written to the TUN
 *   Spans                              a run of opened packets: spans of one buffer
 *   coalesce, checksum, split          as wgpy.io.offload (coalesce reads Spans in place)
 *   segments(super_packet)             as wgpy.core.ip.segments
 *   x25519(jobs)                       X25519 in batches for the handshakes (dh.c)
 *   screen(private, public, messages)  initiations up to their static key (screen.c)
 *   TunWriter()                        a thread making write_tun's writes from a queue
 *   send_runs(fd, runs, dests, dest, gso)   what the core sealed, as GSO sendmsg (send.c)
 *   UdpSender()                        a thread making send_runs's sends from a queue
 *   seal_send(...)                     a lone packet routed, sealed and sent (send.c)
 *
 * Every read of packet data is bounds-checked against the length it came with. The
 * crypto loops allocate nothing per packet, and neither does the way from open_batch to
 * the TUN: a call decrypts into one bytes object and hands back per run a Spans (that
 * buffer and a table of (offset, length)), which coalesce reads in place. The GIL is
 * released while decrypting and encrypting; each Session and Sealer has a lock so that
 * two threads (or a wipe) never use one EVP context at once, and a Sealer reserves its
 * counters under that lock.
 */

#include "native.h"

/* ------------------------------------------------------------------ the module */

static PyMethodDef module_methods[] = {
    {"set_threads", set_threads, METH_O,
     "set_threads(n): n crypto worker threads beside each caller (0: none, the default);\n"
     "seal and open_batch cut a batch into chunks, x25519 into exchanges, for them all."},
    {"threads", get_threads, METH_NOARGS, "threads() -> the number of crypto worker threads."},
    {"set_spread", set_spread, METH_O,
     "set_spread(spare): True: a batch wakes only as many workers as the CPUs this process\n"
     "may run on had to spare over the last 0.1 s (idle time, and the workers' own); False\n"
     "(what set_threads sets): any of them, one per chunk beyond the caller's first."},
    {"spread", get_spread, METH_NOARGS, "spread() -> (spare, workers a batch may wake now)."},
    {"open_batch", open_batch, METH_VARARGS,
     "open_batch(buf, nbytes, seg, sessions, now) -> (runs, per_session, others, drops)\n\n"
     "wgpy.core.backend.open_batch, byte for byte (that is the reference): one UDP (GRO)\n"
     "read opened, decrypted without the GIL. runs: [(session, source, packets)], packets\n"
     "a Spans (spans of one buffer per call);\n"
     "per_session: [(session, nbytes, data)]; others: [(offset, length)]; drops: reason ->\n"
     "count, only the reasons that dropped something (as the reference)."},
    {"open_lone", (PyCFunction)(void (*)(void))open_lone, METH_FASTCALL,
     "open_lone(buf, offset, n, sessions, keypairs, routes, now, fd, vnet, writer)\n"
     "-> (keypair, data, drop, failed) or None\n\n"
     "A lone read's hop to the TUN in one call: the data message of n bytes at buf[offset]\n"
     "opened in place against its Session (sessions: index -> Session), as open_batch\n"
     "would; its inner source's owner in routes (a Routes) checked against the peer of\n"
     "its keypair (keypairs: Session -> keypair, `.peer`), as data.open_read does; the\n"
     "packet written to the TUN fd (behind a zero virtio header where vnet), the GIL\n"
     "released. keypair: the session's where the message authenticated (else None);\n"
     "data: it carried a packet; drop: the Drop value of why it went no further, or None;\n"
     "failed: the failed write as Tun.write_batch's failures ([(errno, write)]) or None.\n"
     "Every byte of the message past its header is zeroed in buf before it returns.\n"
     "None, nothing touched, where the read is no data message, routes no Routes, or the\n"
     "TunWriter `writer` (or None) has a batch queued or uncollected: the usual way then."},
    {"coalesce", (PyCFunction)(void (*)(void))coalesce, METH_VARARGS | METH_KEYWORDS,
     "coalesce(packets, udp=True) -> list[bytes], as wgpy.io.offload.coalesce; an item\n"
     "is a packet (a bytes-like) or a Spans, whose packets are read in place."},
    {"write_tun", write_tun, METH_VARARGS,
     "write_tun(fd, packets, udp=True) -> [(errno, write)]: coalesce's writes, each made with\n"
     "writev from where its packets lie (no copy of a Spans), without the GIL; the writes\n"
     "that failed come back as bytes with their errno."},
    {"send_runs", send_runs, METH_VARARGS,
     "send_runs(fd, runs, dests, dest, gso) -> [(endpoint or None, errno, info)]: io/udp.py\n"
     "UdpSocket.send_runs (the reference), the GIL released: runs of (buf, size, endpoint)\n"
     "as UDP_SEGMENT sends, each to dests[endpoint] (dest(endpoint) where missing):\n"
     "(sockaddr bytes, packet-info bytes or None), or None (dropped). Returns what the\n"
     "socket must learn: (endpoint, errno, info) its source (info) gone, (None, errno,\n"
     "None) GSO refused."},
    {"seal_send", (PyCFunction)(void (*)(void))seal_send, METH_FASTCALL,
     "seal_send(fd, dests, dest, sender, packet, routes, now, mtu, unsettled) -> list | None:\n"
     "a lone packet routed, sealed and sent as core/device.py Device.seal_one and\n"
     "send_runs make it (the reference), its (peer, keypair, bytes, True) appended to\n"
     "unsettled (Device.settle's); send_runs's findings. None, nothing changed, where the\n"
     "packet's way is not that one (Device.send's then)."},
    {"checksum", checksum, METH_VARARGS,
     "checksum(data, initial=0) -> int, as wgpy.io.offload.checksum (initial >= 0)."},
    {"x25519", x25519, METH_O,
     "x25519(jobs) -> list[tuple], as wgpy.core.backend.x25519 (the reference): jobs a tuple\n"
     "of (private, its public or None, (peer publics...)), all bytes of 32; per job\n"
     "(public, shared secret or None where OpenSSL refuses the exchange: an all-zero result,\n"
     "...). On the crypto threads, without the GIL. Raises MemoryError where a thread could\n"
     "not make an exchange's key or context, OSError where a private key would not load:\n"
     "no verdict, nothing answered (the caller works the batch out itself)."},
    {"screen", screen, METH_VARARGS,
     "screen(private, public, messages) -> list, as wgpy.core.backend.screen (the\n"
     "reference): per initiation (148 bytes), Noise_IKpsk2 up to the initiator's static key:\n"
     "(static, ck, h), or None where DH(private, ephemeral) is refused (all zeros) or the\n"
     "static's tag fails. On the crypto threads, without the GIL. Raises MemoryError where a\n"
     "thread could not work a message out (its contexts, a key), OSError where our key would\n"
     "not load or hash: no verdict, nothing answered (the caller screens none of them)."},
    {"split", split, METH_VARARGS, "split(buf, mtu) -> list[bytes], as wgpy.io.offload.split."},
    {"segments", segments, METH_O,
     "segments(super_packet) -> list[bytes], as wgpy.core.ip.segments."},
    {"route", route, METH_VARARGS,
     "route(items, routes) -> (groups, bad): wgpy.core.backend.route (the reference):\n"
     "packets grouped by the owner of their destination in a Routes."},
    {"read_nowait", read_nowait, METH_VARARGS,
     "read_nowait(fd, buf) -> bytes read, or -1 when nothing waits (EAGAIN: no exception)."},
    {"read_packet", read_packet, METH_VARARGS,
     "read_packet(fd, header, size) -> bytes | None: one readv, the virtio header into\n"
     "header (10 bytes), the packet (at most size bytes) into bytes of its own, no copy;\n"
     "None when nothing waits."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "wgpy._native",
    "wgpy's datapath loops in C over OpenSSL (optional; the Python code is the reference).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&SessionType) < 0 || PyType_Ready(&SealerType) < 0
        || PyType_Ready(&RoutesType) < 0 || PyType_Ready(&SpansType) < 0
        || PyType_Ready(&TunWriterType) < 0 || PyType_Ready(&UdpSenderType) < 0)
        return NULL;
    if (pool_init() < 0 || screen_init() < 0 || stage_init() < 0) {
        PyErr_SetString(PyExc_OSError, "cannot set up the crypto threads");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SessionType);
    Py_INCREF(&SealerType);
    Py_INCREF(&RoutesType);
    Py_INCREF(&SpansType);
    Py_INCREF(&TunWriterType);
    Py_INCREF(&UdpSenderType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0
        || PyModule_AddObject(m, "Sealer", (PyObject *)&SealerType) < 0
        || PyModule_AddObject(m, "Routes", (PyObject *)&RoutesType) < 0
        || PyModule_AddObject(m, "Spans", (PyObject *)&SpansType) < 0
        || PyModule_AddObject(m, "TunWriter", (PyObject *)&TunWriterType) < 0
        || PyModule_AddObject(m, "UdpSender", (PyObject *)&UdpSenderType) < 0
        || PyModule_AddIntConstant(m, "WINDOW", WINDOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
