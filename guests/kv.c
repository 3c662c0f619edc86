/* kv: a single-threaded Redis-protocol (RESP2) key-value server.
 *
 * Requests: inline ("SET a b\r\n") and multibulk ("*3\r\n$3\r\nSET\r\n..."), pipelined, from many
 * clients multiplexed with poll() over non-blocking sockets.
 * Commands: PING ECHO SET(EX/PX/NX/XX/KEEPTTL) GET DEL EXISTS INCR INCRBY DECR DECRBY MSET MGET
 * DBSIZE FLUSHALL TTL PTTL EXPIRE PEXPIRE PERSIST SELECT COMMAND CONFIG(GET/RESETSTAT) QUIT.
 * COMMAND answers an empty array; CONFIG GET answers the few parameters clients read (save,
 * appendonly, ...) and an empty array for anything else.
 * Expiry runs on CLOCK_MONOTONIC: lazily when a key is touched, and by an active sweep driven by
 * the poll timeout.
 *
 * Listeners: under WASI there is no socket()/bind(): the hypervisor preopens listening sockets
 * after the preopened directories, and kv uses every socket it finds among fds 3..63. Natively it
 * listens on TCP port argv[1] (default 6379) at address argv[2] (default 0.0.0.0).
 *
 * Everything the program does is a function of its inputs (requests and clock readings): there is
 * no randomness, so a replica replaying the same inputs reaches the same state.
 *
 * usage: kv [PORT=6379] [ADDR=0.0.0.0]    (native; under WASI the arguments are ignored) */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#ifndef __wasi__
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#endif

/* ------------------------------------------------------------------ limits */
#define MAX_CLIENTS 1024
#define MAX_LISTENERS 16
#define MAX_BULK (64L * 1024 * 1024)            /* largest single argument */
#define MAX_INLINE (64 * 1024)                  /* longest inline request / header line */
#define MAX_MULTIBULK (1024L * 1024)            /* most arguments in one request */
#define QUERY_LIMIT (2 * MAX_BULK + 1024 * 1024) /* unparsed input held for one client */
#define OUT_SOFT (1024 * 1024)  /* stop executing a client's requests above this much output */
#define OUT_HARD (256L * 1024 * 1024) /* close a client whose pending output exceeds this */
#define READ_CHUNK (16 * 1024)
#define READ_BIG (1024 * 1024)  /* read size while a large argument is arriving */
#define KEEP_BUF (64 * 1024)    /* idle buffers larger than this are freed */
#define SWEEP_INTERVAL_MS 100
#define SWEEP_BUCKETS 1024      /* minimum buckets examined per active-expiry sweep */
#define MIN_BUCKETS 64
#define MAX_BUCKETS (1L << 26)

/* ------------------------------------------------------------------ time */
static int64_t now_ms; /* CLOCK_MONOTONIC in ms, read once per event-loop turn */

static int64_t mono_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return now_ms;
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ byte buffers */
struct buf {
    char *data;
    size_t start, end, cap; /* live bytes are data[start..end) */
};

static size_t buf_len(const struct buf *b) { return b->end - b->start; }

/* Ensure room for n more bytes after end. Compacts (moving live data to 0) before growing. */
static int buf_reserve(struct buf *b, size_t n)
{
    if (b->cap - b->end >= n)
        return 0;
    if (b->start > 0) {
        size_t len = buf_len(b);
        memmove(b->data, b->data + b->start, len);
        b->start = 0;
        b->end = len;
        if (b->cap - b->end >= n)
            return 0;
    }
    size_t want = b->end + n, cap = b->cap ? b->cap : 1024;
    while (cap < want) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* After consuming everything: rewind, and give back a large allocation. */
static void buf_idle(struct buf *b)
{
    if (b->start == b->end) {
        b->start = b->end = 0;
        if (b->cap > KEEP_BUF)
            buf_free(b);
    }
}

/* ------------------------------------------------------------------ the key space */
struct entry {
    struct entry *next;
    uint64_t hash;
    int64_t expire; /* absolute CLOCK_MONOTONIC ms; 0 = no expiry */
    char *val;
    size_t vlen, klen;
    char key[];
};

static struct {
    struct entry **b;
    size_t nb;       /* number of buckets, a power of two */
    size_t count;    /* entries */
    size_t volatile_count; /* entries with an expiry */
    size_t sweep_cursor;
} db;

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static int db_init(void)
{
    db.b = calloc(MIN_BUCKETS, sizeof *db.b);
    if (!db.b)
        return -1;
    db.nb = MIN_BUCKETS;
    db.count = db.volatile_count = db.sweep_cursor = 0;
    return 0;
}

static void entry_free(struct entry *e)
{
    free(e->val);
    free(e);
}

static void db_grow(void)
{
    if (db.nb >= (size_t)MAX_BUCKETS)
        return;
    size_t nb = db.nb * 2;
    struct entry **nbk = calloc(nb, sizeof *nbk);
    if (!nbk)
        return; /* keep working with longer chains */
    for (size_t i = 0; i < db.nb; i++) {
        struct entry *e = db.b[i];
        while (e) {
            struct entry *next = e->next;
            size_t j = e->hash & (nb - 1);
            e->next = nbk[j];
            nbk[j] = e;
            e = next;
        }
    }
    free(db.b);
    db.b = nbk;
    db.nb = nb;
    db.sweep_cursor = 0;
}

/* The slot (pointer to the link) holding key, or the empty link at the chain's end. */
static struct entry **db_slot(const char *key, size_t klen, uint64_t h)
{
    struct entry **s = &db.b[h & (db.nb - 1)];
    while (*s) {
        struct entry *e = *s;
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0)
            break;
        s = &e->next;
    }
    return s;
}

