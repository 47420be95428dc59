/*
 * zepload: the load generator and the target servers of zep's benchmarks, in C so that neither
 * the clients nor the servers are the bottleneck (and both are the same for every system).
 *
 *   zepload serve
 *       Listens on 127.0.0.1 (ports chosen by the OS), prints "sink PORT" and "echo PORT", then
 *       serves until killed. sink: reads a length (8 bytes, little endian), discards that many
 *       bytes (MSG_TRUNC, no copy) and answers with the count received (8 bytes); no half-close
 *       is needed, which microsocks does not relay. echo: sends back what it receives.
 *   zepload bulk VIA TARGET STREAMS BYTES
 *       STREAMS connections to the sink, all set up first, then each sends the length and BYTES
 *       and waits for the sink's count. Prints "seconds bytes errors" (the clock runs from the moment all
 *       connections are set up until the last count arrived).
 *   zepload pingpong VIA TARGET ROUNDS SIZE WARMUP
 *       One connection to echo, WARMUP untimed then ROUNDS timed round trips of SIZE bytes.
 *       Prints "n median_ns p90_ns p99_ns p999_ns mean_ns min_ns max_ns".
 *   zepload connrate VIA TARGET CLIENTS SECONDS SIZE
 *       CLIENTS threads, each in a loop: connect (+ SOCKS5 handshake), SIZE bytes echoed, close.
 *       Prints "connections errors seconds".
 *   zepload idle VIA TARGET N
 *       Opens N tunnels to echo (one byte echoed on each, so each is fully relayed), prints
 *       "ready N", waits for a line on stdin, closes them all and prints "closed".
 *
 * VIA is "direct" (connect to TARGET), "socks5:IP:PORT" (a SOCKS5 proxy, no authentication;
 * TARGET goes in the CONNECT request, as an IPv4 address or a domain name) or "tcp:IP:PORT"
 * (a plain TCP forwarder: connect there, TARGET is only where it forwards to).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "zepload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int send_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_exactly(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n == 0) errno = ECONNRESET;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------------ addresses, connect */

struct endpoint {
    char host[256];
    int port;
};

static void parse_endpoint(const char *s, struct endpoint *ep) {
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof ep->host) {
        fprintf(stderr, "zepload: bad address %s\n", s);
        exit(2);
    }
    memcpy(ep->host, s, (size_t)(colon - s));
    ep->host[colon - s] = 0;
    ep->port = atoi(colon + 1);
}

enum { VIA_DIRECT, VIA_SOCKS5, VIA_TCP };
static int via_kind;
static struct endpoint via_ep, target_ep;

static void parse_via(const char *via, const char *target) {
    parse_endpoint(target, &target_ep);
    if (strcmp(via, "direct") == 0) {
        via_kind = VIA_DIRECT;
    } else if (strncmp(via, "socks5:", 7) == 0) {
        via_kind = VIA_SOCKS5;
        parse_endpoint(via + 7, &via_ep);
    } else if (strncmp(via, "tcp:", 4) == 0) {
        via_kind = VIA_TCP;
        parse_endpoint(via + 4, &via_ep);
    } else {
        fprintf(stderr, "zepload: bad VIA %s\n", via);
        exit(2);
    }
}

