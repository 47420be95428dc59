# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled relay: a splice engine on its own native thread.

One engine per process, started by ``start()`` (the server calls it before it listens, so an
engine that cannot start is a start-up error, not a client's). Its thread runs an epoll loop with
the GIL released and never touches a Python object. ``relay()`` detaches both sockets, registers
its waiter, submits the pair (mutex-guarded queue + eventfd wake-up) and awaits a future; the
engine posts finished pairs to a completion queue whose eventfd each asyncio loop that relays
watches with ``add_reader``.

A direction over a byte stream starts in SMALL mode, recv/send on a small buffer (allocated only
while it holds data): for short messages that is two calls per hop where splice takes two plus the
pipe. A read that fills the buffer switches the direction to SPLICE, socket -> pipe -> socket with
splice(SPLICE_F_MOVE | SPLICE_F_NONBLOCK); a run of small splice reads switches it back. A
direction takes a pipe from the pool only while it holds data and gives it back as soon as the
pipe is empty, so idle pairs hold no pipe and no buffer. A direction where splice says EINVAL
falls back to COPY, recv/send on a fixed buffer, for good. Readiness is edge-triggered: each fd is
registered once and the engine keeps its own "readable"/"writable" flags, cleared on EAGAIN, or on
a short read from a byte stream (its queue was empty, and the next arrival raises a new edge), so
there is no epoll_ctl per state change and no read that only says EAGAIN after a short message.

The engine can also take a SOCKS5 client straight from accept (``start_socks()``): it reads the
greeting, the user/password login and the request itself, posts the request to Python, which
routes it (policy stays in Python), connects to the address Python names, sends the reply and
relays, with one Python visit per connection between accept and the end. Anything off that path
(a wrong byte, a failed login, a name to resolve, EOF, a timeout, a failed connect) is given back:
the client's socket goes to Python with every byte read and every byte sent, and Python's own
exchange replays them and carries on (zep.nativepath).
"""

import asyncio
import atexit
import errno as _errno
import os
import socket
import threading
import time

from libc.errno cimport EAGAIN, EINPROGRESS, EINTR, EINVAL, ENOMEM, errno
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from posix cimport unistd
from posix.fcntl cimport F_GETFL, F_SETFL, O_CLOEXEC, O_NONBLOCK, fcntl
from posix.signal cimport SIG_SETMASK, sigfillset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport sigset_t

from zep.includes cimport system as c

from zep.relay_result import RelayCancelled, RelayEnd, RelayResult, RelayUnavailable

__all__ = ["relay", "start_pair", "start_socks", "Verdicts", "start", "ready", "stop", "stats"]


# -- engine data (plain C) ---------------------------------------------------------

cdef enum:
    CLIENT = 0
    UPSTREAM = 1
    MAX_EVENTS = 512
    COPY_BUF = 65536      # buffer of a direction where splice is refused
    SMALL_BUF = 16384     # buffer of a direction that copies small reads
    SMALL_READ = 4096     # a splice read below this counts as small
    SMALL_RUN = 8         # this many small splice reads in a row: back to copying

cdef enum Mode:
    SMALL                 # recv/send on SMALL_BUF while reads are small
    SMALL_TO_SPLICE       # a read filled SMALL_BUF: splice once the buffer is out
    SPLICE                # socket -> pipe -> socket
    COPY                  # splice refused (or no pipe to be had): recv/send on COPY_BUF for good

cdef enum Step:
    # what one read, write or splice call came to
    MOVED                 # moved bytes (a read of 0: EOF)
    BLOCKED               # EAGAIN
    RETRY                 # EINTR
    REFUSED               # EINVAL from splice: this fd does not splice
    FAILED                # any other error: the pair fails

cdef enum:
    RUNNING = 0
    END_DONE = 1
    END_IDLE = 2
    END_CLIENT_ERROR = 3
    END_UPSTREAM_ERROR = 4
    END_CANCELLED = 5
    END_GIVEN_BACK = 6    # a native SOCKS5 handshake went back to Python (Socks.reason says why)

cdef enum Phase:
    PH_RELAY = 0          # relaying (every pair of relay()/start_pair())
    PH_SOCKS              # start_socks(): reading the client's handshake
    PH_DECIDE             # the request is posted: Python routes it
    PH_CONNECT            # connecting to the address Python named

cdef enum:
    # Why a native handshake was given back (GiveBack in zep.nativepath has the same values).
    GB_PYTHON = 1         # off the common path, or Python asked: its exchange carries on
    GB_EOF = 2
    GB_ERROR = 3
    GB_TIMEOUT = 4        # the http-request timeout ran out
    GB_CONNECT_FAILED = 5
    GB_CONNECT_TIMEOUT = 6
    GB_CANCELLED = 7
    HS_MAX = 1024         # the longest handshake taken natively (greeting + login + request: < 800)

cdef int DEFAULT_PIPE_SIZE = 1 << 20
cdef int DEFAULT_POOL_CAP = 256


cdef struct Pipe:
    int r
    int w
    size_t cap            # what F_SETPIPE_SZ granted (or the kernel's default)


cdef struct Dir:
    # One direction, src side -> dst side (direction k reads side k).
    Mode mode
    int small_run         # SPLICE: small reads in a row
    Pipe pipe             # r < 0: none held
    size_t in_pipe        # bytes sitting in the pipe
    char *buf             # copy buffer (only while it holds data)
    size_t buf_len
    size_t buf_off
    char *early           # early bytes, written before anything else
    size_t early_len
    size_t early_off
    uint64_t bytes        # bytes written to the dst side
    bint eof              # src said EOF
    bint shut             # EOF passed on: shutdown(dst, SHUT_WR) done


cdef struct Socks:
    # A native SOCKS5 handshake (PH_SOCKS .. PH_CONNECT); freed once the pair relays.
    unsigned char buf[HS_MAX]   # every byte read from the client
    size_t len
    size_t pos            # where the next step's bytes start
    int step              # STEP_GREETING, STEP_LOGIN, STEP_REQUEST
    unsigned char sent[4] # every byte sent to the client
    int sent_len
    bint login            # user/password required (else no authentication)
    unsigned char user[255]
    int user_len
    unsigned char password[255]
    int password_len
    int64_t timeout_ms    # http-request
    int64_t connect_ms    # connect
    # the request
    int atyp
    unsigned char addr[16]
    int port
    size_t request_end    # bytes after it are early data for the upstream
    # the dial Python asked for
    int family
    unsigned char dial_addr[16]
    int dial_port
    uint32_t scope_id
    int64_t dial_started_ns
    # given back
    int reason
    int err
    int client_fd


cdef enum:
    STEP_GREETING = 0
    STEP_LOGIN = 1
    STEP_REQUEST = 2
    VERDICTS = 512        # destinations remembered as routed direct (a power of two)


cdef struct Verdict:
    # A destination Python routed direct: the engine connects to it again without asking. The
    # answer depends on the destination and the router alone (one table per router: Verdicts).
    int atyp              # 0: an empty slot
    int port
    unsigned char addr[16]


cdef struct Pair:
    int fd[2]
    bint rd[2]            # edge-triggered readiness, cleared on EAGAIN
    bint rdhup[2]         # the peer's FIN was reported: read to EOF
    bint stream[2]        # SOCK_STREAM: a short read means the queue was empty
    bint wr[2]
    Dir d[2]              # d[0]: client -> upstream, d[1]: upstream -> client
    int64_t idle_ms       # < 0: no idle timeout
    int64_t last_ms
    int ended             # RUNNING or END_*
    int err               # errno when ended by an error
    Phase phase
    Socks *hs             # the native handshake (NULL for other pairs, and once relaying)
    int64_t deadline_ms   # PH_SOCKS / PH_CONNECT: when it times out
    int64_t dial_ns       # how long the native connect took
    Verdict *verdicts     # the caller's (Verdicts), engine thread only; NULL: remember nothing
    bint remembered       # connected on a remembered verdict: Python learns the target at the end
    int target_atyp       # the request's destination, kept for the end
    int target_port
    unsigned char target[16]
    # shared with the Python side, under the engine mutex
    int refs
    bint posted           # on the completion queue (the engine is done with it)
    bint cancel_queued
    bint force_copy
    Pair *sq_next
    Pair *cq_next
    Pair *cancel_next
    Pair *rq_next         # on the request queue (to Python)
    Pair *dq_next         # on the decision queue (from Python)
    bint connect          # the decision: connect (else give back)
    bint remember         # ... and connect to this destination again without asking
    # engine thread only
    Pair *act_prev
    Pair *act_next
    Pair *fin_next
    Pair *kill_next


cdef struct Stats:
    uint64_t submitted
    uint64_t completed
    uint64_t active
    uint64_t pipes_in_use
    uint64_t pipes_pooled
    uint64_t pipes_created
    uint64_t splice_bytes
    uint64_t copy_bytes
    uint64_t copy_directions
    uint64_t pipe_bytes_max
    uint64_t wakeups
    uint64_t to_splice
    uint64_t to_copy
    uint64_t socks_native     # handshakes taken natively
    uint64_t socks_relayed    # ... that became tunnels without Python's exchange
    uint64_t socks_given_back
    uint64_t socks_remembered # ... dialed without asking Python (a remembered destination)


cdef struct Engine:
    int epfd
    int sq_efd            # wakes the engine: new pairs, cancels, stats requests, stop
    int cq_efd            # wakes asyncio: finished pairs
    bint mu_made
    bint cond_made
    c.pthread_mutex_t mu
    c.pthread_cond_t published_cond
    c.pthread_t thread
    # under mu
    Pair *sq_head
    Pair *sq_tail
    Pair *cancel_head
    Pair *cq_head
    Pair *cq_tail
    Pair *rq_head         # native requests for Python to route
    Pair *rq_tail
    Pair *dq_head         # Python's decisions on them
    bint stop
    bint exited           # the thread is gone: `published` is final
    uint64_t stats_asked  # stats requests made ...
    uint64_t stats_given  # ... and answered with `published`
    Stats published
    # engine thread only (and whoever holds the engine once the thread has been joined)
    Pair *active
    Pair *fin_head
    int64_t now_ms
    int64_t next_scan_ms  # < 0: no idle deadline pending
    Pipe *pool
    int pool_n
    int pool_cap
    size_t pipe_size      # granted to the first pipe; every later pipe asks for it
    Stats st


# -- engine thread ------------------------------------------------------------------

cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t to_ms(double seconds) noexcept nogil:
    return max(0, <int64_t>(seconds * 1000.0 + 0.5))


cdef void pair_free(Pair *p) noexcept nogil:
    free(p.hs)
    free(p)


cdef inline Step io_step(ssize_t n, bint splicing, int *err) noexcept nogil:
    """Classify a read/write/splice result (the errno ladder every pump shares)."""
    if n >= 0:
        return MOVED
    err[0] = errno
    if err[0] == EAGAIN:
        return BLOCKED
    if err[0] == EINTR:
        return RETRY
    if err[0] == EINVAL and splicing:
        return REFUSED
    return FAILED


cdef void reset_close(int fd) noexcept nogil:
    """Close with a reset (SO_LINGER on, 0 s), not a FIN."""
    cdef c.linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    c.setsockopt(fd, c.SOL_SOCKET, c.SO_LINGER, &lg, sizeof(lg))
    unistd.close(fd)


cdef bint pipe_new(Engine *e, Pipe *pipe) noexcept nogil:
    """A new pipe of the engine's size, or what the kernel grants (F_SETPIPE_SZ is refused
    above /proc/sys/fs/pipe-max-size for unprivileged users, and rounds up to whole pages)."""
    cdef int fds[2]
    cdef int granted
    if c.pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return False
    granted = fcntl(fds[1], c.F_SETPIPE_SZ, <int>e.pipe_size)
    if granted < 0:
        granted = fcntl(fds[1], c.F_GETPIPE_SZ)
    if granted <= 0:
        unistd.close(fds[0])
        unistd.close(fds[1])
        return False
    pipe.r = fds[0]
    pipe.w = fds[1]
    pipe.cap = <size_t>granted
    e.st.pipes_created += 1
    return True


cdef bint pipe_get(Engine *e, Dir *d) noexcept nogil:
    if e.pool_n > 0:
        e.pool_n -= 1
        d.pipe = e.pool[e.pool_n]
    elif not pipe_new(e, &d.pipe):
        return False
    e.st.pipes_in_use += 1
    return True


cdef void pipe_put(Engine *e, Dir *d) noexcept nogil:
    if d.pipe.r < 0:
        return
    if d.in_pipe == 0 and e.pool_n < e.pool_cap:
        e.pool[e.pool_n] = d.pipe
        e.pool_n += 1
    else:
        # Never pool a pipe that still holds bytes.
        unistd.close(d.pipe.r)
        unistd.close(d.pipe.w)
    d.pipe.r = d.pipe.w = -1
    d.in_pipe = 0
    e.st.pipes_in_use -= 1


cdef void teardown(Engine *e, Pair *p) noexcept nogil:
    """Close both fds (exactly once), release pipes and buffers, queue for posting.

    Unless both directions finished, both sockets are reset rather than closed with a FIN:
    a peer reading to EOF must not take a cut transfer for a complete one."""
    cdef int k
    cdef c.epoll_event ev
    for k in range(2):
        if p.fd[k] >= 0:
            c.epoll_ctl(e.epfd, c.EPOLL_CTL_DEL, p.fd[k], &ev)
            if p.ended == END_DONE:
                unistd.close(p.fd[k])
            else:
                reset_close(p.fd[k])
            p.fd[k] = -1
        pipe_put(e, &p.d[k])
        free(p.d[k].buf)
        p.d[k].buf = NULL
        free(p.d[k].early)
        p.d[k].early = NULL
    # off the active list, onto the list posted at the end of this iteration
    if p.act_prev != NULL:
        p.act_prev.act_next = p.act_next
    else:
        e.active = p.act_next
    if p.act_next != NULL:
        p.act_next.act_prev = p.act_prev
    p.act_prev = p.act_next = NULL
    p.fin_next = e.fin_head
    e.fin_head = p
    e.st.active -= 1


cdef inline void finish(Engine *e, Pair *p, int how) noexcept nogil:
    if p.ended != RUNNING:
        return
    p.ended = how
    teardown(e, p)


cdef inline int fail(Engine *e, Pair *p, int side, int err) noexcept nogil:
    if p.ended == RUNNING:
        p.ended = END_CLIENT_ERROR if side == CLIENT else END_UPSTREAM_ERROR
        p.err = err
        teardown(e, p)
    return -1


cdef inline int to_copy_mode(Engine *e, Dir *d) noexcept nogil:
    d.mode = COPY
    e.st.copy_directions += 1
    return 1


cdef inline int wrote(Engine *e, Pair *p, int k, ssize_t n, bint splicing) noexcept nogil:
    """Account for a write of direction k to its dst side: 1 progress, 0 blocked, -1 failed."""
    cdef int err = 0
    cdef Step step = io_step(n, splicing, &err)
    if step == MOVED:
        p.d[k].bytes += n
        p.last_ms = e.now_ms
        return 1
    if step == BLOCKED:
        p.wr[1 - k] = False
        return 0
    if step == RETRY:
        return 1
    if step == REFUSED:
        return to_copy_mode(e, &p.d[k])   # the pipe's bytes go out through the buffer
    return fail(e, p, 1 - k, err)


cdef int pump_splice(Engine *e, Pair *p, int k) noexcept nogil:
    """Move what can move for direction k in SPLICE mode.
    Returns 1 on progress, 0 when blocked, -1 when the pair failed."""
    cdef Dir *d = &p.d[k]
    cdef ssize_t n
    cdef int progress = 0
    cdef int err = 0
    cdef Step step
    cdef bint was_empty
    # pipe -> dst
    if d.in_pipe > 0 and p.wr[1 - k]:
        n = c.splice(d.pipe.r, NULL, p.fd[1 - k], NULL, d.in_pipe, c.SPLICE_F_MOVE | c.SPLICE_F_NONBLOCK)
        progress = wrote(e, p, k, n, True)
        if progress < 0 or d.mode != SPLICE:
            return progress
        if n > 0:
            d.in_pipe -= n
            e.st.splice_bytes += n
    # src -> pipe, only while the pipe has room (backpressure)
    if not d.eof and p.rd[k] and (d.pipe.r < 0 or d.in_pipe < d.pipe.cap):
        was_empty = d.in_pipe == 0
        if d.pipe.r < 0 and not pipe_get(e, d):
            return to_copy_mode(e, d)   # out of pipes or fds: this direction copies
        n = c.splice(p.fd[k], NULL, d.pipe.w, NULL, d.pipe.cap - d.in_pipe, c.SPLICE_F_MOVE | c.SPLICE_F_NONBLOCK)
        step = io_step(n, True, &err)
        if step == MOVED and n > 0:
            if was_empty and n < SMALL_READ and p.stream[k]:
                d.small_run += 1
            else:
                d.small_run = 0
            d.in_pipe += n
            if d.in_pipe > e.st.pipe_bytes_max:
                e.st.pipe_bytes_max = d.in_pipe
            p.last_ms = e.now_ms
            progress = 1
        elif step == MOVED:
            d.eof = True
            progress = 1
        elif step == BLOCKED:
            # With bytes in the pipe this may mean "pipe full": keep the flag and retry once the
            # pipe drained.
            if d.in_pipe == 0:
                p.rd[k] = False
        elif step == REFUSED:
            progress = to_copy_mode(e, d)
        elif step == FAILED:
            return fail(e, p, k, err)
    if d.in_pipe == 0:
        pipe_put(e, d)
    if d.mode == SPLICE and d.small_run >= SMALL_RUN and d.in_pipe == 0:
        # A run of small reads: recv/send costs fewer calls than two splices.
        d.small_run = 0
        d.mode = SMALL
        e.st.to_copy += 1
        progress = 1
    return progress


cdef int pump_copy(Engine *e, Pair *p, int k) noexcept nogil:
    """Direction k with recv/send on a buffer: COPY_BUF for good where splice is refused, or
    SMALL_BUF while reads are small."""
    cdef Dir *d = &p.d[k]
    cdef ssize_t n
    cdef size_t size = COPY_BUF if d.mode == COPY else SMALL_BUF
    cdef int progress = 0
    cdef int err = 0
    cdef Step step
    if d.buf_off < d.buf_len and p.wr[1 - k]:
        n = c.send(p.fd[1 - k], d.buf + d.buf_off, d.buf_len - d.buf_off, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
        progress = wrote(e, p, k, n, False)
        if progress < 0:
            return progress
        if n > 0:
            d.buf_off += n
            e.st.copy_bytes += n
    if d.buf_off < d.buf_len:
        return progress
    d.buf_off = d.buf_len = 0
    if d.mode == SMALL_TO_SPLICE:
        # Reads fill the small buffer: bulk transfer, splice from now on.
        d.mode = SPLICE
        d.small_run = 0
        e.st.to_splice += 1
        free(d.buf)
        d.buf = NULL
        return 1
    if d.in_pipe > 0 or (not d.eof and p.rd[k]):
        if d.buf == NULL:
            d.buf = <char *>malloc(size)
            if d.buf == NULL:
                return fail(e, p, k, ENOMEM)
    if d.in_pipe > 0:
        # left in the pipe when splice was refused: read it out first
        n = unistd.read(d.pipe.r, d.buf, size)
        if n > 0:
            d.buf_len = n
            d.in_pipe -= n
            progress = 1
        if d.in_pipe == 0:
            pipe_put(e, d)
    elif not d.eof and p.rd[k]:
        n = c.recv(p.fd[k], d.buf, size, c.MSG_DONTWAIT)
        step = io_step(n, False, &err)
        if step == MOVED and n > 0:
            d.buf_len = n
            p.last_ms = e.now_ms
            progress = 1
            if <size_t>n < size:
                # A short read from a byte stream emptied its receive queue; with EPOLLET the
                # next arrival raises a new edge, so skip the read that would only say EAGAIN.
                # Not after a FIN was reported (no further edge comes): read to EOF.
                if p.stream[k] and not p.rdhup[k]:
                    p.rd[k] = False
            elif d.mode == SMALL:
                d.mode = SMALL_TO_SPLICE
        elif step == MOVED:
            d.eof = True
            progress = 1
        elif step == BLOCKED:
            p.rd[k] = False
        elif step == FAILED:
            return fail(e, p, k, err)
    if d.buf_len == 0 and d.buf != NULL and (d.eof or not p.rd[k]):
        free(d.buf)              # idle: hold no buffer
        d.buf = NULL
    return progress


cdef int pump_early(Engine *e, Pair *p, int k) noexcept nogil:
    """Early bytes of direction k first, with a plain send."""
    cdef Dir *d = &p.d[k]
    cdef ssize_t n
    cdef int r
    if not p.wr[1 - k]:
        return 0
    n = c.send(p.fd[1 - k], d.early + d.early_off, d.early_len - d.early_off, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
    r = wrote(e, p, k, n, False)
    if n > 0:
        d.early_off += n
        if d.early_off == d.early_len:
            free(d.early)
            d.early = NULL
            d.early_off = d.early_len = 0
    return r


cdef int pump_dir(Engine *e, Pair *p, int k) noexcept nogil:
    cdef Dir *d = &p.d[k]
    cdef int r
    if d.shut:
        return 0
    if d.early_off < d.early_len:
        return pump_early(e, p, k)
    if d.mode == SPLICE:
        r = pump_splice(e, p, k)
    else:
        r = pump_copy(e, p, k)
    if r < 0:
        return r
    if d.eof and d.in_pipe == 0 and d.buf_off == d.buf_len:
        # Everything from src is out: pass the EOF on.
        c.shutdown(p.fd[1 - k], c.SHUT_WR)
        d.shut = True
        r = 1
    return r


cdef void pump(Engine *e, Pair *p) noexcept nogil:
    cdef int progress = 1
    cdef int r
    cdef int k
    while progress and p.ended == RUNNING:
        progress = 0
        for k in range(2):
            r = pump_dir(e, p, k)
            if r < 0:
                return
            progress |= r
    if p.ended == RUNNING and p.d[0].shut and p.d[1].shut:
        finish(e, p, END_DONE)


cdef void on_event(Engine *e, Pair *p, int side, unsigned int events) noexcept nogil:
    cdef int err = 0
    cdef c.socklen_t len = sizeof(err)
    if p.ended != RUNNING:
        return            # finished earlier in this batch
    if p.phase != PH_RELAY:
        on_handshake_event(e, p, side, events)
        return
    if events & c.EPOLLERR:
        if c.getsockopt(p.fd[side], c.SOL_SOCKET, c.SO_ERROR, &err, &len) == 0 and err != 0:
            fail(e, p, side, err)
            return
    note_readiness(p, side, events)
    pump(e, p)


cdef inline void note_readiness(Pair *p, int side, unsigned int events) noexcept nogil:
    if events & (c.EPOLLIN | c.EPOLLRDHUP | c.EPOLLHUP | c.EPOLLERR):
        p.rd[side] = True
    if events & (c.EPOLLRDHUP | c.EPOLLHUP | c.EPOLLERR):
        p.rdhup[side] = True
    if events & (c.EPOLLOUT | c.EPOLLHUP | c.EPOLLERR):
        p.wr[side] = True


cdef void activate(Engine *e, Pair *p) noexcept nogil:
    """Onto the list of pairs the engine runs (idle scans, stop)."""
    p.act_prev = NULL
    p.act_next = e.active
    if e.active != NULL:
        e.active.act_prev = p
    e.active = p
    e.st.active += 1


cdef void start_modes(Engine *e, Pair *p) noexcept nogil:
    cdef int k
    for k in range(2):
        if p.force_copy:
            to_copy_mode(e, &p.d[k])
        elif p.stream[k]:
            # Start by copying: most tunnels carry small messages first; a read that fills the
            # small buffer switches to splice.
            p.d[k].mode = SMALL
        else:
            p.d[k].mode = SPLICE


cdef void begin_pair(Engine *e, Pair *p) noexcept nogil:
    cdef c.epoll_event ev
    cdef int k
    activate(e, p)
    p.last_ms = e.now_ms
    if p.idle_ms >= 0:
        schedule(e, p.last_ms + p.idle_ms)
    start_modes(e, p)
    for k in range(2):
        ev.events = c.EPOLLIN | c.EPOLLOUT | c.EPOLLRDHUP | c.EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>p | <uint64_t>k
        if c.epoll_ctl(e.epfd, c.EPOLL_CTL_ADD, p.fd[k], &ev) < 0:
            fail(e, p, k, errno)
            return
    # edge-triggered ADD reports current readiness on the next wait


cdef inline void schedule(Engine *e, int64_t due) noexcept nogil:
    if e.next_scan_ms < 0 or due < e.next_scan_ms:
        e.next_scan_ms = due


cdef void scan_idle(Engine *e) noexcept nogil:
    """Idle tunnels end; handshakes and connects past their deadline are given back."""
    cdef Pair *p = e.active
    cdef Pair *nxt
    cdef int64_t due
    cdef int64_t next_scan = -1
    while p != NULL:
        nxt = p.act_next
        due = -1
        if p.phase == PH_RELAY:
            if p.idle_ms >= 0:
                due = p.last_ms + p.idle_ms
        elif p.phase != PH_DECIDE:
            due = p.deadline_ms
        if due >= 0:
            if due > e.now_ms:
                if next_scan < 0 or due < next_scan:
                    next_scan = due
            elif p.phase == PH_RELAY:
                finish(e, p, END_IDLE)
            elif p.phase == PH_SOCKS:
                give_back(e, p, GB_TIMEOUT, 0)
            else:
                give_back(e, p, GB_CONNECT_TIMEOUT, 0)
        p = nxt
    e.next_scan_ms = next_scan


# -- native SOCKS5 (start_socks) ----------------------------------------------------------

cdef void give_back(Engine *e, Pair *p, int reason, int err) noexcept nogil:
    """End the pair here, keeping the client's socket open for Python (see Socks.client_fd)."""
    cdef c.epoll_event ev
    if p.ended != RUNNING:
        return
    c.epoll_ctl(e.epfd, c.EPOLL_CTL_DEL, p.fd[CLIENT], &ev)
    p.hs.client_fd = p.fd[CLIENT]
    p.fd[CLIENT] = -1
    if p.hs.dial_started_ns:
        p.dial_ns = now_ns() - p.hs.dial_started_ns   # a failed dial's time counts too
    p.hs.reason = reason
    p.hs.err = err
    p.ended = END_GIVEN_BACK
    e.st.socks_given_back += 1
    teardown(e, p)        # closes an upstream socket that never carried a byte