static void db_unlink(struct entry **slot)
{
    struct entry *e = *slot;
    *slot = e->next;
    if (e->expire)
        db.volatile_count--;
    db.count--;
    entry_free(e);
}

static int expired(const struct entry *e) { return e->expire != 0 && e->expire <= now_ms; }

/* Find a live key (deleting it if it has expired). */
static struct entry *db_get(const char *key, size_t klen)
{
    struct entry **s = db_slot(key, klen, hash_bytes(key, klen));
    if (!*s)
        return NULL;
    if (expired(*s)) {
        db_unlink(s);
        return NULL;
    }
    return *s;
}

static int db_del(const char *key, size_t klen)
{
    struct entry **s = db_slot(key, klen, hash_bytes(key, klen));
    if (!*s)
        return 0;
    int live = !expired(*s);
    db_unlink(s);
    return live;
}

static void set_expire(struct entry *e, int64_t expire)
{
    if (e->expire && !expire)
        db.volatile_count--;
    else if (!e->expire && expire)
        db.volatile_count++;
    e->expire = expire;
}

/* Store a copy of val under key with the given expiry. Returns the entry, NULL when out of memory
 * (the key space is then unchanged). */
static struct entry *db_set(const char *key, size_t klen, const char *val, size_t vlen,
                            int64_t expire)
{
    uint64_t h = hash_bytes(key, klen);
    struct entry **s = db_slot(key, klen, h);
    char *v = malloc(vlen ? vlen : 1);
    if (!v)
        return NULL;
    memcpy(v, val, vlen);
    struct entry *e = *s;
    if (e) {
        free(e->val);
    } else {
        e = malloc(sizeof *e + klen);
        if (!e) {
            free(v);
            return NULL;
        }
        memcpy(e->key, key, klen);
        e->klen = klen;
        e->hash = h;
        e->expire = 0;
        e->next = NULL;
        *s = e;
        db.count++;
    }
    e->val = v;
    e->vlen = vlen;
    set_expire(e, expire);
    if (db.count > db.nb)
        db_grow();
    return e;
}

static void db_flush(void)
{
    for (size_t i = 0; i < db.nb; i++) {
        struct entry *e = db.b[i];
        while (e) {
            struct entry *next = e->next;
            entry_free(e);
            e = next;
        }
    }
    free(db.b);
    if (db_init() != 0) {
        fprintf(stderr, "kv: out of memory in FLUSHALL\n");
        exit(1);
    }
}

/* Active expiry: walk a window of buckets from a cursor and drop expired keys. */
static void db_sweep(void)
{
    if (db.volatile_count == 0)
        return;
    /* at least SWEEP_BUCKETS, and enough for a full pass in about 8 sweeps */
    size_t n = db.nb / 8 > SWEEP_BUCKETS ? db.nb / 8 : SWEEP_BUCKETS;
    if (n > db.nb)
        n = db.nb;
    for (size_t k = 0; k < n; k++) {
        size_t i = (db.sweep_cursor + k) & (db.nb - 1);
        struct entry **s = &db.b[i];
        while (*s) {
            if (expired(*s))
                db_unlink(s);
            else
                s = &(*s)->next;
        }
    }
    db.sweep_cursor = (db.sweep_cursor + n) & (db.nb - 1);
}

/* ------------------------------------------------------------------ clients */
struct arg {
    size_t off, len; /* relative to in.start, the first byte of the request being parsed */
};

struct client {
    int fd;
    int close_after_write; /* QUIT or protocol error: flush, then close */
    int dead;
    struct buf in, out;
    /* incremental request parser */
    long mb_total;    /* multibulk: arguments announced, -1 when between requests */
    long bulk_len;    /* length of the bulk being received, -1 when expecting a $ header */
    size_t parse_pos; /* relative to in.start */
    size_t want;      /* bytes still missing for the current bulk (read-size hint) */
    struct arg *args;
    size_t argc, args_cap;
};

static struct client *clients[MAX_CLIENTS];
static int nclients;
static int listeners[MAX_LISTENERS];
static int nlisteners;

static void client_kill(struct client *c) { c->dead = 1; }

