/*
 * A stand-in for the OpenZiti C SDK's `zitilib` API, for zep's tests.
 *
 * It exports every function the `openziti` Python package (1.7.1) declares with ctypes and
 * behaves like the real library where zep depends on it (see library/zitilib/ in ziti-sdk-c):
 *
 *   - Ziti_load_context_with_timeout() reads an identity file (or inline JSON). Besides the
 *     usual keys (`ztAPI`, `id`) a test identity carries a "standin" object listing services,
 *     their intercepts and the loopback target each one reaches. No "standin" object means
 *     a real identity whose controller cannot be reached from here.
 *   - Ziti_connect_addr() looks for a service whose intercept matches (exact host names,
 *     "*.domain" wildcards, IPs and CIDR ranges, port ranges; best score wins, as in the
 *     SDK) across all loaded identities. None: errno ECONNREFUSED and last error
 *     ZITI_SERVICE_UNAVAILABLE. A match: the caller's socket is connected to a loopback
 *     bridge listener (EINPROGRESS when non-blocking) and a thread "dials" the service:
 *     it connects to the target, accepts the bridge connection and pumps bytes both ways
 *     (half-close aware). A failed dial closes the listener, so the caller sees a reset.
 *   - Ziti_connect() does the same for a service named directly.
 *   - Ziti_enroll_identity() takes a JWT-shaped one-time token (header.claims.signature in
 *     base64url, or a file holding it) whose claims carry, besides the SDK's `iss`, `jti`, `em`
 *     and `exp`, a "standin" object: the key and certificate the controller would hand out, the
 *     services of the new identity, and a ledger file that records used tokens. It returns the
 *     identity JSON (malloc'd, the caller frees it). Malformed: ZITI_JWT_INVALID_FORMAT; used
 *     before or expired: ZITI_JWT_INVALID, the controller's answer. "enroll_delay_ms" makes the
 *     controller slow.
 *
 * Test switches per service: "fail_dial" (the overlay dial fails after the bridge connect),
 * "dial_delay_ms" (the overlay dial is slow; the caller is already connected), and
 * "call_delay_ms" (the connect call itself blocks, like a busy SDK loop). Per identity:
 * "load_delay_ms" (slow controller) and "load_error" (a Ziti error code to fail with).
 *
 * Build: cc -shared -fPIC -pthread -o libziti.so standin.c -Wl,--no-as-needed -lc
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* Error codes: the values of the real SDK's includes/ziti/errors.h. */
#define ZITI_OK 0
#define ZITI_CONFIG_NOT_FOUND (-1)
#define ZITI_JWT_INVALID (-3)
#define ZITI_JWT_INVALID_FORMAT (-4)
#define ZITI_ENROLLMENT_METHOD_UNSUPPORTED (-8)
#define ZITI_INVALID_CONFIG (-13)
#define ZITI_AUTHENTICATION_FAILED (-14)
#define ZITI_CONTROLLER_UNAVAILABLE (-16)
#define ZITI_SERVICE_UNAVAILABLE (-18)
#define ZITI_TIMEOUT (-20)
#define ZITI_INVALID_STATE (-22)
#define ZITI_NOT_SUPPORTED (-43)

#define INVALID_HANDLE ((uint32_t)-1)
#define MAX_CONTEXTS 32
#define MAX_SERVICES 32
#define MAX_ITEMS 16
#define NAME_LEN 256

/* ------------------------------------------------------------------ logging, errors */

static __thread int last_error;

static void set_error(int err) { last_error = err; }

static int log_level(void) {
    const char *level = getenv("ZITI_LOG");
    return level ? atoi(level) : 0;
}