cdef void begin_socks(Engine *e, Pair *p) noexcept nogil:
    cdef c.epoll_event ev
    cdef int one = 1
    cdef int flags = fcntl(p.fd[CLIENT], F_GETFL)
    if flags >= 0 and not flags & O_NONBLOCK:
        fcntl(p.fd[CLIENT], F_SETFL, flags | O_NONBLOCK)
    c.setsockopt(p.fd[CLIENT], c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))  # not a TCP socket: no matter
    activate(e, p)
    e.st.socks_native += 1
    p.deadline_ms = e.now_ms + p.hs.timeout_ms
    schedule(e, p.deadline_ms)
    ev.events = c.EPOLLIN | c.EPOLLOUT | c.EPOLLRDHUP | c.EPOLLET   # what the relay wants later too
    ev.data.u64 = <uint64_t><uintptr_t>p | <uint64_t>CLIENT
    if c.epoll_ctl(e.epfd, c.EPOLL_CTL_ADD, p.fd[CLIENT], &ev) < 0:
        give_back(e, p, GB_PYTHON, 0)


cdef void on_handshake_event(Engine *e, Pair *p, int side, unsigned int events) noexcept nogil:
    """Readiness is recorded in every phase (the relay starts from it); the client is read only
    while its handshake is, the upstream looked at only while it connects."""
    note_readiness(p, side, events)
    if p.phase == PH_SOCKS and side == CLIENT:
        socks_read(e, p)
    elif p.phase == PH_CONNECT and side == UPSTREAM and events & (c.EPOLLOUT | c.EPOLLHUP | c.EPOLLERR):
        connect_done(e, p)