static void out_append(struct client *c, const void *p, size_t n)
{
    if (c->dead)
        return;
    if (buf_len(&c->out) + n > (size_t)OUT_HARD) {
        fprintf(stderr, "kv: client fd %d output limit exceeded, closing\n", c->fd);
        client_kill(c);
        return;
    }
    if (buf_reserve(&c->out, n) != 0) {
        fprintf(stderr, "kv: out of memory for client fd %d output, closing\n", c->fd);
        client_kill(c);
        return;
    }
    memcpy(c->out.data + c->out.end, p, n);
    c->out.end += n;
}

static void out_str(struct client *c, const char *s) { out_append(c, s, strlen(s)); }

static void reply_ok(struct client *c) { out_str(c, "+OK\r\n"); }
static void reply_nil(struct client *c) { out_str(c, "$-1\r\n"); }

static void reply_int(struct client *c, long long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, ":%lld\r\n", v);
    out_append(c, tmp, (size_t)n);
}

static void reply_array(struct client *c, long long n)
{
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, "*%lld\r\n", n);
    out_append(c, tmp, (size_t)k);
}

static void reply_bulk(struct client *c, const char *p, size_t n)
{
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, "$%zu\r\n", n);
    out_append(c, tmp, (size_t)k);
    out_append(c, p, n);
    out_append(c, "\r\n", 2);
}

/* An error reply: "-" + message, with CR/LF in the message replaced by spaces. */
static void reply_error(struct client *c, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    for (int i = 0; i < n; i++)
        if (msg[i] == '\r' || msg[i] == '\n')
            msg[i] = ' ';
    out_append(c, "-", 1);
    out_append(c, msg, (size_t)n);
    out_append(c, "\r\n", 2);
}

static void protocol_error(struct client *c, const char *what)
{
    reply_error(c, "ERR Protocol error: %s", what);
    c->close_after_write = 1;
}

/* ------------------------------------------------------------------ request parsing */
/* Strict integer parse (Redis string2ll rules: no spaces, no '+', no leading zeros). */
static int parse_ll(const char *s, size_t n, long long *out)
{
    if (n == 0 || n > 20)
        return 0;
    if (n == 1 && s[0] == '0') {
        *out = 0;
        return 1;
    }
    size_t i = 0;
    int neg = 0;
    if (s[0] == '-') {
        neg = 1;
        i = 1;
        if (n == 1)
            return 0;
    }
    if (s[i] < '1' || s[i] > '9')
        return 0;
    unsigned long long v = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (ULLONG_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > (unsigned long long)LLONG_MAX + 1)
            return 0;
        *out = v == (unsigned long long)LLONG_MAX + 1 ? LLONG_MIN : -(long long)v;
    } else {
        if (v > (unsigned long long)LLONG_MAX)
            return 0;
        *out = (long long)v;
    }
    return 1;
}

static int push_arg(struct client *c, size_t off, size_t len)
{
    if (c->argc == c->args_cap) {
        size_t cap = c->args_cap ? c->args_cap * 2 : 8;
        struct arg *a = realloc(c->args, cap * sizeof *a);
        if (!a)
            return -1;
        c->args = a;
        c->args_cap = cap;
    }
    c->args[c->argc].off = off;
    c->args[c->argc].len = len;
    c->argc++;
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Split an inline request in place (quotes and backslash escapes are resolved by rewriting the
 * line; the result is never longer). Returns 0, or -1 on unbalanced quotes / out of memory. */
static int split_inline(struct client *c, char *line, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (i < n && (line[i] == ' ' || line[i] == '\t'))
            i++;
        if (i >= n)
            break;
        size_t start = i, w = i;
        if (line[i] == '"' || line[i] == '\'') {
            char q = line[i++];
            int closed = 0;
            while (i < n) {
                char ch = line[i++];
                if (ch == q) {
                    closed = 1;
                    break;
                }
                if (ch == '\\' && q == '"' && i < n) {
                    ch = line[i++];
                    switch (ch) {
                    case 'n': ch = '\n'; break;
                    case 'r': ch = '\r'; break;
                    case 't': ch = '\t'; break;
                    case 'a': ch = '\a'; break;
                    case 'b': ch = '\b'; break;
                    case 'x':
                        if (i + 1 < n && hexval(line[i]) >= 0 && hexval(line[i + 1]) >= 0) {
                            ch = (char)(hexval(line[i]) * 16 + hexval(line[i + 1]));
                            i += 2;
                        }
                        break;
                    default: break;
                    }
                } else if (ch == '\\' && q == '\'' && i < n && line[i] == '\'') {
                    ch = line[i++];
                }
                line[w++] = ch;
            }
            /* a closing quote must be followed by a space or the end of the line */
            if (!closed || (i < n && line[i] != ' ' && line[i] != '\t'))
                return -1;
        } else {
            while (i < n && line[i] != ' ' && line[i] != '\t')
                line[w++] = line[i++];
        }
        if (push_arg(c, start, w - start) != 0)
            return -1;
    }
    return 0;
}

/* Try to complete one request from c->in. Returns 1 when c->args holds a complete request,
 * 0 when more input is needed, -1 after a protocol error (reply queued, client closing). */
