/* fsx: file-system exerciser over a preopened directory.
 * usage: fsx [DIR=/data]
 * Works inside DIR/fsx.tmp (removed at the end), and keeps DIR/counter.txt, incremented on every
 * run, so a restarted or failed-over VM shows whether its disk state carried over.
 * Prints every result (errors by symbolic errno name, so native and wasm output compare) and a
 * final FNV-1a checksum of all bytes and names it read. Exit code: number of unexpected failures
 * (capped at 100), 0 when everything behaved. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int failures;
static uint64_t checksum = 0xcbf29ce484222325ull; /* FNV-1a 64 offset basis */

static void absorb(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        checksum ^= b[i];
        checksum *= 0x100000001b3ull;
    }
}

static const char *errname(int e)
{
    switch (e) {
    case 0: return "OK";
    case EACCES: return "EACCES";
    case EBADF: return "EBADF";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case EISDIR: return "EISDIR";
    case ELOOP: return "ELOOP";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOENT: return "ENOENT";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case ENOTDIR: return "ENOTDIR";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ENOTSUP: return "ENOTSUP";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case EXDEV: return "EXDEV";
    case EIO: return "EIO";
#ifdef ENOTCAPABLE
    case ENOTCAPABLE: return "ENOTCAPABLE";
#endif
    default: return "E?";
    }
}

/* Report an operation that must succeed. */
static int must(int ok, const char *what)
{
    if (!ok) {
        int e = errno;
        printf("FAIL %s: %s (%d)\n", what, errname(e), e);
        failures++;
        errno = e;
    }
    return ok;
}

/* Report an operation whose errno is the point (may succeed or fail). */
static void show_errno(const char *what, int rc)
{
    if (rc < 0)
        printf("%s -> -1 %s\n", what, errname(errno));
    else
        printf("%s -> %d\n", what, rc);
}

static const char *ftype(mode_t m)
{
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "dir";
    if (S_ISLNK(m)) return "symlink";
    if (S_ISSOCK(m)) return "socket";
    if (S_ISCHR(m)) return "chardev";
    if (S_ISBLK(m)) return "blockdev";
    if (S_ISFIFO(m)) return "fifo";
    return "unknown";
}

static void print_stat(const char *label, const struct stat *st)
{
    printf("stat %s: type=%s size=%lld nlink=%llu ino=%llu mtime=%lld.%09ld\n", label,
           ftype(st->st_mode), (long long)st->st_size, (unsigned long long)st->st_nlink,
           (unsigned long long)st->st_ino, (long long)st->st_mtim.tv_sec,
           (long)st->st_mtim.tv_nsec);
}

static void stat_path(const char *path, const char *label)
{
    struct stat st;
    if (must(stat(path, &st) == 0, label))
        print_stat(label, &st);
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read the whole of fd from its current offset; absorbs the bytes; returns the count or -1. */
static long read_rest(int fd)
{
    char buf[1024];
    long total = 0;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            return total;
        absorb(buf, (size_t)r);
        total += r;
    }
}

/* Remove a tree left by an earlier, interrupted run (two levels are all fsx ever creates). */
static void remove_tree(const char *path, int depth)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return;
    if (!S_ISDIR(st.st_mode) || depth > 4) {
        unlink(path);
        return;
    }
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        char child[1024];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(child, sizeof child, "%s/%s", path, e->d_name);
            remove_tree(child, depth + 1);
        }
        closedir(d);
    }
    rmdir(path);
}

static void list_dir(const char *path, const char *label)
{
    DIR *d = opendir(path);
    if (!must(d != NULL, "opendir"))
        return;
    printf("readdir %s (host order):", label);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)) != NULL) {
        printf(" %s", e->d_name);
        absorb(e->d_name, strlen(e->d_name));
        n++;
    }
    printf("  [%d entries]\n", n);
    closedir(d);
}

static void counter(const char *base)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/counter.txt", base);
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (!must(fd >= 0, "open counter.txt"))
        return;
    char buf[64];
    ssize_t r = read(fd, buf, sizeof buf - 1);
    long value = 0;
    if (must(r >= 0, "read counter.txt")) {
        buf[r] = 0;
        absorb(buf, (size_t)r);
        value = strtol(buf, NULL, 10);
    }
    value++;
    int len = snprintf(buf, sizeof buf, "%ld\n", value);
    must(lseek(fd, 0, SEEK_SET) == 0, "lseek counter.txt");
    must(ftruncate(fd, 0) == 0, "ftruncate counter.txt");
    must(write_all(fd, buf, (size_t)len) == 0, "write counter.txt");
    must(fsync(fd) == 0, "fsync counter.txt");
    close(fd);
    printf("counter=%ld\n", value);
}

