/* echo: a TCP echo server for throughput tests. Single-threaded, poll()-based, non-blocking,
 * many clients; every byte received is sent back. A client that stops reading is held back
 * (its buffer fills and echo stops reading from it) rather than buffered without bound.
 *
 * Listeners: under WASI the hypervisor preopens listening sockets after the preopened
 * directories; echo uses every socket among fds 3..63. Natively it listens on TCP port argv[1]
 * (default 7000) at address argv[2] (default 0.0.0.0).
 *
 * usage: echo [PORT=7000] [ADDR=0.0.0.0]    (native; under WASI the arguments are ignored) */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#ifndef __wasi__
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#endif

#define MAX_CLIENTS 1024
#define MAX_LISTENERS 16
#define BUF_SIZE (256 * 1024) /* per-client bytes received but not yet echoed */

struct client {
    int fd;
    int eof;  /* peer finished sending: close once everything is echoed */
    int dead;
    size_t start, end; /* pending bytes are buf[start..end) */
    char *buf;
};

static struct client *clients[MAX_CLIENTS];
static int nclients;
static int listeners[MAX_LISTENERS];
static int nlisteners;
static unsigned long long total_bytes, total_conns;

static int set_nonblocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    if (fl & O_NONBLOCK)
        return 0;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static ssize_t sock_write(int fd, const void *p, size_t n)
{
#ifdef __wasi__
    return send(fd, p, n, 0);
#else
    return send(fd, p, n, MSG_NOSIGNAL);
#endif
}

static void flush_client(struct client *c)
{
    while (c->end > c->start) {
        ssize_t w = sock_write(c->fd, c->buf + c->start, c->end - c->start);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                c->dead = 1;
            return;
        }
        c->start += (size_t)w;
        total_bytes += (unsigned long long)w;
    }
    c->start = c->end = 0;
    if (c->eof)
        c->dead = 1;
}

static void read_client(struct client *c)
{
    if (c->end == BUF_SIZE && c->start > 0) {
        memmove(c->buf, c->buf + c->start, c->end - c->start);
        c->end -= c->start;
        c->start = 0;
    }
    if (c->end == BUF_SIZE)
        return; /* full: wait for POLLOUT */
    ssize_t r = recv(c->fd, c->buf + c->end, BUF_SIZE - c->end, 0);
    if (r == 0) {
        c->eof = 1;
    } else if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            c->dead = 1;
        return;
    } else {
        c->end += (size_t)r;
    }
    flush_client(c);
}

static void accept_clients(int lfd)
{
    for (int k = 0; k < 64; k++) {
        /* Always pass a real address buffer: wasi-libc's accept() writes through addr. */
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept(lfd, (struct sockaddr *)&ss, &sl);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                fprintf(stderr, "echo: accept: %s\n", strerror(errno));
            return;
        }
        struct client *c = NULL;
        if (nclients >= MAX_CLIENTS || set_nonblocking(fd) != 0 ||
            !(c = calloc(1, sizeof *c)) || !(c->buf = malloc(BUF_SIZE))) {
            free(c);
            close(fd);
            continue;
        }
#ifndef __wasi__
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
#endif
        c->fd = fd;
        clients[nclients++] = c;
        total_conns++;
    }
}

static int find_listeners(int argc, char **argv)
{
#ifdef __wasi__
    (void)argc;
    (void)argv;
    for (int fd = 3; fd < 64 && nlisteners < MAX_LISTENERS; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) {
            listeners[nlisteners++] = fd;
            printf("echo: listener fd %d\n", fd);
        }
    }
    if (nlisteners == 0) {
        printf("echo: error: no preopened listening socket among fds 3..63\n");
        fflush(stdout);
        return -1;
    }
#else
    int port = argc > 1 ? atoi(argv[1]) : 7000;
    const char *addr = argc > 2 ? argv[2] : "0.0.0.0";
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("echo: socket");
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "echo: bad address %s\n", addr);
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 511) != 0) {
        fprintf(stderr, "echo: cannot listen on %s:%d: %s\n", addr, port, strerror(errno));
        return -1;
    }
    listeners[nlisteners++] = fd;
    printf("echo: listener %s:%d\n", addr, port);
#endif
    for (int i = 0; i < nlisteners; i++)
        if (set_nonblocking(listeners[i]) != 0) {
            printf("echo: error: cannot make listener fd %d non-blocking (errno %d)\n",
                   listeners[i], errno);
            return -1;
        }
    return 0;
}

int main(int argc, char **argv)
{
#ifndef __wasi__
    signal(SIGPIPE, SIG_IGN);
#endif
    if (find_listeners(argc, argv) != 0)
        return 2;
    printf("echo: listening\n");
    fflush(stdout);

    static struct pollfd pfds[MAX_LISTENERS + MAX_CLIENTS];
    static struct client *pclient[MAX_LISTENERS + MAX_CLIENTS];
    for (;;) {
        int n = 0;
        for (int i = 0; i < nlisteners; i++) {
            pfds[n].fd = listeners[i];
            pfds[n].events = POLLIN;
            pfds[n].revents = 0;
            pclient[n++] = NULL;
        }
        for (int i = 0; i < nclients; i++) {
            struct client *c = clients[i];
            short ev = 0;
            if (!c->eof && c->end - c->start < BUF_SIZE)
                ev |= POLLIN;
            if (c->end > c->start)
                ev |= POLLOUT;
            if (!ev)
                continue;
            pfds[n].fd = c->fd;
            pfds[n].events = ev;
            pfds[n].revents = 0;
            pclient[n++] = c;
        }
        if (poll(pfds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            printf("echo: poll failed errno=%d (%s)\n", errno, strerror(errno));
            return 1;
        }
        for (int i = 0; i < n; i++) {
            short re = pfds[i].revents;
            if (!re)
                continue;
            struct client *c = pclient[i];
            if (!c) {
                accept_clients(pfds[i].fd);
                continue;
            }
            if (re & POLLNVAL) {
                c->dead = 1;
                continue;
            }
            if (re & POLLOUT)
                flush_client(c);
            if (!c->dead && (re & (POLLIN | POLLHUP | POLLERR))) {
                if (c->eof) /* hang-up after EOF with data still queued: give up */
                    c->dead = (re & POLLERR) != 0;
                else
                    read_client(c);
            }
        }
        int k = 0;
        for (int i = 0; i < nclients; i++) {
            struct client *c = clients[i];
            if (c->dead) {
                close(c->fd);
                free(c->buf);
                free(c);
            } else {
                clients[k++] = c;
            }
        }
        nclients = k;
    }
}