static int parse_request(struct client *c)
{
    for (;;) {
        char *base = c->in.data + c->in.start;
        size_t avail = buf_len(&c->in);

        if (c->mb_total < 0) {
            /* between requests */
            c->argc = 0;
            c->parse_pos = 0;
            c->want = 0;
            if (avail == 0)
                return 0;
            char *nl = memchr(base, '\n', avail);
            if (base[0] != '*') {
                /* inline request */
                if (!nl) {
                    if (avail > MAX_INLINE) {
                        protocol_error(c, "too big inline request");
                        return -1;
                    }
                    return 0;
                }
                size_t len = (size_t)(nl - base);
                size_t linelen = len > 0 && base[len - 1] == '\r' ? len - 1 : len;
                if (split_inline(c, base, linelen) != 0) {
                    protocol_error(c, "unbalanced quotes in request");
                    return -1;
                }
                c->parse_pos = len + 1;
                if (c->argc == 0) { /* empty line: skip it */
                    c->in.start += c->parse_pos;
                    continue;
                }
                c->mb_total = (long)c->argc; /* marks "request in progress" until consumed */
                return 1;
            }
            /* multibulk header "*<n>\r\n" */
            if (!nl) {
                if (avail > MAX_INLINE) {
                    protocol_error(c, "too big mbulk count string");
                    return -1;
                }
                return 0;
            }
            size_t len = (size_t)(nl - base);
            long long n;
            if (len < 2 || base[len - 1] != '\r' || !parse_ll(base + 1, len - 2, &n) ||
                n > MAX_MULTIBULK) {
                protocol_error(c, "invalid multibulk length");
                return -1;
            }
            if (n <= 0) { /* "*0" / "*-1": nothing to do */
                c->in.start += len + 1;
                continue;
            }
            c->mb_total = (long)n;
            c->bulk_len = -1;
            c->parse_pos = len + 1;
        }

        /* multibulk arguments */
        while ((long)c->argc < c->mb_total) {
            char *p = base + c->parse_pos;
            size_t left = avail - c->parse_pos;
            if (c->bulk_len < 0) {
                if (left == 0)
                    return 0;
                char *nl = memchr(p, '\n', left);
                if (!nl) {
                    if (left > MAX_INLINE) {
                        protocol_error(c, "too big bulk count string");
                        return -1;
                    }
                    return 0;
                }
                size_t len = (size_t)(nl - p);
                if (p[0] != '$') {
                    char what[64];
                    snprintf(what, sizeof what, "expected '$', got '%c'", p[0]);
                    protocol_error(c, what);
                    return -1;
                }
                long long blen;
                if (len < 2 || p[len - 1] != '\r' || !parse_ll(p + 1, len - 2, &blen) ||
                    blen < 0 || blen > MAX_BULK) {
                    protocol_error(c, "invalid bulk length");
                    return -1;
                }
                c->bulk_len = (long)blen;
                c->parse_pos += len + 1;
                p = base + c->parse_pos;
                left = avail - c->parse_pos;
            }
            size_t need = (size_t)c->bulk_len + 2;
            if (left < need) {
                c->want = need - left;
                return 0;
            }
            if (push_arg(c, c->parse_pos, (size_t)c->bulk_len) != 0) {
                fprintf(stderr, "kv: out of memory parsing request, closing\n");
                client_kill(c);
                return -1;
            }
            c->parse_pos += need;
            c->bulk_len = -1;
        }
        c->want = 0;
        return 1;
    }
}

/* Drop the request just executed from the input buffer. */
static void consume_request(struct client *c)
{
    c->in.start += c->parse_pos;
    c->parse_pos = 0;
    c->mb_total = -1;
    c->bulk_len = -1;
    c->argc = 0;
    buf_idle(&c->in);
}

/* ------------------------------------------------------------------ commands */
struct req {
    struct client *c;
    const char *base;
    const struct arg *a;
    size_t argc;
};

#define ARGP(r, i) ((r)->base + (r)->a[i].off)
#define ARGN(r, i) ((r)->a[i].len)

static int arg_is(const struct req *r, size_t i, const char *word)
{
    size_t n = strlen(word);
    if (ARGN(r, i) != n)
        return 0;
    const char *p = ARGP(r, i);
    for (size_t k = 0; k < n; k++) {
        char ch = p[k];
        if (ch >= 'a' && ch <= 'z')
            ch = (char)(ch - 'a' + 'A');
        if (ch != word[k])
            return 0;
    }
    return 1;
}

static void reply_oom(struct client *c)
{
    reply_error(c, "OOM command not allowed when used memory > 'maxmemory'.");
}

static void cmd_ping(struct req *r)
{
    if (r->argc > 2)
        reply_error(r->c, "ERR wrong number of arguments for 'ping' command");
    else if (r->argc == 1)
        out_str(r->c, "+PONG\r\n");
    else
        reply_bulk(r->c, ARGP(r, 1), ARGN(r, 1));
}

static void cmd_echo(struct req *r) { reply_bulk(r->c, ARGP(r, 1), ARGN(r, 1)); }