/* `fsx DIR fill`: write DIR/fill.bin in chunks of 100000 bytes until the disk refuses (at most
 * 64 chunks), printing what each write(2) returned: on a disk that fills up, a short write and
 * then ENOSPC. Then read the file back. */
static int fill(const char *base)
{
    static char chunk[100000];
    char path[600];
    snprintf(path, sizeof path, "%s/fill.bin", base);
    for (size_t i = 0; i < sizeof chunk; i++)
        chunk[i] = (char)(i * 7 + 1);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) {
        printf("fill: open %s\n", errname(errno));
        return 1;
    }
    for (int i = 0; i < 64; i++) {
        ssize_t w = write(fd, chunk, sizeof chunk);
        if (w < 0) {
            printf("fill: write %d: %s\n", i, errname(errno));
            break;
        }
        printf("fill: write %d: %zd bytes\n", i, w);
    }
    close(fd);
    fd = open(path, O_RDONLY);
    if (fd < 0) {
        printf("fill: reopen %s\n", errname(errno));
        return 1;
    }
    long n = read_rest(fd);
    close(fd);
    printf("fill: read back %ld bytes, checksum=%016" PRIx64 "\n", n, checksum);
    return 0;
}

int main(int argc, char **argv)
{
    const char *base = argc > 1 ? argv[1] : "/data";
    if (argc > 2 && strcmp(argv[2], "fill") == 0)
        return fill(base);
    char work[512], a[600], b[600], sub[600], renamed[700], link[600], path[700];
    snprintf(work, sizeof work, "%s/fsx.tmp", base);
    snprintf(a, sizeof a, "%s/a.txt", work);
    snprintf(b, sizeof b, "%s/b.txt", work);
    snprintf(sub, sizeof sub, "%s/sub", work);
    snprintf(renamed, sizeof renamed, "%s/renamed.txt", sub);
    snprintf(link, sizeof link, "%s/link", work);

    printf("fsx: base=%s\n", base);
    stat_path(base, "base");
    counter(base);

    remove_tree(work, 0);
    if (!must(mkdir(work, 0755) == 0, "mkdir work")) {
        printf("fsx: cannot continue\n");
        return 100;
    }
    show_errno("mkdir work again", mkdir(work, 0755));
    stat_path(work, "work");

    /* --- create and write a.txt --- */
    int fd = open(a, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (must(fd >= 0, "create a.txt")) {
        char line[64];
        for (int i = 0; i < 100; i++) {
            int n = snprintf(line, sizeof line, "line %03d of the fsx test file\n", i);
            must(write_all(fd, line, (size_t)n) == 0, "write a.txt");
        }
        off_t pos = lseek(fd, 0, SEEK_CUR);
        printf("a.txt tell after write = %lld\n", (long long)pos);
        must(fsync(fd) == 0, "fsync a.txt");
        struct stat st;
        if (must(fstat(fd, &st) == 0, "fstat a.txt"))
            print_stat("a.txt(fstat)", &st);
        show_errno("read on O_WRONLY fd", (int)read(fd, line, 1));
        close(fd);
    }

    /* --- read, pread/pwrite, lseek --- */
    fd = open(a, O_RDWR);
    if (must(fd >= 0, "open a.txt rw")) {
        long n = read_rest(fd);
        printf("a.txt read %ld bytes\n", n);
        must(pwrite(fd, "PWRITE", 6, 10) == 6, "pwrite");
        char buf[64] = {0};
        ssize_t r = pread(fd, buf, 20, 5);
        if (must(r == 20, "pread")) {
            absorb(buf, (size_t)r);
            printf("pread@5: \"%.*s\"\n", (int)r, buf);
        }
        printf("tell after pread/pwrite = %lld (unchanged)\n", (long long)lseek(fd, 0, SEEK_CUR));
        off_t end = lseek(fd, 0, SEEK_END);
        printf("lseek END = %lld\n", (long long)end);
        off_t p = lseek(fd, 100, SEEK_SET);
        r = read(fd, buf, 16);
        if (must(p == 100 && r == 16, "lseek+read")) {
            absorb(buf, 16);
            printf("read@100: \"%.16s\"\n", buf);
        }
        printf("lseek CUR-6 = %lld\n", (long long)lseek(fd, -6, SEEK_CUR));
        show_errno("lseek negative", (int)lseek(fd, -100000, SEEK_SET));
        /* write past EOF: leaves a hole of zeros */
        must(pwrite(fd, "TAIL\n", 5, end + 4096) == 5, "pwrite past end");
        struct stat st;
        if (must(fstat(fd, &st) == 0, "fstat after hole"))
            printf("size after hole = %lld\n", (long long)st.st_size);
        must(lseek(fd, 0, SEEK_SET) == 0, "rewind");
        printf("a.txt reread %ld bytes\n", read_rest(fd));
        must(ftruncate(fd, 50) == 0, "ftruncate 50");
        if (must(fstat(fd, &st) == 0, "fstat after truncate"))
            printf("size after truncate = %lld\n", (long long)st.st_size);
        must(fdatasync(fd) == 0, "fdatasync");
        close(fd);
    }
    show_errno("open a.txt O_CREAT|O_EXCL", open(a, O_CREAT | O_EXCL | O_WRONLY, 0644));
    show_errno("open dir O_WRONLY", open(work, O_WRONLY));

    /* --- stdio --- */
    FILE *f = fopen(b, "w");
    if (must(f != NULL, "fopen b.txt w")) {
        for (int i = 0; i < 10; i++)
            fprintf(f, "stdio line %d\n", i);
        printf("b.txt ftell = %ld\n", ftell(f));
        must(fclose(f) == 0, "fclose b.txt");
    }
    f = fopen(b, "a+");
    if (must(f != NULL, "fopen b.txt a+")) {
        fputs("appended\n", f);
        rewind(f);
        char line[128];
        int lines = 0;
        while (fgets(line, sizeof line, f)) {
            absorb(line, strlen(line));
            lines++;
        }
        printf("b.txt lines=%d last=%s", lines, lines ? line : "\n");
        fclose(f);
    }

    /* --- subdirectory with several entries; readdir in host order --- */
    must(mkdir(sub, 0755) == 0, "mkdir sub");
    static const char *names[] = {"zeta", "alpha", "mid", "Beta", "0num", "long-name-with.dots.txt"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", sub, names[i]);
        int g = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
        if (must(g >= 0, "create sub file")) {
            must(write_all(g, names[i], strlen(names[i])) == 0, "write sub file");
            close(g);
        }
    }
    list_dir(work, "work");
    list_dir(sub, "sub");

    /* --- rename --- */
    must(rename(a, renamed) == 0, "rename a.txt -> sub/renamed.txt");
    struct stat st;
    show_errno("stat old name", stat(a, &st));
    stat_path(renamed, "renamed.txt");
    show_errno("rename missing", rename(a, b));
    snprintf(path, sizeof path, "%s/zeta", sub);
    must(rename(path, b) == 0, "rename over existing b.txt");
    if ((fd = open(b, O_RDONLY)) >= 0) {
        printf("b.txt now %ld bytes\n", read_rest(fd));
        close(fd);
    }

    /* --- symlink (may be unsupported by the host) --- */
    int rc = symlink("b.txt", link);
    show_errno("symlink", rc);
    if (rc == 0) {
        char target[256];
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n >= 0) {
            target[n] = 0;
            printf("readlink -> %s\n", target);
        } else {
            show_errno("readlink", -1);
        }
        if (lstat(link, &st) == 0)
            printf("lstat link type=%s\n", ftype(st.st_mode));
        must(unlink(link) == 0, "unlink link");
    }

    /* --- errors --- */
    snprintf(path, sizeof path, "%s/missing.txt", work);
    show_errno("open missing", open(path, O_RDONLY));
    snprintf(path, sizeof path, "%s/missing/x", work);
    show_errno("open missing/x O_CREAT", open(path, O_CREAT | O_WRONLY, 0644));
    snprintf(path, sizeof path, "%s/../../fsx-escape", base);
    rc = open(path, O_CREAT | O_WRONLY, 0644);
    show_errno("open outside preopen", rc < 0 ? rc : 0);
    if (rc >= 0) { /* natively there is no sandbox: undo */
        close(rc);
        unlink(path);
    }
    show_errno("rmdir non-empty", rmdir(sub));
    show_errno("unlink dir", unlink(sub));
    show_errno("mkdir under file", mkdir(renamed, 0755) == 0 ? 0 : -1);

    /* --- cleanup --- */
    for (size_t i = 1; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", sub, names[i]);
        must(unlink(path) == 0, "unlink sub file");
    }
    must(unlink(renamed) == 0, "unlink renamed.txt");
    must(unlink(b) == 0, "unlink b.txt");
    must(rmdir(sub) == 0, "rmdir sub");
    list_dir(work, "work(empty)");
    must(rmdir(work) == 0, "rmdir work");
    show_errno("stat removed work", stat(work, &st));

    printf("fsx: failures=%d checksum=%016" PRIx64 "\n", failures, checksum);
    return failures > 100 ? 100 : failures;
}