static int tcp_connect(const struct endpoint *ep) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)ep->port)};
    if (inet_pton(AF_INET, ep->host, &sa.sin_addr) != 1) {
        errno = EINVAL;
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (errno == EINTR) continue;
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static int socks5_handshake(int fd) {
    unsigned char buf[300];
    if (send_all(fd, "\x05\x01\x00", 3) < 0 || recv_exactly(fd, buf, 2) < 0) return -1;
    if (buf[0] != 5 || buf[1] != 0) { errno = EPROTO; return -1; }
    size_t n = 0;
    buf[n++] = 5; buf[n++] = 1; buf[n++] = 0;
    struct in_addr ip;
    if (inet_pton(AF_INET, target_ep.host, &ip) == 1) {
        buf[n++] = 1;
        memcpy(buf + n, &ip, 4);
        n += 4;
    } else {
        size_t len = strlen(target_ep.host);
        buf[n++] = 3;
        buf[n++] = (unsigned char)len;
        memcpy(buf + n, target_ep.host, len);
        n += len;
    }
    buf[n++] = (unsigned char)(target_ep.port >> 8);
    buf[n++] = (unsigned char)(target_ep.port & 0xff);
    if (send_all(fd, buf, n) < 0 || recv_exactly(fd, buf, 4) < 0) return -1;
    if (buf[0] != 5 || buf[1] != 0) { errno = ECONNREFUSED; return -1; }
    size_t rest = buf[3] == 1 ? 6 : buf[3] == 4 ? 18 : 0;
    if (buf[3] == 3) {
        if (recv_exactly(fd, buf, 1) < 0) return -1;
        rest = (size_t)buf[0] + 2;
    }
    return rest ? recv_exactly(fd, buf, rest) : 0;
}

/* A connection to the target through VIA, ready to carry bytes; -1 with errno on failure. */
static int open_tunnel(void) {
    int fd = tcp_connect(via_kind == VIA_DIRECT ? &target_ep : &via_ep);
    if (fd < 0) return -1;
    if (via_kind == VIA_SOCKS5 && socks5_handshake(fd) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* ------------------------------------------------------------------------------------ serve */

static char discard[1 << 20];

static void *sink_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    unsigned char head[8];
    uint64_t expected = 0, total = 0;
    if (recv_exactly(fd, head, 8) == 0) {
        for (int i = 0; i < 8; i++) expected |= (uint64_t)head[i] << (8 * i);
        while (total < expected) {
            uint64_t want = expected - total;
            ssize_t n = recv(fd, discard, want < sizeof discard ? (size_t)want : sizeof discard, MSG_TRUNC);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            total += (uint64_t)n;
        }
        unsigned char count[8];
        for (int i = 0; i < 8; i++) count[i] = (unsigned char)(total >> (8 * i));
        send_all(fd, count, 8);
        while (recv(fd, discard, sizeof discard, MSG_TRUNC) > 0) { /* until the client closes */ }
    }
    close(fd);
    return NULL;
}

static void *echo_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(65536);
    for (;;) {
        ssize_t n = recv(fd, buf, 65536, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || send_all(fd, buf, (size_t)n) < 0) break;
    }
    free(buf);
    close(fd);
    return NULL;
}

struct listener {
    int fd;
    void *(*handler)(void *);
};

static void spawn(void *(*fn)(void *), void *arg, size_t stack) {
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, stack);
    if (pthread_create(&t, &attr, fn, arg) != 0) die("pthread_create");
    pthread_attr_destroy(&attr);
}

static void *accept_loop(void *arg) {
    struct listener *l = arg;
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) usleep(10000);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_attr_t attr;
        pthread_t t;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        if (pthread_create(&t, &attr, l->handler, (void *)(intptr_t)fd) != 0) close(fd);
        pthread_attr_destroy(&attr);
    }
    return NULL;
}

static int listen_any(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 4096) != 0) die("listen");
    if (getsockname(fd, (struct sockaddr *)&sa, &len) != 0) die("getsockname");
    return fd;
}

static int serve(void) {
    static struct listener sink, echo;
    sink.fd = listen_any();
    sink.handler = sink_conn;
    echo.fd = listen_any();
    echo.handler = echo_conn;
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    getsockname(sink.fd, (struct sockaddr *)&sa, &len);
    printf("sink %d\n", ntohs(sa.sin_port));
    len = sizeof sa;
    getsockname(echo.fd, (struct sockaddr *)&sa, &len);
    printf("echo %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    spawn(accept_loop, &sink, 256 * 1024);
    accept_loop(&echo);
    return 0;
}

/* ------------------------------------------------------------------------------------- bulk */

static pthread_barrier_t barrier;
static uint64_t bulk_bytes;
static atomic_uint_fast64_t bulk_done, bulk_errors;
static char send_buf[1 << 20];

static void *bulk_stream(void *arg) {
    (void)arg;
    int fd = open_tunnel();
    if (fd < 0) perror("zepload: bulk connect");
    pthread_barrier_wait(&barrier);
    if (fd < 0) {
        atomic_fetch_add(&bulk_errors, 1);
        return NULL;
    }
    uint64_t left = bulk_bytes;
    unsigned char head[8];
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)(bulk_bytes >> (8 * i));
    int ok = send_all(fd, head, 8) == 0;
    while (left && ok) {
        size_t n = left < sizeof send_buf ? (size_t)left : sizeof send_buf;
        ok = send_all(fd, send_buf, n) == 0;
        left -= n;
    }
    unsigned char count[8];
    if (ok) ok = recv_exactly(fd, count, 8) == 0;
    uint64_t got = 0;
    for (int i = 0; ok && i < 8; i++) got |= (uint64_t)count[i] << (8 * i);
    if (ok && got == bulk_bytes) {
        atomic_fetch_add(&bulk_done, got);
    } else {
        if (!ok) perror("zepload: bulk transfer");
        atomic_fetch_add(&bulk_errors, 1);
    }
    close(fd);
    return NULL;
}

static int bulk(int streams, uint64_t bytes) {
    for (size_t i = 0; i < sizeof send_buf; i++) send_buf[i] = (char)(i * 131 + 7);
    bulk_bytes = bytes;
    pthread_t *threads = calloc((size_t)streams, sizeof *threads);
    pthread_barrier_init(&barrier, NULL, (unsigned)streams + 1);
    for (int i = 0; i < streams; i++)
        if (pthread_create(&threads[i], NULL, bulk_stream, NULL) != 0) die("pthread_create");
    pthread_barrier_wait(&barrier);
    uint64_t t0 = now_ns();
    for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
    uint64_t t1 = now_ns();
    printf("%.6f %llu %llu\n", (double)(t1 - t0) / 1e9, (unsigned long long)atomic_load(&bulk_done),
           (unsigned long long)atomic_load(&bulk_errors));
    return 0;
}