cdef void socks_read(Engine *e, Pair *p) noexcept nogil:
    """Read what the client sent, then take the handshake as far as it goes. The bytes are all
    parsed before an EOF or an error counts, as Python's exchange does."""
    cdef Socks *s = p.hs
    cdef ssize_t n
    cdef int err = 0
    cdef bint eof = False
    while p.rd[CLIENT] and s.len < HS_MAX:
        n = c.recv(p.fd[CLIENT], s.buf + s.len, HS_MAX - s.len, c.MSG_DONTWAIT)
        if n > 0:
            s.len += n
            if s.len < HS_MAX and not p.rdhup[CLIENT]:
                p.rd[CLIENT] = False    # a short read emptied the queue: the next byte is an edge
        elif n == 0:
            eof = True
            break
        elif errno == EAGAIN:
            p.rd[CLIENT] = False
        elif errno != EINTR:
            err = errno
            break
    socks_parse(e, p)
    if p.ended != RUNNING or p.phase != PH_SOCKS:
        return
    if err:
        give_back(e, p, GB_ERROR, err)
    elif eof:
        give_back(e, p, GB_EOF, 0)
    elif s.len == HS_MAX:
        give_back(e, p, GB_PYTHON, 0)


cdef bint same_bytes(const unsigned char *a, int a_len, const unsigned char *b, int b_len) noexcept nogil:
    """Equal, in a time that depends on the lengths only."""
    cdef unsigned char diff = 0
    cdef int i
    if a_len != b_len:
        return False
    for i in range(a_len):
        diff |= a[i] ^ b[i]
    return diff == 0