static void cmd_set(struct req *r)
{
    int nx = 0, xx = 0, keepttl = 0, has_ttl = 0;
    long long ttl_ms = 0;
    for (size_t i = 3; i < r->argc; i++) {
        if (arg_is(r, i, "NX") && !xx) {
            nx = 1;
        } else if (arg_is(r, i, "XX") && !nx) {
            xx = 1;
        } else if (arg_is(r, i, "KEEPTTL") && !has_ttl) {
            keepttl = 1;
        } else if ((arg_is(r, i, "EX") || arg_is(r, i, "PX")) && !has_ttl && !keepttl &&
                   i + 1 < r->argc) {
            int seconds = arg_is(r, i, "EX");
            long long v;
            if (!parse_ll(ARGP(r, i + 1), ARGN(r, i + 1), &v)) {
                reply_error(r->c, "ERR value is not an integer or out of range");
                return;
            }
            if (v <= 0 || (seconds && v > LLONG_MAX / 1000) ||
                (seconds ? v * 1000 : v) > LLONG_MAX - now_ms) {
                reply_error(r->c, "ERR invalid expire time in 'set' command");
                return;
            }
            ttl_ms = seconds ? v * 1000 : v;
            has_ttl = 1;
            i++;
        } else {
            reply_error(r->c, "ERR syntax error");
            return;
        }
    }
    struct entry *old = db_get(ARGP(r, 1), ARGN(r, 1));
    if ((nx && old) || (xx && !old)) {
        reply_nil(r->c);
        return;
    }
    int64_t expire = has_ttl ? now_ms + ttl_ms : (keepttl && old ? old->expire : 0);
    if (!db_set(ARGP(r, 1), ARGN(r, 1), ARGP(r, 2), ARGN(r, 2), expire)) {
        reply_oom(r->c);
        return;
    }
    reply_ok(r->c);
}

static void cmd_get(struct req *r)
{
    struct entry *e = db_get(ARGP(r, 1), ARGN(r, 1));
    if (e)
        reply_bulk(r->c, e->val, e->vlen);
    else
        reply_nil(r->c);
}

static void cmd_del(struct req *r)
{
    long long n = 0;
    for (size_t i = 1; i < r->argc; i++)
        n += db_del(ARGP(r, i), ARGN(r, i));
    reply_int(r->c, n);
}

static void cmd_exists(struct req *r)
{
    long long n = 0;
    for (size_t i = 1; i < r->argc; i++)
        n += db_get(ARGP(r, i), ARGN(r, i)) != NULL;
    reply_int(r->c, n);
}

static void incr_by(struct req *r, long long delta)
{
    struct entry *e = db_get(ARGP(r, 1), ARGN(r, 1));
    long long v = 0;
    if (e && !parse_ll(e->val, e->vlen, &v)) {
        reply_error(r->c, "ERR value is not an integer or out of range");
        return;
    }
    if ((delta > 0 && v > LLONG_MAX - delta) || (delta < 0 && v < LLONG_MIN - delta)) {
        reply_error(r->c, "ERR increment or decrement would overflow");
        return;
    }
    v += delta;
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    if (!db_set(ARGP(r, 1), ARGN(r, 1), tmp, (size_t)n, e ? e->expire : 0)) {
        reply_oom(r->c);
        return;
    }
    reply_int(r->c, v);
}

static int delta_arg(struct req *r, long long *d)
{
    if (!parse_ll(ARGP(r, 2), ARGN(r, 2), d)) {
        reply_error(r->c, "ERR value is not an integer or out of range");
        return 0;
    }
    return 1;
}

static void cmd_incr(struct req *r) { incr_by(r, 1); }
static void cmd_decr(struct req *r) { incr_by(r, -1); }

static void cmd_incrby(struct req *r)
{
    long long d;
    if (delta_arg(r, &d))
        incr_by(r, d);
}

static void cmd_decrby(struct req *r)
{
    long long d;
    if (!delta_arg(r, &d))
        return;
    if (d == LLONG_MIN) {
        reply_error(r->c, "ERR decrement would overflow");
        return;
    }
    incr_by(r, -d);
}

static void cmd_mset(struct req *r)
{
    if (r->argc % 2 != 1) {
        reply_error(r->c, "ERR wrong number of arguments for 'mset' command");
        return;
    }
    for (size_t i = 1; i < r->argc; i += 2)
        if (!db_set(ARGP(r, i), ARGN(r, i), ARGP(r, i + 1), ARGN(r, i + 1), 0)) {
            reply_oom(r->c);
            return;
        }
    reply_ok(r->c);
}

static void cmd_mget(struct req *r)
{
    reply_array(r->c, (long long)(r->argc - 1));
    for (size_t i = 1; i < r->argc; i++) {
        struct entry *e = db_get(ARGP(r, i), ARGN(r, i));
        if (e)
            reply_bulk(r->c, e->val, e->vlen);
        else
            reply_nil(r->c);
    }
}

