/* wgpy._classify: what classify.c (the handshake intake, the drain) and reader.c (the UDP
 * reader thread, issue 17 item 4) share: the reads' headers, as recvmmsg fills them. */
#ifndef WGPY_CLASSIFY_H
#define WGPY_CLASSIFY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>

#define MAX_READS 256
#define CMSG_ROOM 64 /* a GRO size and a packet info fit */

typedef struct Reads {
    struct mmsghdr msgs[MAX_READS];
    struct iovec iov[MAX_READS];
    struct sockaddr_in6 names[MAX_READS];
    uint8_t cmsgs[MAX_READS][CMSG_ROOM];
} Reads;

/* Headers from..count-1 made for reads of `slot` bytes each into buf. */
void setup_reads(Reads *rd, uint8_t *buf, Py_ssize_t slot, unsigned from, unsigned count);
/* The first `dirty` headers as setup_reads left them (what a recvmmsg wrote back). */
void reset_reads(Reads *rd, unsigned dirty);
/* Whether socket fd's receive queue is over half full (SO_MEMINFO): asked right after a
 * full read, by whoever made it, for the intake's shedding (classify.c `shedding`). */
int overflowing(int fd);

/* A filled slot of a UdpReader, taken by the Classifier's drain (with the GIL). */
typedef struct {
    int fd;         /* the socket (the cookie replies, SO_MEMINFO) */
    Reads *rd;      /* the reads' headers */
    uint8_t *buf;   /* the slot's first read */
    Py_ssize_t base; /* its offset in the reader's buffer */
    int got;        /* reads in it, 0: none was waiting */
    int over;       /* a full read that left the socket's queue over half full */
} ReaderSlot;

extern PyTypeObject UdpReaderType;
/* The oldest filled slot of reader (the one taken before given back): 0, or -1 with an
 * exception when buf is not the reader's buffer or slot x count are not its reads. */
int reader_take(PyObject *reader, const Py_buffer *buf, Py_ssize_t slot, Py_ssize_t count,
                ReaderSlot *out);
int reader_init(void);

#endif