static void logf_(int level, const char *fmt, ...) {
    if (log_level() < level) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ziti-standin: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
#define WARN 2
#define INFO 3
#define DEBUG 4

static void sleep_ms(int ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* ------------------------------------------------------------------ a small JSON reader */

enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct json {
    enum jtype type;
    char *key;          /* when a member of an object */
    char *str;          /* J_STR */
    double num;         /* J_NUM, J_BOOL */
    struct json *child; /* J_ARR, J_OBJ: first element */
    struct json *next;  /* next sibling */
} json;

static void json_free(json *j) {
    while (j) {
        json *next = j->next;
        json_free(j->child);
        free(j->key);
        free(j->str);
        free(j);
        j = next;
    }
}

static void skip_ws(const char **p) {
    while (isspace((unsigned char)**p)) (*p)++;
}

static json *parse_value(const char **p, int depth);

static char *parse_string(const char **p) {
    if (**p != '"') return NULL;
    (*p)++;
    size_t cap = 32, len = 0;
    char *out = malloc(cap);
    while (**p && **p != '"') {
        char c = *(*p)++;
        if (c == '\\') {
            c = *(*p)++;
            switch (c) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': /* keep it simple: non-ASCII escapes become '?' */
                for (int i = 0; i < 4 && **p; i++) (*p)++;
                c = '?';
                break;
            case '"': case '\\': case '/': break;
            default: free(out); return NULL;
            }
        }
        if (len + 2 > cap) out = realloc(out, cap *= 2);
        out[len++] = c;
    }
    if (**p != '"') { free(out); return NULL; }
    (*p)++;
    out[len] = '\0';
    return out;
}

static json *parse_container(const char **p, int depth, bool object) {
    json *node = calloc(1, sizeof(json)), **tail = &node->child;
    node->type = object ? J_OBJ : J_ARR;
    char close = object ? '}' : ']';
    (*p)++;
    skip_ws(p);
    if (**p == close) { (*p)++; return node; }
    for (;;) {
        char *key = NULL;
        skip_ws(p);
        if (object) {
            if (!(key = parse_string(p))) break;
            skip_ws(p);
            if (*(*p)++ != ':') { free(key); break; }
        }
        json *item = parse_value(p, depth + 1);
        if (!item) { free(key); break; }
        item->key = key;
        *tail = item;
        tail = &item->next;
        skip_ws(p);
        if (**p == ',') { (*p)++; continue; }
        if (**p == close) { (*p)++; return node; }
        break;
    }
    json_free(node);
    return NULL;
}

static json *parse_value(const char **p, int depth) {
    if (depth > 32) return NULL;
    skip_ws(p);
    if (**p == '{' || **p == '[') return parse_container(p, depth, **p == '{');
    json *node = calloc(1, sizeof(json));
    if (**p == '"') {
        node->type = J_STR;
        if ((node->str = parse_string(p))) return node;
    } else if (strncmp(*p, "true", 4) == 0 || strncmp(*p, "false", 5) == 0) {
        node->type = J_BOOL;
        node->num = (**p == 't');
        *p += (**p == 't') ? 4 : 5;
        return node;
    } else if (strncmp(*p, "null", 4) == 0) {
        *p += 4;
        return node;
    } else {
        char *end;
        node->type = J_NUM;
        node->num = strtod(*p, &end);
        if (end != *p) { *p = end; return node; }
    }
    free(node);
    return NULL;
}

static json *json_parse(const char *text) {
    const char *p = text;
    json *root = parse_value(&p, 0);
    skip_ws(&p);
    if (root && *p != '\0') { json_free(root); root = NULL; }
    return root;
}

static json *json_get(const json *obj, const char *key) {
    if (!obj || obj->type != J_OBJ) return NULL;
    for (json *m = obj->child; m; m = m->next)
        if (strcmp(m->key, key) == 0) return m;
    return NULL;
}

static const char *json_str(const json *obj, const char *key) {
    json *v = json_get(obj, key);
    return v && v->type == J_STR ? v->str : NULL;
}

static int json_int(const json *obj, const char *key, int otherwise) {
    json *v = json_get(obj, key);
    return v && (v->type == J_NUM || v->type == J_BOOL) ? (int)v->num : otherwise;
}

/* ------------------------------------------------------------------ identities and services */

struct port_range { int low, high; };

struct service {
    char name[NAME_LEN];
    char addresses[MAX_ITEMS][NAME_LEN];
    int n_addresses;
    struct port_range ports[MAX_ITEMS];
    int n_ports;
    char target_host[NAME_LEN];
    int target_port;
    bool fail_dial;
    int dial_delay_ms;
    int call_delay_ms;
};

struct context {
    uint32_t handle;
    char *source;
    struct service services[MAX_SERVICES];
    int n_services;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct context *contexts[MAX_CONTEXTS];
static int n_contexts;
static uint32_t next_handle;

/* Addresses handed out by Ziti_resolve (the SDK assigns them from 100.64.0.0/10). */
static struct { in_addr_t ip; char host[NAME_LEN]; } assigned[256];
static int n_assigned;

static bool parse_port_range(const json *v, struct port_range *r) {
    r->low = r->high = -1;
    if (v->type == J_NUM) {
        r->low = r->high = (int)v->num;
    } else if (v->type == J_STR) {
        if (sscanf(v->str, "%d-%d", &r->low, &r->high) == 1) r->high = r->low;
    } else if (v->type == J_OBJ) { /* the SDK's own shape: {"low": 80, "high": 80} */
        r->low = json_int(v, "low", -1);
        r->high = json_int(v, "high", r->low);
    } else {
        return false;
    }
    return r->low > 0 && r->high >= r->low && r->high <= 65535;
}

static bool parse_service(const json *j, struct service *s) {
    memset(s, 0, sizeof(*s));
    const char *name = json_str(j, "name");
    const char *target = json_str(j, "target");
    const json *intercepts = json_get(j, "intercepts");
    if (!name || strlen(name) >= NAME_LEN) return false;
    snprintf(s->name, NAME_LEN, "%s", name);
    if (target) {
        const char *colon = strrchr(target, ':');
        if (!colon || colon - target >= NAME_LEN) return false;
        snprintf(s->target_host, NAME_LEN, "%.*s", (int)(colon - target), target);
        s->target_port = atoi(colon + 1);
    }
    const json *addresses = json_get(intercepts, "addresses");
    for (json *a = addresses ? addresses->child : NULL; a && s->n_addresses < MAX_ITEMS; a = a->next) {
        if (a->type != J_STR || strlen(a->str) >= NAME_LEN) return false;
        snprintf(s->addresses[s->n_addresses++], NAME_LEN, "%s", a->str);
    }
    const json *ports = json_get(intercepts, "ports");
    if (!ports) ports = json_get(intercepts, "portRanges");
    for (json *p = ports ? ports->child : NULL; p && s->n_ports < MAX_ITEMS; p = p->next) {
        if (!parse_port_range(p, &s->ports[s->n_ports++])) return false;
    }
    s->fail_dial = json_int(j, "fail_dial", 0) != 0;
    s->dial_delay_ms = json_int(j, "dial_delay_ms", 0);
    s->call_delay_ms = json_int(j, "call_delay_ms", 0);
    return true;
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0, n;
    char *buf = malloc(cap);
    while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

/* Parse an identity; returns a Ziti error code and, on success, a new context. */
static int load_identity(const char *identity, int timeout_ms, struct context **out) {
    const char *start = identity;
    while (isspace((unsigned char)*start)) start++;
    char *text = *start == '{' ? strdup(identity) : read_file(identity);
    if (!text) {
        logf_(WARN, "%s - %s", identity, strerror(errno));
        return ZITI_CONFIG_NOT_FOUND;
    }
    json *root = json_parse(text);
    free(text);
    int rc = ZITI_OK;
    const json *standin = json_get(root, "standin");
    if (!root || root->type != J_OBJ || (!json_str(root, "ztAPI") && !json_get(root, "ztAPIs"))) {
        rc = ZITI_INVALID_CONFIG;
    } else if (!standin) {
        rc = ZITI_CONTROLLER_UNAVAILABLE; /* a real identity: no controller is reachable from tests */
    } else {
        int delay = json_int(standin, "load_delay_ms", 0);
        if (timeout_ms > 0 && delay > timeout_ms) {
            sleep_ms(timeout_ms);
            rc = ZITI_TIMEOUT;
        } else {
            sleep_ms(delay);
            rc = json_int(standin, "load_error", ZITI_OK);
        }
    }
    if (rc == ZITI_OK) {
        struct context *ctx = calloc(1, sizeof(*ctx));
        const json *services = json_get(standin, "services");
        for (json *s = services ? services->child : NULL; s; s = s->next) {
            if (ctx->n_services == MAX_SERVICES || !parse_service(s, &ctx->services[ctx->n_services++])) {
                rc = ZITI_INVALID_CONFIG;
                break;
            }
        }
        if (rc == ZITI_OK) {
            ctx->source = strdup(identity);
            *out = ctx;
        } else {
            free(ctx);
        }
    }
    json_free(root);
    return rc;
}

/* ------------------------------------------------------------------ intercept matching (SDK scores) */

static bool parse_cidr(const char *text, int *af, unsigned char ip[16], int *bits) {
    char addr[NAME_LEN];
    snprintf(addr, sizeof addr, "%s", text);
    char *slash = strchr(addr, '/');
    if (slash) *slash = '\0';
    if (inet_pton(AF_INET, addr, ip) == 1) *af = AF_INET, *bits = 32;
    else if (inet_pton(AF_INET6, addr, ip) == 1) *af = AF_INET6, *bits = 128;
    else return false;
    if (slash) *bits = atoi(slash + 1);
    return true;
}

/* -1: no match; otherwise lower is better (0: exact). */
static int address_match(const char *host, const char *range) {
    int haf, raf, hbits, rbits;
    unsigned char hip[16], rip[16];
    bool host_is_ip = parse_cidr(host, &haf, hip, &hbits);
    bool range_is_ip = parse_cidr(range, &raf, rip, &rbits);
    if (host_is_ip != range_is_ip) return -1;
    if (host_is_ip) {
        if (haf != raf || rbits > hbits) return -1;
        for (int bit = 0; bit < rbits; bit++) {
            int byte = bit / 8, mask = 0x80 >> (bit % 8);
            if ((hip[byte] & mask) != (rip[byte] & mask)) return -1;
        }
        return hbits - rbits;
    }
    if (range[0] != '*') return strcasecmp(host, range) == 0 ? 0 : -1;
    const char *domain = range + 2; /* "*.example.test" also matches "example.test", as in the SDK */
    for (const char *h = host; h; h = strchr(h, '.') ? strchr(h, '.') + 1 : NULL) {
        if (strcasecmp(h, domain) == 0) return (int)(strlen(host) - strlen(domain));
    }
    return -1;
}

static int service_match(const struct service *s, const char *host, int port) {
    int best_addr = -1, best_port = -1;
    for (int i = 0; i < s->n_addresses; i++) {
        int m = address_match(host, s->addresses[i]);
        if (m >= 0 && (best_addr < 0 || m < best_addr)) best_addr = m;
    }
    for (int i = 0; i < s->n_ports; i++) {
        const struct port_range *r = &s->ports[i];
        if (r->low <= port && port <= r->high && (best_port < 0 || r->high - r->low < best_port))
            best_port = r->high - r->low;
    }
    if (best_addr < 0 || best_port < 0) return -1;
    return (best_addr << 16) | (best_port & 0xFFFF);
}

/* First identity with a match wins; within it, the best-scored service. Caller holds the lock. */
static const struct service *find_service(const char *host, int port) {
    for (int c = 0; c < n_contexts; c++) {
        const struct service *best = NULL;
        int best_score = -1;
        for (int i = 0; i < contexts[c]->n_services; i++) {
            int score = service_match(&contexts[c]->services[i], host, port);
            if (score >= 0 && (best_score < 0 || score < best_score)) {
                best = &contexts[c]->services[i];
                best_score = score;
            }
        }
        if (best) return best;
    }
    return NULL;
}

static struct context *find_context(uint32_t handle) {
    for (int c = 0; c < n_contexts; c++)
        if (contexts[c]->handle == handle) return contexts[c];
    return NULL;
}

/* ------------------------------------------------------------------ the bridge */

struct bridge {
    int listener;
    struct sockaddr_storage app_addr; /* the caller's socket: only it may use the bridge */
    struct service service;
};

static int connect_target(const struct service *s) {
    char port[16];
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    snprintf(port, sizeof port, "%d", s->target_port);
    if (!s->target_host[0] || getaddrinfo(s->target_host, port, &hints, &res) != 0) return -1;
    int fd = -1;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    return fd;
}

static void reset_and_close(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Pump bytes between two sockets until both directions are finished or one side fails. */
static void pump(int a, int b) {
    struct { int from, to; char buf[65536]; size_t len, off; bool eof, done; } dir[2] = {{.from = a, .to = b}, {.from = b, .to = a}};
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
    fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
    int failed = -1; /* the socket that failed, if any */
    while (failed < 0 && !(dir[0].done && dir[1].done)) {
        struct pollfd fds[2] = {{a, 0, 0}, {b, 0, 0}};
        for (int d = 0; d < 2; d++) {
            struct pollfd *from = &fds[d], *to = &fds[1 - d];
            if (!dir[d].eof && dir[d].len == 0) from->events |= POLLIN;
            if (dir[d].len > 0) to->events |= POLLOUT;
        }
        if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
        for (int d = 0; d < 2 && failed < 0; d++) {
            if (!dir[d].eof && dir[d].len == 0) {
                ssize_t n = recv(dir[d].from, dir[d].buf, sizeof dir[d].buf, 0);
                if (n > 0) dir[d].len = (size_t)n, dir[d].off = 0;
                else if (n == 0) dir[d].eof = true;
                else if (errno != EAGAIN && errno != EINTR) failed = dir[d].from;
            }
            if (dir[d].len > 0) {
                ssize_t n = send(dir[d].to, dir[d].buf + dir[d].off, dir[d].len, MSG_NOSIGNAL);
                if (n > 0) dir[d].off += (size_t)n, dir[d].len -= (size_t)n;
                else if (n < 0 && errno != EAGAIN && errno != EINTR) failed = dir[d].to;
            }
            if (dir[d].eof && dir[d].len == 0 && !dir[d].done) {
                shutdown(dir[d].to, SHUT_WR);
                dir[d].done = true;
            }
        }
    }
    if (failed >= 0) { /* propagate the failure as a reset to the healthy side */
        reset_and_close(failed == a ? b : a);
        close(failed);
    } else {
        close(a);
        close(b);
    }
}

static bool same_address(const struct sockaddr_storage *x, const struct sockaddr_storage *y) {
    if (x->ss_family != y->ss_family) return false;
    if (x->ss_family == AF_INET) {
        const struct sockaddr_in *p = (const void *)x, *q = (const void *)y;
        return p->sin_port == q->sin_port && p->sin_addr.s_addr == q->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *p = (const void *)x, *q = (const void *)y;
    return p->sin6_port == q->sin6_port && memcmp(&p->sin6_addr, &q->sin6_addr, 16) == 0;
}

/* The overlay dial, on its own thread: like the SDK's callback once ziti_dial completes. */
static void *dial_thread(void *arg) {
    struct bridge *br = arg;
    const struct service *s = &br->service;
    /* A real dial takes at least a round trip to an edge router, so its outcome always comes
     * after the caller's connect to the bridge: wait for that connection before deciding. */
    struct pollfd pfd = {br->listener, POLLIN, 0};
    bool pending = poll(&pfd, 1, 2000) == 1;
    sleep_ms(s->dial_delay_ms);
    int target = s->fail_dial || !pending ? -1 : connect_target(s);
    if (target < 0) {
        logf_(WARN, "dial of service[%s] failed%s", s->name, s->fail_dial ? " (fail_dial)" : "");
        close(br->listener); /* the caller's pending connection is reset */
        free(br);
        return NULL;
    }
    struct sockaddr_storage peer;
    socklen_t peer_len = sizeof peer;
    int bridge = accept4(br->listener, (struct sockaddr *)&peer, &peer_len, SOCK_CLOEXEC);
    close(br->listener);
    if (bridge >= 0 && !same_address(&peer, &br->app_addr)) {
        logf_(WARN, "bridge accept address mismatch");
        close(bridge);
        bridge = -1;
    }
    if (bridge < 0) {
        close(target);
    } else {
        logf_(DEBUG, "service[%s] connected", s->name);
        pump(bridge, target);
    }
    free(br);
    return NULL;
}

/* Check the caller's socket, bind it to loopback if unbound; returns 0 or an errno. */
static int prepare_socket(int fd, struct sockaddr_storage *app_addr) {
    int type = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return errno;
    if (type != SOCK_STREAM) return EPROTOTYPE; /* the real library also bridges datagrams */
    struct sockaddr_storage addr = {0};
    len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) != 0) return errno;
    if (addr.ss_family == AF_INET) {
        ((struct sockaddr_in *)&addr)->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof(struct sockaddr_in);
    } else if (addr.ss_family == AF_INET6) {
        ((struct sockaddr_in6 *)&addr)->sin6_addr = in6addr_loopback;
        len = sizeof(struct sockaddr_in6);
    } else {
        return EAFNOSUPPORT;
    }
    if (bind(fd, (struct sockaddr *)&addr, len) != 0 && errno != EINVAL) return errno;
    len = sizeof *app_addr;
    return getsockname(fd, (struct sockaddr *)app_addr, &len) != 0 ? errno : 0;
}

static int fail(int err, int ziti_err) {
    set_error(ziti_err);
    errno = err;
    return -1;
}

/* Open the bridge listener, start the dial, connect the caller's socket to the bridge. */
static int bridge_to(int fd, const struct service *service, const struct sockaddr_storage *app_addr) {
    sleep_ms(service->call_delay_ms);
    struct bridge *br = calloc(1, sizeof *br);
    br->service = *service;
    br->app_addr = *app_addr;
    struct sockaddr_storage addr = {.ss_family = app_addr->ss_family};
    socklen_t len = app_addr->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    if (addr.ss_family == AF_INET) ((struct sockaddr_in *)&addr)->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else ((struct sockaddr_in6 *)&addr)->sin6_addr = in6addr_loopback;
    br->listener = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (br->listener < 0 || bind(br->listener, (struct sockaddr *)&addr, len) != 0 || listen(br->listener, 1) != 0 ||
        getsockname(br->listener, (struct sockaddr *)&addr, &len) != 0) {
        int err = errno;
        if (br->listener >= 0) close(br->listener);
        free(br);
        return fail(err, ZITI_INVALID_STATE);
    }
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&thread, &attr, dial_thread, br);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        close(br->listener);
        free(br);
        return fail(err, ZITI_INVALID_STATE);
    }
    set_error(ZITI_OK);
    return connect(fd, (struct sockaddr *)&addr, len);
}

/* ------------------------------------------------------------------ enrollment */

/* A growing string, for writing JSON. */
struct text { char *buf; size_t len, cap; };

static void text_add(struct text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        while (t->len + n + 1 > t->cap) t->cap = t->cap ? t->cap * 2 : 256;
        t->buf = realloc(t->buf, t->cap);
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    t->buf[t->len] = '\0';
}

static void text_str(struct text *t, const char *s) { text_add(t, s, strlen(s)); }

static void json_write_string(struct text *t, const char *s) {
    text_str(t, "\"");
    for (; *s; s++) {
        char esc[8];
        if (*s == '"' || *s == '\\') { esc[0] = '\\'; esc[1] = *s; text_add(t, esc, 2); }
        else if (*s == '\n') text_str(t, "\\n");
        else if ((unsigned char)*s < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", *s); text_str(t, esc); }
        else text_add(t, s, 1);
    }
    text_str(t, "\"");
}

static void json_write(struct text *t, const json *j) {
    char num[32];
    switch (j->type) {
    case J_NULL: text_str(t, "null"); break;
    case J_BOOL: text_str(t, j->num ? "true" : "false"); break;
    case J_NUM: snprintf(num, sizeof num, "%.17g", j->num); text_str(t, num); break;
    case J_STR: json_write_string(t, j->str); break;
    case J_ARR: case J_OBJ:
        text_str(t, j->type == J_OBJ ? "{" : "[");
        for (const json *m = j->child; m; m = m->next) {
            if (m != j->child) text_str(t, ",");
            if (j->type == J_OBJ) { json_write_string(t, m->key); text_str(t, ":"); }
            json_write(t, m);
        }
        text_str(t, j->type == J_OBJ ? "}" : "]");
        break;
    }
}

/* Decode one base64url segment (no padding) into a new NUL-terminated string; NULL if invalid. */
static char *base64url_decode(const char *s, size_t n) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = malloc(n * 3 / 4 + 4);
    size_t len = 0;
    unsigned bits = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        const char *c = s[i] ? strchr(alphabet, s[i]) : NULL;
        if (!c) { free(out); return NULL; }
        bits = (bits << 6) | (unsigned)(c - alphabet);
        if ((count += 6) >= 8) out[len++] = (char)(bits >> (count -= 8));
    }
    if (n % 4 == 1) { free(out); return NULL; }
    out[len] = '\0';
    return out;
}

