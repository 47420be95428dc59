# C declarations of the compiled relay engine (Linux only) that Cython's own `libc` and `posix`
# packages lack: splice and pipe sizes, sockets and their addresses, epoll, eventfd and pthreads. Everything else
# (errno, close/read/write, fcntl, clocks, signal sets) is cimported from those packages.

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.types cimport sigset_t


cdef extern from "<fcntl.h>" nogil:
    ctypedef long long loff_t
    enum:
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
    ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len, unsigned int flags)


cdef extern from "<unistd.h>" nogil:
    int pipe2(int pipefd[2], int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    enum:
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SHUT_WR
        MSG_NOSIGNAL
        MSG_DONTWAIT
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
    struct linger:
        int l_onoff
        int l_linger
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    int socket(int domain, int type, int protocol)
    int connect(int sockfd, const sockaddr *addr, socklen_t addrlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int shutdown(int sockfd, int how)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    enum:
        IPPROTO_TCP
    uint16_t htons(uint16_t hostshort)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    union epoll_data:
        uint64_t u64
    ctypedef epoll_data epoll_data_t
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start_routine)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_sigmask(int how, const sigset_t *set, sigset_t *oldset)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const pthread_condattr_t *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_broadcast(pthread_cond_t *cond)