static void cmd_dbsize(struct req *r) { reply_int(r->c, (long long)db.count); }

static void cmd_flushall(struct req *r)
{
    if (r->argc > 2 || (r->argc == 2 && !arg_is(r, 1, "ASYNC") && !arg_is(r, 1, "SYNC"))) {
        reply_error(r->c, "ERR syntax error");
        return;
    }
    db_flush();
    reply_ok(r->c);
}

static void ttl_common(struct req *r, int ms)
{
    struct entry *e = db_get(ARGP(r, 1), ARGN(r, 1));
    if (!e)
        reply_int(r->c, -2);
    else if (!e->expire)
        reply_int(r->c, -1);
    else {
        int64_t left = e->expire - now_ms;
        reply_int(r->c, ms ? left : (left + 500) / 1000);
    }
}

static void cmd_ttl(struct req *r) { ttl_common(r, 0); }
static void cmd_pttl(struct req *r) { ttl_common(r, 1); }

static void expire_common(struct req *r, int seconds)
{
    long long v;
    if (!parse_ll(ARGP(r, 2), ARGN(r, 2), &v)) {
        reply_error(r->c, "ERR value is not an integer or out of range");
        return;
    }
    if (seconds && (v > LLONG_MAX / 1000 || v < LLONG_MIN / 1000)) {
        reply_error(r->c, "ERR invalid expire time in '%s' command", seconds ? "expire" : "pexpire");
        return;
    }
    long long ms = seconds ? v * 1000 : v;
    if (ms > 0 && ms > LLONG_MAX - now_ms) {
        reply_error(r->c, "ERR invalid expire time in '%s' command", seconds ? "expire" : "pexpire");
        return;
    }
    struct entry *e = db_get(ARGP(r, 1), ARGN(r, 1));
    if (!e) {
        reply_int(r->c, 0);
        return;
    }
    if (ms <= 0) /* already in the past: delete now, as Redis does */
        db_del(ARGP(r, 1), ARGN(r, 1));
    else
        set_expire(e, now_ms + ms);
    reply_int(r->c, 1);
}

static void cmd_expire(struct req *r) { expire_common(r, 1); }
static void cmd_pexpire(struct req *r) { expire_common(r, 0); }

static void cmd_persist(struct req *r)
{
    struct entry *e = db_get(ARGP(r, 1), ARGN(r, 1));
    if (!e || !e->expire) {
        reply_int(r->c, 0);
        return;
    }
    set_expire(e, 0);
    reply_int(r->c, 1);
}

static void cmd_select(struct req *r)
{
    long long v;
    if (!parse_ll(ARGP(r, 1), ARGN(r, 1), &v))
        reply_error(r->c, "ERR value is not an integer or out of range");
    else if (v != 0)
        reply_error(r->c, "ERR DB index is out of range");
    else
        reply_ok(r->c);
}

/* COMMAND and COMMAND <sub>: an empty array (clients only use it for hints). */
static void cmd_command(struct req *r) { reply_array(r->c, 0); }

/* Case-insensitive glob match supporting '*' and '?' (enough for CONFIG GET patterns). */
static int glob_match(const char *pat, size_t pn, const char *str)
{
    size_t p = 0, s = 0, star_p = (size_t)-1, star_s = 0;
    size_t sn = strlen(str);
    while (s < sn) {
        char pc = p < pn ? pat[p] : 0;
        if (pc >= 'A' && pc <= 'Z')
            pc = (char)(pc - 'A' + 'a');
        if (p < pn && pc == '*') {
            star_p = p++;
            star_s = s;
        } else if (p < pn && (pc == '?' || pc == str[s])) {
            p++;
            s++;
        } else if (star_p != (size_t)-1) {
            p = star_p + 1;
            s = ++star_s;
        } else {
            return 0;
        }
    }
    while (p < pn && pat[p] == '*')
        p++;
    return p == pn;
}

/* CONFIG GET answers for the few parameters clients ask about (redis-benchmark reads "save"
 * and "appendonly"); any other pattern gets an empty array. */
static const char *const config_params[][2] = {
    {"save", ""},
    {"appendonly", "no"},
    {"databases", "1"},
    {"maxclients", "1024"},
    {"proto-max-bulk-len", "67108864"},
};

static void cmd_config(struct req *r)
{
    if (arg_is(r, 1, "GET")) {
        if (r->argc < 3) {
            reply_error(r->c, "ERR wrong number of arguments for 'config|get' command");
            return;
        }
        size_t np = sizeof config_params / sizeof config_params[0];
        int match[sizeof config_params / sizeof config_params[0]] = {0};
        long long n = 0;
        for (size_t k = 0; k < np; k++) {
            for (size_t i = 2; i < r->argc && !match[k]; i++)
                match[k] = glob_match(ARGP(r, i), ARGN(r, i), config_params[k][0]);
            n += match[k];
        }
        reply_array(r->c, 2 * n);
        for (size_t k = 0; k < np; k++)
            if (match[k]) {
                reply_bulk(r->c, config_params[k][0], strlen(config_params[k][0]));
                reply_bulk(r->c, config_params[k][1], strlen(config_params[k][1]));
            }
    } else if (arg_is(r, 1, "RESETSTAT")) {
        reply_ok(r->c);
    } else {
        int n = ARGN(r, 1) < 128 ? (int)ARGN(r, 1) : 128;
        reply_error(r->c, "ERR unknown subcommand '%.*s'. Try CONFIG HELP.", n, ARGP(r, 1));
    }
}