cdef bint socks_send(Engine *e, Pair *p, const unsigned char *data, int n) noexcept nogil:
    """Send an answer of the handshake; anything but all of it at once gives the pair back
    (Python's exchange, replayed, sends what is missing or meets the error itself)."""
    cdef ssize_t sent = c.send(p.fd[CLIENT], data, n, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
    if sent > 0:
        memcpy(p.hs.sent + p.hs.sent_len, data, sent)
        p.hs.sent_len += <int>sent
    if sent == n:
        return True
    give_back(e, p, GB_PYTHON, 0)
    return False


cdef void socks_parse(Engine *e, Pair *p) noexcept nogil:
    """The common path of RFC 1928/1929, as zep.socks5 takes it: greeting, login, CONNECT to an
    IP literal. Any other byte goes back to Python before anything is said about it."""
    cdef Socks *s = p.hs
    cdef const unsigned char *b
    cdef size_t avail, end, alen
    cdef unsigned char answer[2]
    cdef unsigned char wanted
    cdef int i, ulen, plen
    cdef bint offered
    while True:
        b = s.buf + s.pos
        avail = s.len - s.pos
        if s.step == STEP_GREETING:
            if avail < 2 or avail < 2 + <size_t>b[1]:
                if avail >= 1 and b[0] != 5:
                    give_back(e, p, GB_PYTHON, 0)
                return
            if b[0] != 5:
                give_back(e, p, GB_PYTHON, 0)
                return
            wanted = 2 if s.login else 0
            offered = False
            for i in range(b[1]):
                if b[2 + i] == wanted:
                    offered = True
            if not offered:
                give_back(e, p, GB_PYTHON, 0)
                return
            s.pos += 2 + b[1]
            answer[0] = 5
            answer[1] = wanted
            if not socks_send(e, p, answer, 2):
                return
            s.step = STEP_LOGIN if s.login else STEP_REQUEST
        elif s.step == STEP_LOGIN:
            if avail >= 1 and b[0] != 1:
                give_back(e, p, GB_PYTHON, 0)
                return
            if avail < 2:
                return
            ulen = b[1]
            if avail < <size_t>(3 + ulen):
                return
            plen = b[2 + ulen]
            end = 3 + ulen + plen
            if avail < end:
                return
            # both fields compared every time, as zep.auth does
            if not (same_bytes(b + 2, ulen, s.user, s.user_len)
                    & same_bytes(b + 3 + ulen, plen, s.password, s.password_len)):
                give_back(e, p, GB_PYTHON, 0)   # the throttle and the log are Python's
                return
            s.pos += end
            answer[0] = 1
            answer[1] = 0
            if not socks_send(e, p, answer, 2):
                return
            s.step = STEP_REQUEST
        else:
            if avail < 4:
                return
            if b[0] != 5 or b[1] != 1 or (b[3] != 1 and b[3] != 4):
                give_back(e, p, GB_PYTHON, 0)   # not CONNECT, or a name: Python's
                return
            alen = 4 if b[3] == 1 else 16
            if avail < 6 + alen:
                return
            s.atyp = b[3]
            memcpy(s.addr, b + 4, alen)
            s.port = (<int>b[4 + alen] << 8) | b[5 + alen]
            if s.port == 0:
                give_back(e, p, GB_PYTHON, 0)
                return
            s.request_end = s.pos + 6 + alen
            p.phase = PH_DECIDE
            if p.verdicts != NULL and remembered(p.verdicts, s):
                p.remembered = True
                e.st.socks_remembered += 1
                socks_connect(e, p)
            else:
                post_request(e, p)
            return


cdef Verdict *verdict_slot(Verdict *table, int atyp, const unsigned char *addr, int port) noexcept nogil:
    cdef uint32_t h = 2166136261u   # FNV-1a over the address and the port
    cdef int i
    for i in range(4 if atyp == 1 else 16):
        h = (h ^ addr[i]) * 16777619u
    h = (h ^ <uint32_t>port) * 16777619u
    return &table[h & (VERDICTS - 1)]


cdef bint remembered(Verdict *table, Socks *s) noexcept nogil:
    """A destination Python routed direct before: dial it as then (same family and address)."""
    cdef Verdict *v = verdict_slot(table, s.atyp, s.addr, s.port)
    cdef int alen = 4 if s.atyp == 1 else 16
    if v.atyp != s.atyp or v.port != s.port or not same_bytes(v.addr, alen, s.addr, alen):
        return False
    s.family = c.AF_INET if s.atyp == 1 else c.AF_INET6
    memcpy(s.dial_addr, s.addr, alen)
    s.dial_port = s.port
    s.scope_id = 0
    return True


cdef void remember(Verdict *table, Socks *s) noexcept nogil:
    cdef Verdict *v = verdict_slot(table, s.atyp, s.addr, s.port)
    v.atyp = s.atyp
    v.port = s.port
    memcpy(v.addr, s.addr, 16)


cdef void post_request(Engine *e, Pair *p) noexcept nogil:
    cdef uint64_t one = 1
    cdef bint wake
    c.pthread_mutex_lock(&e.mu)
    # one pending wake-up serves both queues (_drain reads the eventfd, then takes both)
    wake = e.cq_head == NULL and e.rq_head == NULL
    p.rq_next = NULL
    if e.rq_tail != NULL:
        e.rq_tail.rq_next = p
    else:
        e.rq_head = p
    e.rq_tail = p
    c.pthread_mutex_unlock(&e.mu)
    if wake:
        unistd.write(e.cq_efd, &one, 8)


cdef void socks_connect(Engine *e, Pair *p) noexcept nogil:
    """Connect to the address Python named (a non-blocking connect, watched once it is under way)."""
    cdef Socks *s = p.hs
    cdef c.sockaddr_in sin
    cdef c.sockaddr_in6 sin6
    cdef c.sockaddr *sa
    cdef c.socklen_t salen
    cdef c.epoll_event ev
    cdef int fd
    cdef bint at_once
    if s.family == c.AF_INET:
        memset(&sin, 0, sizeof(sin))
        sin.sin_family = c.AF_INET
        sin.sin_port = c.htons(<uint16_t>s.dial_port)
        memcpy(&sin.sin_addr, s.dial_addr, 4)
        sa, salen = <c.sockaddr *>&sin, sizeof(sin)
    else:
        memset(&sin6, 0, sizeof(sin6))
        sin6.sin6_family = c.AF_INET6
        sin6.sin6_port = c.htons(<uint16_t>s.dial_port)
        memcpy(&sin6.sin6_addr, s.dial_addr, 16)
        sin6.sin6_scope_id = s.scope_id
        sa, salen = <c.sockaddr *>&sin6, sizeof(sin6)
    p.target_atyp = s.atyp
    p.target_port = s.port
    memcpy(p.target, s.addr, 16)
    s.dial_started_ns = now_ns()
    fd = c.socket(s.family, c.SOCK_STREAM | c.SOCK_NONBLOCK | c.SOCK_CLOEXEC, 0)
    if fd < 0:
        give_back(e, p, GB_CONNECT_FAILED, errno)
        return
    p.fd[UPSTREAM] = fd
    p.stream[UPSTREAM] = True
    p.phase = PH_CONNECT
    if c.connect(fd, sa, salen) == 0:
        at_once = True
    elif errno == EINPROGRESS:
        at_once = False
    else:
        give_back(e, p, GB_CONNECT_FAILED, errno)
        return
    # Watched only now: a socket not yet connecting polls as hung up.
    ev.events = c.EPOLLIN | c.EPOLLOUT | c.EPOLLRDHUP | c.EPOLLET
    ev.data.u64 = <uint64_t><uintptr_t>p | <uint64_t>UPSTREAM
    if c.epoll_ctl(e.epfd, c.EPOLL_CTL_ADD, fd, &ev) < 0:
        give_back(e, p, GB_CONNECT_FAILED, errno)
    elif at_once:
        connected(e, p)
    else:
        p.deadline_ms = e.now_ms + s.connect_ms
        schedule(e, p.deadline_ms)


cdef void connect_done(Engine *e, Pair *p) noexcept nogil:
    cdef int err = 0
    cdef c.socklen_t len = sizeof(err)
    if c.getsockopt(p.fd[UPSTREAM], c.SOL_SOCKET, c.SO_ERROR, &err, &len) < 0:
        err = errno
    if err:
        give_back(e, p, GB_CONNECT_FAILED, err)
        return
    connected(e, p)


cdef void connected(Engine *e, Pair *p) noexcept nogil:
    """Reply as zep.socks5.connect_reply(SUCCEEDED, upstream.getsockname()) does, then relay."""
    cdef Socks *s = p.hs
    cdef c.sockaddr_storage bound
    cdef c.socklen_t blen = sizeof(bound)
    cdef unsigned char reply[22]
    cdef int n
    cdef ssize_t sent
    p.dial_ns = now_ns() - s.dial_started_ns
    memset(reply, 0, sizeof(reply))
    reply[0] = 5
    reply[3] = 1
    n = 10                # 0.0.0.0:0 when the bound address cannot be had
    if c.getsockname(p.fd[UPSTREAM], <c.sockaddr *>&bound, &blen) == 0:
        if bound.ss_family == c.AF_INET:
            memcpy(reply + 4, &(<c.sockaddr_in *>&bound).sin_addr, 4)
            memcpy(reply + 8, &(<c.sockaddr_in *>&bound).sin_port, 2)
        elif bound.ss_family == c.AF_INET6:
            reply[3] = 4
            memcpy(reply + 4, &(<c.sockaddr_in6 *>&bound).sin6_addr, 16)
            memcpy(reply + 20, &(<c.sockaddr_in6 *>&bound).sin6_port, 2)
            n = 22
    sent = c.send(p.fd[CLIENT], reply, n, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
    if sent != n:
        # A client that cannot take ten bytes at once has gone (or never reads): as a tunnel
        # whose client failed at once.
        fail(e, p, CLIENT, errno if sent < 0 else EAGAIN)
        return
    if s.len > s.request_end:
        # pipelined after the request: the upstream gets it first
        p.d[CLIENT].early_len = s.len - s.request_end
        p.d[CLIENT].early = <char *>malloc(p.d[CLIENT].early_len)
        if p.d[CLIENT].early == NULL:
            fail(e, p, CLIENT, ENOMEM)
            return
        memcpy(p.d[CLIENT].early, s.buf + s.request_end, p.d[CLIENT].early_len)
    free(p.hs)
    p.hs = NULL
    e.st.socks_relayed += 1
    p.phase = PH_RELAY
    p.last_ms = e.now_ms
    if p.idle_ms >= 0:
        schedule(e, p.last_ms + p.idle_ms)
    start_modes(e, p)
    pump(e, p)


cdef inline bint still_pending(Pair *p) noexcept nogil:
    """Under the mutex: give back the reference a queued cancel or decision held; whether the pair
    still needs it. A pair already posted is finished: nothing to do, and it may be freed the
    moment the mutex is released (here, if this was the last reference). A pair not yet posted
    stays alive: only the engine thread posts."""
    p.refs -= 1
    if p.refs == 0:
        pair_free(p)
        return False
    return not p.posted


cdef bint take_commands(Engine *e, uint64_t *stats_asked) noexcept nogil:
    """New pairs, cancels, stats requests and stop, from the Python side. Returns the stop flag."""
    cdef uint64_t junk
    cdef Pair *sq
    cdef Pair *p
    cdef Pair *nxt
    cdef Pair *kill = NULL
    cdef Pair *decided = NULL
    cdef Pair *dq
    cdef bint stop
    unistd.read(e.sq_efd, &junk, 8)
    c.pthread_mutex_lock(&e.mu)
    sq = e.sq_head
    e.sq_head = e.sq_tail = NULL
    dq = e.dq_head
    e.dq_head = NULL
    while dq != NULL:
        nxt = dq.dq_next
        if still_pending(dq):
            dq.dq_next = decided
            decided = dq
        dq = nxt
    p = e.cancel_head
    e.cancel_head = NULL
    stop = e.stop
    stats_asked[0] = e.stats_asked
    while p != NULL:
        nxt = p.cancel_next
        p.cancel_queued = False
        if still_pending(p):
            p.kill_next = kill
            kill = p
        p = nxt
    c.pthread_mutex_unlock(&e.mu)
    p = sq
    while p != NULL:
        nxt = p.sq_next
        if p.phase == PH_SOCKS:
            begin_socks(e, p)
        else:
            begin_pair(e, p)
        p = nxt
    while decided != NULL:
        p, decided = decided, decided.dq_next
        if p.ended == RUNNING and p.phase == PH_DECIDE:
            if p.connect:
                if p.remember and p.verdicts != NULL:
                    remember(p.verdicts, p.hs)
                socks_connect(e, p)
            else:
                give_back(e, p, GB_PYTHON, 0)
    while kill != NULL:
        if kill.phase == PH_RELAY:
            finish(e, kill, END_CANCELLED)
        else:
            give_back(e, kill, GB_CANCELLED, 0)   # Python's exchange logs what it had
        kill = kill.kill_next
    if stop:
        while e.active != NULL:
            finish(e, e.active, END_CANCELLED)
    return stop


cdef void post_finished(Engine *e) noexcept nogil:
    cdef Pair *p = e.fin_head
    cdef Pair *nxt
    cdef uint64_t one = 1
    cdef bint wake
    if p == NULL:
        return
    e.fin_head = NULL
    c.pthread_mutex_lock(&e.mu)
    # Wake asyncio only when the queues were empty: _drain reads the eventfd before it takes
    # them, so a non-empty queue has a wake-up pending.
    wake = e.cq_head == NULL and e.rq_head == NULL
    while p != NULL:
        nxt = p.fin_next
        p.posted = True
        p.refs -= 1           # the engine's reference; Python still holds one
        p.cq_next = NULL
        if e.cq_tail != NULL:
            e.cq_tail.cq_next = p
        else:
            e.cq_head = p
        e.cq_tail = p
        e.st.completed += 1
        p = nxt
    c.pthread_mutex_unlock(&e.mu)
    if wake:
        unistd.write(e.cq_efd, &one, 8)


cdef void publish_stats(Engine *e, uint64_t answered, bint exiting) noexcept nogil:
    """Hand a snapshot of the counters to stats() callers waiting for one."""
    c.pthread_mutex_lock(&e.mu)
    e.published = e.st
    e.published.pipes_pooled = e.pool_n
    e.stats_given = answered
    e.exited = exiting
    c.pthread_cond_broadcast(&e.published_cond)
    c.pthread_mutex_unlock(&e.mu)


cdef void *engine_main(void *arg) noexcept nogil:
    cdef Engine *e = <Engine *>arg
    cdef c.epoll_event events[MAX_EVENTS]
    cdef sigset_t all_signals
    cdef int n, i, timeout
    cdef uint64_t data
    cdef uint64_t stats_asked = 0
    cdef uint64_t stats_given = 0
    cdef bint commands
    cdef bint stop = False
    sigfillset(&all_signals)
    c.pthread_sigmask(SIG_SETMASK, &all_signals, NULL)   # signals are Python's
    while True:
        e.now_ms = now_ms()
        if e.next_scan_ms >= 0:
            timeout = <int>(e.next_scan_ms - e.now_ms)
            if timeout < 0:
                timeout = 0
        else:
            timeout = -1
        n = c.epoll_wait(e.epfd, events, MAX_EVENTS, timeout)
        e.now_ms = now_ms()
        e.st.wakeups += 1
        commands = False
        for i in range(n):
            data = events[i].data.u64
            if data == 0:
                commands = True
            else:
                on_event(e, <Pair *><uintptr_t>(data & ~(<uint64_t>1)), <int>(data & 1), events[i].events)
        if commands:
            stop = take_commands(e, &stats_asked)
        if e.next_scan_ms >= 0 and e.now_ms >= e.next_scan_ms:
            scan_idle(e)
        post_finished(e)
        if stop and e.active == NULL:
            # Pairs submitted after stop was set are refused by the Python side.
            break
        if stats_asked != stats_given:
            # after this iteration's events: everything done before the request was seen
            stats_given = stats_asked
            publish_stats(e, stats_given, False)
    publish_stats(e, stats_asked, True)
    return NULL


cdef void close_engine_fds(Engine *e) noexcept nogil:
    """Close every descriptor the engine holds (each once); safe on a half-made engine."""
    cdef int i
    for i in range(e.pool_n):
        unistd.close(e.pool[i].r)
        unistd.close(e.pool[i].w)
    e.pool_n = 0
    if e.epfd >= 0:
        unistd.close(e.epfd)
    if e.sq_efd >= 0:
        unistd.close(e.sq_efd)
    if e.cq_efd >= 0:
        unistd.close(e.cq_efd)
    e.epfd = e.sq_efd = e.cq_efd = -1


# -- Python side ----------------------------------------------------------------------

_END = {
    END_DONE: RelayEnd.DONE,
    END_IDLE: RelayEnd.IDLE_TIMEOUT,
    END_CLIENT_ERROR: RelayEnd.CLIENT_ERROR,
    END_UPSTREAM_ERROR: RelayEnd.UPSTREAM_ERROR,
    END_CANCELLED: RelayEnd.CANCELLED,
}

STOP_WAIT = 5.0  # seconds stop() waits for a loop in another thread to drop its reader

_splice_enabled = True


def _set_splice(enabled):
    """Test hook: when False, new pairs use the recv/send fallback in both directions."""
    global _splice_enabled
    _splice_enabled = bool(enabled)


cdef class _Waiter:
    cdef object loop
    cdef object fut
    cdef object result   # (up, down, ended, err) once the engine is done
    cdef uintptr_t ptr
    # start_pair(): called with the RelayResult instead of a future (see PairHandle)
    cdef object done
    cdef double t0
    cdef bint cancelled
    # start_socks(): the request to route, and the handshake given back
    cdef object request
    cdef object given_back
    cdef bint decided
    cdef double dial_seconds
    cdef object target
    cdef Verdicts verdicts   # kept alive while the engine may use its table


cdef class Verdicts:
    """The destinations one router sent direct, for start_socks(): the engine dials them again
    without asking. Its table lives as long as this object, which every pair using it keeps."""
    cdef Verdict *table

    def __cinit__(self):
        self.table = <Verdict *>calloc(VERDICTS, sizeof(Verdict))
        if self.table == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.table)


cdef class PairHandle:
    """A pair started with start_pair() or start_socks(): cancel() ends it; `done` still gets
    the counts (or `given_back` the client, for a handshake not yet relaying)."""
    cdef _Waiter w
    cdef _Engine eng

    def cancel(self):
        w = self.w
        if w.result is None and not w.cancelled:
            w.cancelled = True
            self.eng.cancel(w.ptr)

    def connect(self, int family, bytes address, int port, int scope_id=0, *, remember=False):
        """start_socks(): the answer to `request`: connect to this address (4 or 16 packed
        bytes), then reply and relay. `remember`: later requests for the same destination are
        dialed the same way without asking (`request` is not called for them)."""
        if family not in (socket.AF_INET, socket.AF_INET6) or len(address) != (4 if family == socket.AF_INET else 16):
            raise ValueError(f"not an address of family {family}: {address!r}")
        self._decide(True, family, address, port, scope_id, remember)

    def give_back(self):
        """start_socks(): the other answer to `request`: the client goes back to Python."""
        self._decide(False, 0, b"", 0, 0, False)

    cdef _decide(self, bint connect, int family, bytes address, int port, int scope_id, bint remember):
        w = self.w
        if w.decided:
            raise RuntimeError("this request was answered already")
        w.decided = True
        self.eng.decide(w.ptr, connect, family, address, port, scope_id, remember)

    @property
    def dial_seconds(self):
        """How long the engine's connect took (start_socks(), once relaying)."""
        return self.w.dial_seconds

    @property
    def target(self):
        """(atyp, packed address, port) of a request the engine dialed without asking (a
        remembered destination), once it ended; else None."""
        return self.w.target

    @property
    def relaying(self):
        """The pair is past its handshake and still running (a gauge: it may be a moment old)."""
        w = self.w
        return w.result is None and (<Pair *>w.ptr).phase == PH_RELAY


cdef class _Engine:
    cdef Engine *e
    cdef bint running
    cdef int pid
    cdef dict waiting      # pair address -> _Waiter
    cdef dict loops        # loops whose reader drains our completions

    def __cinit__(self, int pipe_size, int pool_cap):
        """Open the engine's descriptors and start its thread; on any failure close what was
        opened and raise OSError."""
        cdef c.epoll_event ev
        cdef Engine *e = <Engine *>calloc(1, sizeof(Engine))
        cdef int err = 0
        cdef Pipe first
        if e == NULL:
            raise MemoryError()
        self.e = e
        self.waiting = {}
        self.loops = {}
        self.pid = os.getpid()
        e.epfd = e.sq_efd = e.cq_efd = -1
        e.next_scan_ms = -1
        e.pipe_size = max(pipe_size, 4096)
        e.pool_cap = max(pool_cap, 1)
        e.pool = <Pipe *>malloc(sizeof(Pipe) * e.pool_cap)
        if e.pool == NULL:
            raise MemoryError()
        e.epfd = c.epoll_create1(c.EPOLL_CLOEXEC)
        if e.epfd >= 0:
            e.sq_efd = c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC)
        if e.sq_efd >= 0:
            e.cq_efd = c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC)
        if e.cq_efd >= 0:
            ev.events = c.EPOLLIN     # level-triggered: drained on every wake-up
            ev.data.u64 = 0
            if c.epoll_ctl(e.epfd, c.EPOLL_CTL_ADD, e.sq_efd, &ev) == 0 and pipe_new(e, &first):
                # The first pipe says what size the kernel grants; it starts the pool.
                e.pipe_size = first.cap
                e.pool[0] = first
                e.pool_n = 1
        if e.pool_n == 0:
            err = errno
            close_engine_fds(e)
            raise OSError(err, os.strerror(err))
        err = c.pthread_mutex_init(&e.mu, NULL)
        e.mu_made = err == 0
        if err == 0:
            err = c.pthread_cond_init(&e.published_cond, NULL)
            e.cond_made = err == 0
        if err == 0:
            err = c.pthread_create(&e.thread, NULL, engine_main, e)
        if err != 0:
            close_engine_fds(e)
            raise OSError(err, f"cannot start the relay thread: {os.strerror(err)}")
        self.running = True

    def __dealloc__(self):
        # Only reached for an engine that was stopped (or never started): a running thread
        # still uses the struct.
        cdef Engine *e = self.e
        if e == NULL or self.running:
            return
        self.e = NULL
        close_engine_fds(e)
        if e.cond_made:
            c.pthread_cond_destroy(&e.published_cond)
        if e.mu_made:
            c.pthread_mutex_destroy(&e.mu)
        free(e.pool)
        free(e)

    cdef void _signal(self) noexcept:
        cdef uint64_t one = 1
        unistd.write(self.e.sq_efd, &one, 8)

    cdef submit(self, _Waiter w, int cfd, int ufd, bint cstream, bint ustream, bytes to_upstream,
                bytes to_client, object idle_timeout):
        """Queue a pair for the engine; its waiter is registered first, so whichever loop drains
        the completion finds it."""
        cdef Pair *p
        cdef int k
        cdef bytes early
        if not self.running:
            raise RelayUnavailable("the relay engine is stopped")
        p = <Pair *>calloc(1, sizeof(Pair))
        if p == NULL:
            raise MemoryError()
        p.fd[CLIENT] = cfd
        p.fd[UPSTREAM] = ufd
        p.stream[CLIENT] = cstream
        p.stream[UPSTREAM] = ustream
        for k in range(2):
            p.d[k].pipe.r = p.d[k].pipe.w = -1
            early = to_upstream if k == CLIENT else to_client
            if early:
                p.d[k].early = <char *>malloc(len(early))
                if p.d[k].early == NULL:
                    free(p.d[0].early)
                    free(p)
                    raise MemoryError()
                memcpy(p.d[k].early, <char *>early, len(early))
                p.d[k].early_len = len(early)
        self._enqueue(w, p, idle_timeout)

    cdef _enqueue(self, _Waiter w, Pair *p, object idle_timeout):
        """The settings every pair has, its waiter registered first (whichever loop drains the
        completion finds it), then onto the submit queue."""
        cdef bint wake
        p.idle_ms = -1 if idle_timeout is None else to_ms(float(idle_timeout))
        p.force_copy = not _splice_enabled
        p.refs = 2                # the engine's and ours
        w.ptr = <uintptr_t>p
        self.waiting[w.ptr] = w
        with nogil:
            c.pthread_mutex_lock(&self.e.mu)
            # Only the first command of a batch wakes the engine: it reads the eventfd before it
            # takes the queues, so later ones ride along.
            wake = self.e.sq_head == NULL and self.e.dq_head == NULL
            if self.e.sq_tail != NULL:
                self.e.sq_tail.sq_next = p
            else:
                self.e.sq_head = p
            self.e.sq_tail = p
            self.e.st.submitted += 1
            c.pthread_mutex_unlock(&self.e.mu)
        if wake:
            self._signal()

    cdef void cancel(self, uintptr_t ptr) noexcept:
        cdef Pair *p = <Pair *>ptr
        cdef bint queued = False
        with nogil:
            c.pthread_mutex_lock(&self.e.mu)
            if not p.posted and not p.cancel_queued:
                p.cancel_queued = True
                p.refs += 1
                p.cancel_next = self.e.cancel_head
                self.e.cancel_head = p
                queued = True
            c.pthread_mutex_unlock(&self.e.mu)
        if queued:
            self._signal()

    cdef submit_socks(self, _Waiter w, int cfd, bytes user, bytes password, bint login, double timeout,
                      double connect_timeout, object idle_timeout, Verdicts verdicts):
        """Queue a client for a native SOCKS5 handshake (see start_socks)."""
        cdef Pair *p
        cdef Socks *s
        if not self.running:
            raise RelayUnavailable("the relay engine is stopped")
        if len(user) > 255 or len(password) > 255:
            raise ValueError("SOCKS5 user names and passwords are at most 255 bytes")
        p = <Pair *>calloc(1, sizeof(Pair))
        s = <Socks *>calloc(1, sizeof(Socks))
        if p == NULL or s == NULL:
            free(p)
            free(s)
            raise MemoryError()
        p.hs = s
        p.phase = PH_SOCKS
        if verdicts is not None:
            w.verdicts = verdicts
            p.verdicts = verdicts.table
        p.fd[CLIENT] = cfd
        p.fd[UPSTREAM] = -1
        p.stream[CLIENT] = True
        p.d[0].pipe.r = p.d[0].pipe.w = p.d[1].pipe.r = p.d[1].pipe.w = -1
        s.login = login
        s.user_len = len(user)
        memcpy(s.user, <char *>user, s.user_len)
        s.password_len = len(password)
        memcpy(s.password, <char *>password, s.password_len)
        s.timeout_ms = to_ms(timeout)
        s.connect_ms = to_ms(connect_timeout)
        s.client_fd = -1
        self._enqueue(w, p, idle_timeout)

    cdef void decide(self, uintptr_t ptr, bint connect, int family, bytes address, int port,
                     int scope_id, bint remember) noexcept:
        cdef Pair *p = <Pair *>ptr
        cdef bint wake
        cdef const char *packed = address
        with nogil:
            c.pthread_mutex_lock(&self.e.mu)
            wake = self.e.sq_head == NULL and self.e.dq_head == NULL
            if not p.posted:
                # the engine does not touch hs while the request is Python's (PH_DECIDE)
                p.connect = connect
                p.remember = remember
                if connect:
                    p.hs.family = family
                    memcpy(p.hs.dial_addr, packed, 16 if family == c.AF_INET6 else 4)
                    p.hs.dial_port = port
                    p.hs.scope_id = <uint32_t>scope_id
                p.refs += 1
                p.dq_next = self.e.dq_head
                self.e.dq_head = p
            else:
                wake = False
            c.pthread_mutex_unlock(&self.e.mu)
        if wake:
            self._signal()

    def _drain(self, running=None):
        """add_reader callback of the loop `running` (None: after the engine stopped): hand native
        requests to be routed, collect finished pairs, resolve their futures."""
        cdef uint64_t junk
        cdef Pair *p
        cdef Pair *r
        cdef Pair *nxt
        cdef Socks *s
        cdef list requests = []
        cdef list done = []
        unistd.read(self.e.cq_efd, &junk, 8)
        with nogil:
            c.pthread_mutex_lock(&self.e.mu)
            r = self.e.rq_head
            self.e.rq_head = self.e.rq_tail = NULL
            p = self.e.cq_head
            self.e.cq_head = self.e.cq_tail = NULL
            c.pthread_mutex_unlock(&self.e.mu)
        while r != NULL:
            # PH_DECIDE: the engine leaves the request to Python until it answers
            s = r.hs
            requests.append((<uintptr_t>r, s.atyp, (<char *>s.addr)[:4 if s.atyp == 1 else 16], s.port))
            r = r.rq_next
        while p != NULL:
            nxt = p.cq_next
            # posted: the engine no longer writes to it; relay() releases it
            given = None
            if p.ended == END_GIVEN_BACK:
                s = p.hs
                given = (s.client_fd, (<char *>s.buf)[:s.len], (<char *>s.sent)[:s.sent_len], s.reason, s.err)
            target = None
            if p.remembered:
                target = (p.target_atyp, (<char *>p.target)[:4 if p.target_atyp == 1 else 16], p.target_port)
            done.append((<uintptr_t>p, p.d[0].bytes, p.d[1].bytes, p.ended, p.err, p.d[1].shut,
                         p.dial_ns, given, target))
            p = nxt
        for ptr, atyp, address, port in requests:
            w = <_Waiter>self.waiting[ptr]
            _invoke(running, w.loop, w.request, (atyp, address, port))
        for ptr, up, down, ended, err, down_shut, dial_ns, given, target in done:
            w = <_Waiter>self.waiting.pop(ptr)
            w.result = (up, down, ended, err, down_shut)
            w.dial_seconds = dial_ns / 1e9
            w.target = target
            # The callbacks are bound methods of the caller, which holds the handle, which holds this
            # waiter: dropping them ends the cycle here rather than in the garbage collector.
            w.request = None
            if given is not None:
                self.release(ptr)
                w.done = None
                given_back, w.given_back = w.given_back, None
                _invoke(running, w.loop, given_back, given)
            elif w.done is not None:
                self.release(ptr)
                w.given_back = None
                _call_done(w, running)
            else:
                _wake(w, running)

    cdef void release(self, uintptr_t ptr) noexcept:
        """Drop relay()'s reference to a posted pair."""
        cdef Pair *p = <Pair *>ptr
        with nogil:
            c.pthread_mutex_lock(&self.e.mu)
            p.refs -= 1
            if p.refs == 0:
                pair_free(p)
            c.pthread_mutex_unlock(&self.e.mu)

    def watch(self, loop):
        """Make sure `loop` drains completions. The reader stays registered until stop() (no
        add/remove per pair)."""
        if loop not in self.loops:
            for old in [l for l in self.loops if l.is_closed()]:
                del self.loops[old]
            loop.add_reader(self.e.cq_efd, self._drain, loop)
            self.loops[loop] = True

    def _unwatch_all(self):
        """Remove the completion reader from every loop it was added to, each in its own thread."""
        fd = self.e.cq_efd
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop in self.loops:
            if loop.is_closed():
                continue
            if loop is here or not loop.is_running():
                loop.remove_reader(fd)
                continue
            removed = threading.Event()

            def remove(loop=loop, removed=removed):
                loop.remove_reader(fd)
                removed.set()

            try:
                loop.call_soon_threadsafe(remove)
            except RuntimeError:   # closed meanwhile
                continue
            removed.wait(STOP_WAIT)
        self.loops.clear()

    def stop(self):
        """Cancel what is running, stop the thread, drop the readers, close the descriptors."""
        cdef Engine *e = self.e
        if not self.running:
            return
        with nogil:
            c.pthread_mutex_lock(&e.mu)
            e.stop = True
            c.pthread_mutex_unlock(&e.mu)
        self._signal()
        with nogil:
            c.pthread_join(e.thread, NULL)
        self.running = False
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        self._drain(here)
        self._unwatch_all()
        close_engine_fds(e)

    def abandon(self):
        """In a child after fork(): the thread is the parent's and does not exist here; close
        the inherited descriptors and forget the rest."""
        self.running = False
        self.waiting.clear()
        self.loops.clear()
        close_engine_fds(self.e)

    def stats(self):
        """The counters as of a moment after the call began: the engine publishes them at the
        end of the iteration in which it sees the request."""
        cdef Engine *e = self.e
        cdef Stats s
        cdef uint64_t asked
        if self.running:
            with nogil:
                c.pthread_mutex_lock(&e.mu)
                e.stats_asked += 1
                asked = e.stats_asked
                c.pthread_mutex_unlock(&e.mu)
            self._signal()
            with nogil:
                c.pthread_mutex_lock(&e.mu)
                while e.stats_given < asked and not e.exited:
                    c.pthread_cond_wait(&e.published_cond, &e.mu)
                s = e.published
                c.pthread_mutex_unlock(&e.mu)
        else:
            s = e.st          # no thread: the engine's own counters are still
            s.pipes_pooled = e.pool_n
        return {
            "pairs": s.submitted,
            "completed": s.completed,
            "active": s.active,
            "pipes_in_use": s.pipes_in_use,
            "pipes_pooled": s.pipes_pooled,
            "pipes_created": s.pipes_created,
            "pipe_pool_cap": e.pool_cap,
            "pipe_size": e.pipe_size,
            "pipe_bytes_max": s.pipe_bytes_max,
            "splice_bytes": s.splice_bytes,
            "copy_bytes": s.copy_bytes,
            "copy_directions": s.copy_directions,
            "wakeups": s.wakeups,
            "small_to_splice": s.to_splice,
            "splice_to_small": s.to_copy,
            "socks_native": s.socks_native,
            "socks_relayed": s.socks_relayed,
            "socks_given_back": s.socks_given_back,
            "socks_remembered": s.socks_remembered,
        }


