/* A line-rate UDP sender for the flood benchmark and test: blasts a pool of prebuilt
 * datagrams (made by Python with wgpy.core) with sendmmsg, paced to a rate or as fast as
 * it goes, each datagram from the next of the given source addresses (IP_PKTINFO on one
 * socket, so a batch of 64 spreads over the sources the way spoofed traffic does: no two
 * neighbours from one source, nothing for GRO to merge).
 *
 *   flood_send TARGET PORT RATE SECONDS POOLFILE SIZE SRC[,SRC...]
 *
 * POOLFILE holds datagrams of SIZE bytes back to back. RATE 0: as fast as it goes. Prints
 * "ready" once set up, then after SECONDS (or SIGTERM) one JSON line:
 * {"sent": N, "errors": N, "elapsed": S}. Built by bench/flood.py with gcc at run time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SOURCES 4096

static volatile sig_atomic_t stop;

static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_sources(char *list, struct in_addr *out) {
    int n = 0;
    for (char *tok = strtok(list, ","); tok && n < MAX_SOURCES; tok = strtok(NULL, ",")) {
        if (inet_pton(AF_INET, tok, &out[n]) != 1) {
            fprintf(stderr, "bad source %s\n", tok);
            exit(2);
        }
        n++;
    }
    return n;
}

static unsigned char *read_pool(const char *path, size_t size, size_t *count) {
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0) {
        perror(path);
        exit(2);
    }
    long len = ftell(f);
    rewind(f);
    unsigned char *pool = malloc(len > 0 ? (size_t)len : 1);
    if (!pool || len < (long)size || fread(pool, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: empty or unreadable pool\n", path);
        exit(2);
    }
    fclose(f);
    *count = (size_t)len / size;
    return pool;
}

/* One batch's headers: each message its own pool entry and its own source address. */
struct batch {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    char cmsg[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
};

static void fill(struct batch *b, int k, unsigned char *datagram, size_t size,
                 struct sockaddr_in *dst, struct in_addr src) {
    struct msghdr *h = &b->msgs[k].msg_hdr;
    memset(h, 0, sizeof(*h));
    b->iov[k].iov_base = datagram;
    b->iov[k].iov_len = size;
    h->msg_name = dst;
    h->msg_namelen = sizeof(*dst);
    h->msg_iov = &b->iov[k];
    h->msg_iovlen = 1;
    h->msg_control = b->cmsg[k];
    h->msg_controllen = sizeof(b->cmsg[k]);
    struct cmsghdr *c = CMSG_FIRSTHDR(h);
    c->cmsg_level = IPPROTO_IP;
    c->cmsg_type = IP_PKTINFO;
    c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
    struct in_pktinfo info;
    memset(&info, 0, sizeof(info));
    info.ipi_spec_dst = src;
    memcpy(CMSG_DATA(c), &info, sizeof(info));
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s TARGET PORT RATE SECONDS POOLFILE SIZE SRC[,SRC...]\n",
                argv[0]);
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1)
        return 2;
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    size_t size = (size_t)atol(argv[6]), count;
    unsigned char *pool = read_pool(argv[5], size, &count);
    static struct in_addr sources[MAX_SOURCES];
    int nsrc = parse_sources(argv[7], sources);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1, buf = 4 << 20;
    setsockopt(fd, SOL_IP, IP_FREEBIND, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof(buf));
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    static struct batch b;
    unsigned long long sent = 0, errors = 0, i = 0;
    printf("ready\n");
    fflush(stdout);
    double start = now(), t;
    while (!stop && (t = now()) - start < seconds) {
        long want = BATCH;
        if (rate > 0) {
            double due = (t - start) * rate - (double)sent;
            want = due < BATCH ? (long)due : BATCH;
            if (want <= 0) {
                struct timespec pause = {0, 50000};
                nanosleep(&pause, NULL);
                continue;
            }
        }
        for (long k = 0; k < want; k++, i++)
            fill(&b, (int)k, pool + (i % count) * size, size, &dst, sources[i % nsrc]);
        int done = sendmmsg(fd, b.msgs, (unsigned)want, 0);
        if (done < 0) {
            errors += (unsigned long long)want; /* a full queue: count them and go on */
            if (errno != EAGAIN && errno != ENOBUFS && errno != EPERM &&
                errno != ECONNREFUSED) {
                perror("sendmmsg");
                return 1;
            }
            sent += (unsigned long long)want;
            continue;
        }
        errors += (unsigned long long)(want - done);
        sent += (unsigned long long)want;
    }
    printf("{\"sent\": %llu, \"errors\": %llu, \"elapsed\": %.3f}\n", sent, errors,
           now() - start);
    return 0;
}