static void cmd_quit(struct req *r)
{
    reply_ok(r->c);
    r->c->close_after_write = 1;
}

struct command {
    const char *name; /* upper case */
    const char *lname;
    int arity; /* > 0: exactly; < 0: at least -arity (counting the name) */
    void (*fn)(struct req *);
};

static const struct command commands[] = {
    {"GET", "get", 2, cmd_get},
    {"SET", "set", -3, cmd_set},
    {"PING", "ping", -1, cmd_ping},
    {"INCR", "incr", 2, cmd_incr},
    {"DECR", "decr", 2, cmd_decr},
    {"INCRBY", "incrby", 3, cmd_incrby},
    {"DECRBY", "decrby", 3, cmd_decrby},
    {"MGET", "mget", -2, cmd_mget},
    {"MSET", "mset", -3, cmd_mset},
    {"DEL", "del", -2, cmd_del},
    {"EXISTS", "exists", -2, cmd_exists},
    {"ECHO", "echo", 2, cmd_echo},
    {"DBSIZE", "dbsize", 1, cmd_dbsize},
    {"FLUSHALL", "flushall", -1, cmd_flushall},
    {"TTL", "ttl", 2, cmd_ttl},
    {"PTTL", "pttl", 2, cmd_pttl},
    {"EXPIRE", "expire", 3, cmd_expire},
    {"PEXPIRE", "pexpire", 3, cmd_pexpire},
    {"PERSIST", "persist", 2, cmd_persist},
    {"SELECT", "select", 2, cmd_select},
    {"COMMAND", "command", -1, cmd_command},
    {"CONFIG", "config", -2, cmd_config},
    {"QUIT", "quit", -1, cmd_quit},
};

static void execute(struct client *c)
{
    struct req r = {c, c->in.data + c->in.start, c->args, c->argc};
    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (arg_is(&r, 0, commands[i].name)) {
            cmd = &commands[i];
            break;
        }
    if (!cmd) {
        /* Redis: "unknown command 'x', with args beginning with: 'a' 'b' " */
        char args[200];
        size_t used = 0;
        args[0] = 0;
        for (size_t i = 1; i < r.argc && used < 128; i++) {
            int room = 128 - (int)used;
            int len = ARGN(&r, i) < (size_t)room ? (int)ARGN(&r, i) : room;
            int n = snprintf(args + used, sizeof args - used, "'%.*s' ", len, ARGP(&r, i));
            if (n < 0)
                break;
            used += (size_t)n;
            if (used >= sizeof args)
                used = sizeof args - 1;
        }
        int nlen = ARGN(&r, 0) < 128 ? (int)ARGN(&r, 0) : 128;
        reply_error(c, "ERR unknown command '%.*s', with args beginning with: %s", nlen,
                    ARGP(&r, 0), args);
        return;
    }
    if ((cmd->arity > 0 && r.argc != (size_t)cmd->arity) ||
        (cmd->arity < 0 && r.argc < (size_t)-cmd->arity)) {
        reply_error(c, "ERR wrong number of arguments for '%s' command", cmd->lname);
        return;
    }
    cmd->fn(&r);
}

/* ------------------------------------------------------------------ socket I/O */
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

/* Write pending output. Returns -1 if the client died, else 0. */
static int flush_output(struct client *c)
{
    while (!c->dead && buf_len(&c->out) > 0) {
        ssize_t w = sock_write(c->fd, c->out.data + c->out.start, buf_len(&c->out));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            client_kill(c);
            return -1;
        }
        c->out.start += (size_t)w;
    }
    if (c->dead)
        return -1;
    buf_idle(&c->out);
    if (c->close_after_write && buf_len(&c->out) == 0)
        client_kill(c);
    return 0;
}

/* Execute the complete requests buffered for c, as long as its pending output stays below the
 * soft limit, flushing as it goes. */
static void serve(struct client *c)
{
    for (;;) {
        int held = 0;
        while (!c->dead && !c->close_after_write) {
            if (buf_len(&c->out) >= OUT_SOFT) {
                held = 1;
                break;
            }
            if (parse_request(c) <= 0)
                break;
            execute(c);
            consume_request(c);
        }
        if (flush_output(c) < 0)
            return;
        /* Go on only if execution was held back and the flush made room below the limit. */
        if (!held || buf_len(&c->out) >= OUT_SOFT)
            return;
    }
}