cdef _wake(_Waiter w, running):
    fut = w.fut
    if fut is None or fut.done():
        return
    if running is w.loop:
        fut.set_result(None)
    elif not w.loop.is_closed():
        w.loop.call_soon_threadsafe(_set_if_pending, fut)


cdef _call_done(_Waiter w, running):
    """Hand a start_pair() pair's result to its callback, on its own loop."""
    up, down, ended, err, down_shut = w.result
    end = RelayEnd.CANCELLED if w.cancelled else _END[ended]
    result = RelayResult(up, down, time.monotonic() - w.t0, end,
                         _errname(err) if end in (RelayEnd.CLIENT_ERROR, RelayEnd.UPSTREAM_ERROR) else "",
                         download_finished=bool(down_shut))
    done, w.done = w.done, None
    _invoke(running, w.loop, done, (result,))


cdef _invoke(running, loop, callback, tuple args):
    """Call `callback(*args)` on `loop`: now if this drain runs on it, else soon. A callback that
    raises goes to its loop's exception handler and never keeps the drain from the other pairs."""
    if running is loop:
        try:
            callback(*args)
        except Exception as exc:
            loop.call_exception_handler({"message": "a relay engine callback failed", "exception": exc})
    elif not loop.is_closed():
        loop.call_soon_threadsafe(callback, *args)