/* --------------------------------------------------------------------------------- pingpong */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int pingpong(int rounds, int size, int warmup) {
    int fd = open_tunnel();
    if (fd < 0) die("pingpong connect");
    char *out = malloc((size_t)size), *in = malloc((size_t)size);
    memset(out, 'p', (size_t)size);
    uint64_t *lat = calloc((size_t)rounds, sizeof *lat);
    for (int i = -warmup; i < rounds; i++) {
        uint64_t t0 = now_ns();
        if (send_all(fd, out, (size_t)size) < 0 || recv_exactly(fd, in, (size_t)size) < 0) die("pingpong");
        if (i >= 0) lat[i] = now_ns() - t0;
    }
    close(fd);
    long double sum = 0;
    for (int i = 0; i < rounds; i++) sum += lat[i];
    qsort(lat, (size_t)rounds, sizeof *lat, cmp_u64);
#define PCT(p) lat[(size_t)((double)(rounds - 1) * (p) + 0.5)]
    printf("%d %llu %llu %llu %llu %.0Lf %llu %llu\n", rounds, (unsigned long long)PCT(0.5),
           (unsigned long long)PCT(0.9), (unsigned long long)PCT(0.99), (unsigned long long)PCT(0.999),
           sum / rounds, (unsigned long long)lat[0], (unsigned long long)lat[rounds - 1]);
    return 0;
}

/* --------------------------------------------------------------------------------- connrate */

static uint64_t deadline;
static int rate_size;
static atomic_uint_fast64_t rate_done, rate_errors;

static void *rate_client(void *arg) {
    (void)arg;
    char *out = malloc((size_t)rate_size), *in = malloc((size_t)rate_size);
    memset(out, 'c', (size_t)rate_size);
    uint64_t done = 0, errors = 0;
    while (now_ns() < deadline) {
        int fd = open_tunnel();
        if (fd < 0) {
            errors++;
            usleep(1000);
            continue;
        }
        if (send_all(fd, out, (size_t)rate_size) == 0 && recv_exactly(fd, in, (size_t)rate_size) == 0)
            done++;
        else
            errors++;
        close(fd);
    }
    atomic_fetch_add(&rate_done, done);
    atomic_fetch_add(&rate_errors, errors);
    return NULL;
}

static int connrate(int clients, double seconds, int size) {
    rate_size = size;
    pthread_t *threads = calloc((size_t)clients, sizeof *threads);
    uint64_t t0 = now_ns();
    deadline = t0 + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < clients; i++)
        if (pthread_create(&threads[i], NULL, rate_client, NULL) != 0) die("pthread_create");
    for (int i = 0; i < clients; i++) pthread_join(threads[i], NULL);
    uint64_t t1 = now_ns();
    printf("%llu %llu %.6f\n", (unsigned long long)atomic_load(&rate_done),
           (unsigned long long)atomic_load(&rate_errors), (double)(t1 - t0) / 1e9);
    return 0;
}

/* ------------------------------------------------------------------------------------- idle */

static int idle(int n) {
    int *fds = calloc((size_t)n, sizeof *fds);
    for (int i = 0; i < n; i++) {
        char c = 'i';
        fds[i] = open_tunnel();
        if (fds[i] < 0 || send_all(fds[i], &c, 1) < 0 || recv_exactly(fds[i], &c, 1) < 0) {
            fprintf(stderr, "zepload: idle tunnel %d: %s\n", i, strerror(errno));
            return 1;
        }
    }
    printf("ready %d\n", n);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) { /* the harness went away: close anyway */ }
    for (int i = 0; i < n; i++) close(fds[i]);
    printf("closed\n");
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    raise_nofile();
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) return serve();
    if (argc >= 4) parse_via(argv[2], argv[3]);
    if (argc == 6 && strcmp(argv[1], "bulk") == 0) return bulk(atoi(argv[4]), strtoull(argv[5], NULL, 10));
    if (argc == 7 && strcmp(argv[1], "pingpong") == 0) return pingpong(atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc == 7 && strcmp(argv[1], "connrate") == 0) return connrate(atoi(argv[4]), atof(argv[5]), atoi(argv[6]));
    if (argc == 5 && strcmp(argv[1], "idle") == 0) return idle(atoi(argv[4]));
    fprintf(stderr, "usage: zepload serve | bulk|pingpong|connrate|idle VIA TARGET ...\n");
    return 2;
}