static json *decode_segment(const char *s, size_t n) {
    char *text = base64url_decode(s, n);
    json *j = text ? json_parse(text) : NULL;
    free(text);
    if (j && j->type != J_OBJ) { json_free(j); j = NULL; }
    return j;
}

/* The token itself, or the contents of the file it names (the real library tries the file first). */
static char *token_text(const char *jwt) {
    struct stat st;
    char *text = stat(jwt, &st) == 0 && S_ISREG(st.st_mode) ? read_file(jwt) : strdup(jwt);
    if (text) {
        size_t n = strlen(text);
        while (n > 0 && isspace((unsigned char)text[n - 1])) text[--n] = '\0';
    }
    return text;
}

/* Record the token's id in the ledger file; false when it is already there (a one-time token). */
static bool spend_token(const char *ledger, const char *jti) {
    int fd = open(ledger, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    flock(fd, LOCK_EX);
    bool fresh = true;
    FILE *f = fdopen(dup(fd), "r");
    char line[NAME_LEN * 2];
    while (f && fresh && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        fresh = strcmp(line, jti) != 0;
    }
    if (f) fclose(f);
    if (fresh) {
        fresh = write(fd, jti, strlen(jti)) == (ssize_t)strlen(jti) && write(fd, "\n", 1) == 1;
    }
    close(fd); /* also releases the lock */
    return fresh;
}

/* The identity document the SDK writes after enrolling (ziti_config_to_json), plus the services. */
static char *identity_json(const char *controller, const char *key, const char *cert, const char *ca,
                           const json *services) {
    struct text t = {0};
    text_str(&t, "{\"ztAPI\":");
    json_write_string(&t, controller);
    text_str(&t, ",\"ztAPIs\":[");
    json_write_string(&t, controller);
    text_str(&t, "],\"id\":{\"key\":");
    json_write_string(&t, key);
    text_str(&t, ",\"cert\":");
    json_write_string(&t, cert);
    if (ca) {
        text_str(&t, ",\"ca\":");
        json_write_string(&t, ca);
    }
    text_str(&t, "},\"standin\":{\"services\":");
    if (services) json_write(&t, services);
    else text_str(&t, "[]");
    text_str(&t, "}}");
    return t.buf;
}

/* Check the token and answer as the controller would; on success, *out is the identity JSON. */
static int enroll(const char *jwt, const char *key, char **out) {
    char *token = token_text(jwt);
    const char *dot1 = token ? strchr(token, '.') : NULL;
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    if (!dot2 || strchr(dot2 + 1, '.')) {
        free(token);
        return ZITI_JWT_INVALID_FORMAT;
    }
    json *header = decode_segment(token, (size_t)(dot1 - token));
    json *claims = decode_segment(dot1 + 1, (size_t)(dot2 - dot1 - 1));
    free(token);
    const json *standin = json_get(claims, "standin");
    const char *controller = json_str(claims, "iss"), *jti = json_str(claims, "jti"), *method = json_str(claims, "em");
    const char *ledger = json_str(standin, "ledger");
    const char *cert = json_str(standin, "cert"), *ca = json_str(standin, "ca");
    key = key ? key : json_str(standin, "key");
    int rc = ZITI_OK;
    if (!header || !json_str(header, "alg") || !controller || !jti || !method) {
        rc = ZITI_JWT_INVALID_FORMAT;
    } else if (strcmp(method, "ott") != 0) {
        rc = ZITI_ENROLLMENT_METHOD_UNSUPPORTED;
    } else if (!standin) {
        rc = ZITI_CONTROLLER_UNAVAILABLE; /* a real token: its controller cannot be reached from here */
    } else if (!ledger || !key || !cert || strlen(jti) >= NAME_LEN) {
        rc = ZITI_JWT_INVALID_FORMAT;
    } else {
        sleep_ms(json_int(standin, "enroll_delay_ms", 0)); /* a slow controller */
        if (json_int(claims, "exp", INT32_MAX) < (long)time(NULL) || !spend_token(ledger, jti))
            rc = ZITI_JWT_INVALID; /* the controller's INVALID_ENROLLMENT_TOKEN: expired or already used */
        else
            *out = identity_json(controller, key, cert, ca, json_get(standin, "services"));
    }
    json_free(header);
    json_free(claims);
    return rc;
}

/* The real library reaches its controller through the proxy in `http_proxy`: say which proxy
 * variables this process has (names only: values may carry credentials). */
static void log_proxy_variables(void) {
    static const char *names[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"};
    char seen[128] = "";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (getenv(names[i])) {
            strcat(seen, " ");
            strcat(seen, names[i]);
        }
    }
    logf_(INFO, "proxy variables seen by the library:%s", seen[0] ? seen : " none");
}

/* ------------------------------------------------------------------ the exported API */

struct version { const char *version, *revision, *build_date; };
static const struct version standin_version = {"1.18.3", "standin", "test"};

API const struct version *ziti_get_version(void) { return &standin_version; }

API void Ziti_lib_init(void) {}

API int Ziti_last_error(void) { return last_error; }

API const char *ziti_errorstr(int err) {
    switch (err) {
    case ZITI_OK: return "OK";
    case ZITI_CONFIG_NOT_FOUND: return "configuration not found";
    case ZITI_JWT_INVALID: return "JWT not accepted by controller";
    case ZITI_JWT_INVALID_FORMAT: return "JWT has invalid format";
    case ZITI_ENROLLMENT_METHOD_UNSUPPORTED: return "unsupported enrollment method";
    case ZITI_INVALID_CONFIG: return "configuration is invalid";
    case ZITI_AUTHENTICATION_FAILED: return "failed to authenticate";
    case ZITI_CONTROLLER_UNAVAILABLE: return "ziti controller is not available";
    case ZITI_SERVICE_UNAVAILABLE: return "service not available";
    case ZITI_TIMEOUT: return "operation did not complete in time";
    case ZITI_INVALID_STATE: return "invalid state";
    case ZITI_NOT_SUPPORTED: return "Operation is not supported";
    default: return "unexpected error";
    }
}

API int Ziti_load_context_with_timeout(uint32_t *handle, const char *identity, int timeout_ms) {
    if (!handle || !identity) return ZITI_INVALID_STATE;
    *handle = INVALID_HANDLE;
    logf_(INFO, "loading identity[%s]", identity);
    pthread_mutex_lock(&lock);
    bool loaded = false;
    for (int c = 0; c < n_contexts; c++) loaded |= strcmp(contexts[c]->source, identity) == 0;
    pthread_mutex_unlock(&lock);
    struct context *ctx = NULL;
    int rc = loaded ? ZITI_INVALID_STATE : n_contexts == MAX_CONTEXTS ? ZITI_INVALID_STATE
                                                                      : load_identity(identity, timeout_ms, &ctx);
    if (rc == ZITI_OK) {
        pthread_mutex_lock(&lock);
        ctx->handle = next_handle++;
        contexts[n_contexts++] = ctx;
        *handle = ctx->handle;
        pthread_mutex_unlock(&lock);
        logf_(INFO, "loaded identity[%s] as ztx[%u] with %d services", identity, ctx->handle, ctx->n_services);
        log_proxy_variables();
    } else {
        logf_(WARN, "fail to load identity file[%s]: %d/%s", identity, rc, ziti_errorstr(rc));
    }
    set_error(rc);
    return rc;
}

API int Ziti_load_context(uint32_t *handle, const char *identity) {
    return Ziti_load_context_with_timeout(handle, identity, 0);
}

API int Ziti_wait_for_auth(uint32_t handle, int timeout_ms) {
    (void)timeout_ms;
    pthread_mutex_lock(&lock);
    bool known = find_context(handle) != NULL;
    pthread_mutex_unlock(&lock);
    return known ? ZITI_OK : EINVAL;
}

API const char *const *Ziti_get_ext_signers(uint32_t handle) {
    (void)handle;
    set_error(ZITI_OK);
    return NULL; /* test identities authenticate with a certificate only */
}

API char *Ziti_login_external(uint32_t handle, const char *signer) {
    (void)handle, (void)signer;
    set_error(ZITI_NOT_SUPPORTED);
    return NULL;
}

API int Ziti_login_totp(uint32_t handle, const char *code) {
    (void)handle, (void)code;
    return ZITI_INVALID_STATE;
}

API int Ziti_socket(int type) {
    int fd = socket(AF_INET, type, 0);
    set_error(fd < 0 ? errno : 0);
    return fd;
}

API int Ziti_close(int fd) {
    (void)fd;
    return -1; /* only sockets bound to a service are the library's to close, and it binds none */
}

static const char *lookup_assigned(const char *host) {
    struct in_addr ip;
    if (inet_pton(AF_INET, host, &ip) != 1) return host;
    for (int i = 0; i < n_assigned; i++)
        if (assigned[i].ip == ip.s_addr) return assigned[i].host;
    return host;
}

API int Ziti_connect_addr(int fd, const char *host, unsigned int port) {
    if (!host || port == 0 || port > 65535) return fail(EINVAL, ZITI_INVALID_STATE);
    struct sockaddr_storage app_addr;
    int err = prepare_socket(fd, &app_addr);
    if (err) return fail(err, ZITI_INVALID_STATE);
    pthread_mutex_lock(&lock);
    const struct service *match = find_service(lookup_assigned(host), (int)port);
    struct service service;
    if (match) service = *match;
    pthread_mutex_unlock(&lock);
    if (!match) {
        logf_(WARN, "no service for target address[tcp:%s:%u]", host, port);
        return fail(ECONNREFUSED, ZITI_SERVICE_UNAVAILABLE);
    }
    return bridge_to(fd, &service, &app_addr);
}

API int Ziti_connect(int fd, uint32_t handle, const char *service_name, const char *terminator) {
    (void)terminator;
    if (handle == INVALID_HANDLE || !service_name) return fail(EINVAL, ZITI_INVALID_STATE);
    struct sockaddr_storage app_addr;
    int err = prepare_socket(fd, &app_addr);
    if (err) return fail(err, ZITI_INVALID_STATE);
    pthread_mutex_lock(&lock);
    struct context *ctx = find_context(handle);
    const struct service *match = NULL;
    for (int i = 0; ctx && i < ctx->n_services && !match; i++)
        if (strcmp(ctx->services[i].name, service_name) == 0) match = &ctx->services[i];
    struct service service;
    if (match) service = *match;
    pthread_mutex_unlock(&lock);
    if (!ctx) return fail(EINVAL, ZITI_INVALID_STATE);
    if (!match) {
        logf_(WARN, "no service[%s]", service_name);
        return fail(ECONNREFUSED, ZITI_SERVICE_UNAVAILABLE);
    }
    return bridge_to(fd, &service, &app_addr);
}

API int Ziti_bind(int fd, uint32_t handle, const char *service, const char *terminator) {
    (void)fd, (void)handle, (void)service, (void)terminator;
    return fail(EOPNOTSUPP, ZITI_NOT_SUPPORTED);
}

API int Ziti_listen(int fd, int backlog) {
    (void)fd, (void)backlog;
    return fail(EOPNOTSUPP, ZITI_NOT_SUPPORTED);
}

API int Ziti_accept(int fd, char *caller, int caller_len) {
    (void)fd, (void)caller, (void)caller_len;
    return fail(EOPNOTSUPP, ZITI_NOT_SUPPORTED);
}

API int Ziti_enroll_identity(const char *jwt, const char *key, const char *cert, char **id_json,
                             unsigned long *id_json_len) {
    (void)cert; /* only the CA enrollment methods use it; the stand-in speaks one-time tokens (ott) */
    if (!jwt || !id_json || !id_json_len) return ZITI_INVALID_STATE;
    char *identity = NULL;
    int rc = enroll(jwt, key, &identity);
    if (rc == ZITI_OK) {
        *id_json = identity; /* malloc'd: the caller frees it with free(), as with the real library */
        *id_json_len = strlen(identity);
    }
    logf_(INFO, "enrollment: %d/%s", rc, ziti_errorstr(rc));
    return rc;
}

/* Like the SDK: IP literals pass through; a host some service intercepts gets an address from
 * 100.64.0.0/10 that Ziti_connect_addr maps back; anything else fails. */
API int Ziti_resolve(const char *host, const char *port, const struct addrinfo *hints, struct addrinfo **list) {
    if (!host) return EAI_NONAME;
    int portnum = port ? atoi(port) : 0;
    struct addrinfo *res = calloc(1, sizeof *res);
    struct sockaddr_in *sin = calloc(1, sizeof(struct sockaddr_in6));
    res->ai_socktype = hints ? hints->ai_socktype : 0;
    res->ai_family = AF_INET;
    res->ai_addr = (struct sockaddr *)sin;
    res->ai_addrlen = sizeof *sin;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)portnum);
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
        *list = res;
        return 0;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)sin;
    if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)portnum);
        res->ai_family = AF_INET6;
        res->ai_addrlen = sizeof *sin6;
        *list = res;
        return 0;
    }
    pthread_mutex_lock(&lock);
    bool known = false;
    for (int c = 0; c < n_contexts && !known; c++)
        for (int i = 0; i < contexts[c]->n_services && !known; i++)
            known = strcasecmp(contexts[c]->services[i].name, host) == 0;
    known = known || find_service(host, portnum) != NULL;
    in_addr_t ip = 0;
    for (int i = 0; known && i < n_assigned && !ip; i++)
        if (strcasecmp(assigned[i].host, host) == 0) ip = assigned[i].ip;
    if (known && !ip && n_assigned < 256 && strlen(host) < NAME_LEN) {
        ip = htonl(0x64400000u + (uint32_t)n_assigned + 1);
        assigned[n_assigned].ip = ip;
        snprintf(assigned[n_assigned++].host, NAME_LEN, "%s", host);
    }
    pthread_mutex_unlock(&lock);
    if (!ip) {
        free(sin);
        free(res);
        return -1;
    }
    sin->sin_addr.s_addr = ip;
    *list = res;
    return 0;
}

API void Ziti_lib_shutdown(void) {
    pthread_mutex_lock(&lock);
    for (int c = 0; c < n_contexts; c++) {
        free(contexts[c]->source);
        free(contexts[c]);
    }
    n_contexts = 0;
    n_assigned = 0;
    pthread_mutex_unlock(&lock);
}