def _set_if_pending(fut):
    if not fut.done():
        fut.set_result(None)


cdef _Engine _engine = None


cdef _Engine _current():
    """The engine running in this process, or None."""
    if _engine is not None and _engine.running and _engine.pid == os.getpid():
        return _engine
    return None


def start(*, pipe_size=DEFAULT_PIPE_SIZE, pool_cap=DEFAULT_POOL_CAP):
    """Start the engine in this process unless it runs already: its epoll fd, two eventfds, its
    first pipe and its thread. Raises RelayUnavailable (having closed whatever it opened) when it
    cannot. `pipe_size` (asked of the kernel, which may grant otherwise) and `pool_cap` tune it."""
    global _engine
    if _current() is not None:
        return
    if _engine is not None and _engine.pid != os.getpid():
        _engine.abandon()    # the parent's, inherited through fork()
    _engine = None
    try:
        _engine = _Engine(int(pipe_size), int(pool_cap))
    except OSError as exc:
        name = _errno.errorcode.get(exc.errno, str(exc.errno))
        raise RelayUnavailable(f"cannot start the compiled relay: {exc.strerror} ({name}); "
                               "ZEP_NO_EXTENSIONS=1 runs the pure-Python relay") from None


def ready():
    """Whether relay() can take a pair in this process (start() succeeded, stop() not called)."""
    return _current() is not None