static void handle_readable(struct client *c)
{
    size_t chunk = READ_CHUNK;
    if (c->want > chunk)
        chunk = c->want < READ_BIG ? c->want : READ_BIG;
    if (buf_len(&c->in) + chunk > (size_t)QUERY_LIMIT) {
        protocol_error(c, "query buffer limit exceeded");
        return;
    }
    if (buf_reserve(&c->in, chunk) != 0) {
        fprintf(stderr, "kv: out of memory for client fd %d input, closing\n", c->fd);
        client_kill(c);
        return;
    }
    ssize_t r = recv(c->fd, c->in.data + c->in.end, chunk, 0);
    if (r == 0) {
        client_kill(c);
        return;
    }
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            client_kill(c);
        return;
    }
    c->in.end += (size_t)r;
    serve(c);
}

static void client_free(struct client *c)
{
    close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    free(c->args);
    free(c);
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
                fprintf(stderr, "kv: accept: %s\n", strerror(errno));
            return;
        }
        if (nclients >= MAX_CLIENTS) {
            static const char msg[] = "-ERR max number of clients reached\r\n";
            (void)sock_write(fd, msg, sizeof msg - 1);
            close(fd);
            continue;
        }
        if (set_nonblocking(fd) != 0) {
            fprintf(stderr, "kv: cannot make client non-blocking: %s\n", strerror(errno));
            close(fd);
            continue;
        }
#ifndef __wasi__
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
#endif
        struct client *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->mb_total = -1;
        c->bulk_len = -1;
        clients[nclients++] = c;
    }
}

/* ------------------------------------------------------------------ listeners */
static int find_listeners(int argc, char **argv)
{
#ifdef __wasi__
    (void)argc;
    (void)argv;
    /* The hypervisor preopens listening sockets after the preopened directories. */
    for (int fd = 3; fd < 64 && nlisteners < MAX_LISTENERS; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) {
            listeners[nlisteners++] = fd;
            printf("kv: listener fd %d\n", fd);
        }
    }
    if (nlisteners == 0) {
        printf("kv: error: no preopened listening socket among fds 3..63\n");
        fflush(stdout);
        return -1;
    }
#else
    int port = argc > 1 ? atoi(argv[1]) : 6379;
    const char *addr = argc > 2 ? argv[2] : "0.0.0.0";
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("kv: socket");
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "kv: bad address %s\n", addr);
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 511) != 0) {
        fprintf(stderr, "kv: cannot listen on %s:%d: %s\n", addr, port, strerror(errno));
        return -1;
    }
    listeners[nlisteners++] = fd;
    printf("kv: listener %s:%d\n", addr, port);
#endif
    for (int i = 0; i < nlisteners; i++)
        if (set_nonblocking(listeners[i]) != 0) {
            printf("kv: error: cannot make listener fd %d non-blocking (errno %d)\n",
                   listeners[i], errno);
            return -1;
        }
    return 0;
}

/* ------------------------------------------------------------------ main loop */
int main(int argc, char **argv)
{
#ifndef __wasi__
    signal(SIGPIPE, SIG_IGN);
#endif
    if (db_init() != 0) {
        printf("kv: out of memory\n");
        return 1;
    }
    if (find_listeners(argc, argv) != 0)
        return 2;
    printf("kv: listening\n");
    fflush(stdout);

    static struct pollfd pfds[MAX_LISTENERS + MAX_CLIENTS];
    static struct client *pclient[MAX_LISTENERS + MAX_CLIENTS];
    now_ms = mono_ms();
    int64_t last_sweep = now_ms;

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
            /* Read only when requests can be executed (not held back by pending output). */
            if (!c->close_after_write && buf_len(&c->out) < OUT_SOFT)
                ev |= POLLIN;
            if (buf_len(&c->out) > 0)
                ev |= POLLOUT;
            if (!ev) /* nothing to wait for (WASI's poll rejects events == 0) */
                continue;
            pfds[n].fd = c->fd;
            pfds[n].events = ev;
            pfds[n].revents = 0;
            pclient[n++] = c;
        }
        int timeout = -1;
        if (db.volatile_count > 0) {
            int64_t due = last_sweep + SWEEP_INTERVAL_MS - now_ms;
            timeout = due < 0 ? 0 : (int)due;
        }
        int rc = poll(pfds, (nfds_t)n, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            printf("kv: poll failed errno=%d (%s)\n", errno, strerror(errno));
            return 1;
        }
        now_ms = mono_ms();
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
                client_kill(c);
                continue;
            }
            if (re & POLLOUT) {
                if (flush_output(c) == 0)
                    serve(c); /* requests may have been held back by the output limit */
            }
            if (!c->dead && (re & (POLLIN | POLLHUP | POLLERR)))
                handle_readable(c);
        }
        if (now_ms - last_sweep >= SWEEP_INTERVAL_MS) {
            db_sweep();
            last_sweep = now_ms;
        }
        /* Reap closed clients (order-preserving compaction). */
        int k = 0;
        for (int i = 0; i < nclients; i++) {
            if (clients[i]->dead)
                client_free(clients[i]);
            else
                clients[k++] = clients[i];
        }
        nclients = k;
    }
}