def stop():
    """Stop the engine: running pairs end as cancelled. start() may start a new one."""
    global _engine
    if _current() is not None:
        _engine.stop()


atexit.register(stop)


def stats():
    """Counters of this process's engine (the last one, if it was stopped)."""
    if _engine is None or _engine.pid != os.getpid():
        raise RelayUnavailable("the compiled relay was not started in this process")
    return _engine.stats()


def _errname(int err):
    return _errno.errorcode.get(err, str(err)) if err else ""


def start_pair(client, upstream, *, to_upstream=b"", to_client=b"", idle_timeout, done):
    """Relay like relay(), without a coroutine: `done(RelayResult)` is called on this loop when
    the pair ends (cancelled too). Returns a PairHandle. Takes ownership of both sockets at once;
    raises RelayUnavailable (both closed, the client's with a reset) for a pair it cannot run."""
    cdef _Engine eng = _current()
    cdef _Waiter w = _Waiter()
    cdef PairHandle handle = PairHandle()
    w.t0 = time.monotonic()
    w.loop = asyncio.get_running_loop()
    w.done = done
    _submit(eng, w, client, upstream, to_upstream, to_client, idle_timeout)
    handle.w, handle.eng = w, eng
    return handle


def start_socks(int client, *, credentials=None, handshake_timeout, connect_timeout, idle_timeout, request, done,
                given_back, Verdicts verdicts=None, loop=None):
    """Run a SOCKS5 client's handshake in the engine (see the module's docstring). `client` is the
    accepted socket's fd, the engine's from now on (it makes it non-blocking, sets TCP_NODELAY).

    `credentials`: (user, password) as bytes for RFC 1929, None for no authentication.
    `request(atyp, address, port)` is called on this loop with a CONNECT to an IP literal (atyp 1
    or 4, the packed address); it must answer with `handle.connect(...)` or `handle.give_back()`.
    `done(RelayResult)` once a tunnel it became ends; `given_back(fd, received, sent, reason, err)`
    when the client goes back to Python instead (the fd is then the caller's; `reason` is a GB_*
    value). Raises RelayUnavailable, leaving `client` to the caller, when the engine is not running.
    `verdicts`: where remembered destinations are kept (see PairHandle.connect), one per
    router. `loop`: the running loop, when the caller has it at hand."""
    cdef _Engine eng = _current()
    cdef _Waiter w = _Waiter()
    cdef PairHandle handle = PairHandle()
    cdef int cfd = client
    w.t0 = time.monotonic()
    w.loop = loop if loop is not None else asyncio.get_running_loop()
    w.done, w.request, w.given_back = done, request, given_back
    user, password = credentials if credentials is not None else (b"", b"")
    if eng is None:  # the fd stays the caller's
        raise RelayUnavailable("the compiled relay is not running in this process (start() it first)")
    try:
        eng.watch(w.loop)
        eng.submit_socks(w, cfd, bytes(user), bytes(password), credentials is not None, float(handshake_timeout),
                         float(connect_timeout), idle_timeout, verdicts)
    except BaseException:
        if cfd >= 0:
            reset_close(cfd)
        raise
    handle.w, handle.eng = w, eng
    return handle


cdef _submit(_Engine eng, _Waiter w, client, upstream, to_upstream, to_client, idle_timeout):
    """Detach both sockets and queue the pair for `w`; on failure close both (the client's with a
    reset) and raise."""
    cdef int cfd, ufd
    # A socket in blocking mode (no timeout) is the only kind without O_NONBLOCK.
    set_nonblocking = (client.gettimeout() is None, upstream.gettimeout() is None)
    # Byte streams allow the engine to skip the read that would say EAGAIN.
    stream = (getattr(client, "type", None) == socket.SOCK_STREAM,
              getattr(upstream, "type", None) == socket.SOCK_STREAM)
    cfd = client.detach()
    ufd = upstream.detach()
    try:
        if eng is None:
            raise RelayUnavailable("the compiled relay is not running in this process (start() it first)")
        if cfd < 0 or ufd < 0:
            raise OSError(_errno.EBADF, "relay() needs two open sockets")
        if set_nonblocking[0]:
            os.set_blocking(cfd, False)
        if set_nonblocking[1]:
            os.set_blocking(ufd, False)
        eng.watch(w.loop)
        eng.submit(w, cfd, ufd, stream[0], stream[1], bytes(to_upstream), bytes(to_client), idle_timeout)
    except BaseException:
        if cfd >= 0:
            reset_close(cfd)
        if ufd >= 0:
            unistd.close(ufd)
        raise


async def relay(client, upstream, *, to_upstream=b"", to_client=b"", idle_timeout):
    """Relay bytes between two connected sockets until both directions end.

    Takes ownership of both sockets: their fds are detached at once and closed by the engine
    (or here, the client's with a reset, when the pair cannot be submitted).
    """
    cdef _Engine eng = _current()
    cdef _Waiter w = _Waiter()
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    w.loop = loop
    w.fut = loop.create_future()
    _submit(eng, w, client, upstream, to_upstream, to_client, idle_timeout)
    cancelled = False
    try:
        try:
            await w.fut
        except asyncio.CancelledError:
            cancelled = True
            eng.cancel(w.ptr)
            # The engine answers at once; wait for the final counts even if cancelled again
            # meanwhile.
            while w.result is None:
                w.fut = loop.create_future()
                try:
                    await w.fut
                except asyncio.CancelledError:
                    pass
    finally:
        if w.result is not None:
            eng.release(w.ptr)
    up, down, ended, err, down_shut = w.result
    end = RelayEnd.CANCELLED if cancelled else _END[ended]
    result = RelayResult(
        bytes_up=up,
        bytes_down=down,
        seconds=time.monotonic() - t0,
        ended=end,
        error=_errname(err) if end in (RelayEnd.CLIENT_ERROR, RelayEnd.UPSTREAM_ERROR) else "",
        download_finished=bool(down_shut),
    )
    if cancelled:
        raise RelayCancelled(result)
    return result
