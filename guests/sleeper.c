/* sleeper: long-running guest that mostly blocks in the host. For i in 0..N it sleeps MS
 * milliseconds, alternating poll(NULL, 0, ms) and nanosleep (every third iteration uses
 * nanosleep), and prints i with the elapsed CLOCK_MONOTONIC time, COPIES times (each written
 * on its own). Calls sched_yield() once.
 * usage: sleeper [N=5] [MS=100] [COPIES=1] */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 5;
    long ms = argc > 2 ? strtol(argv[2], NULL, 10) : 100;
    long copies = argc > 3 ? strtol(argv[3], NULL, 10) : 1;
    if (copies < 1)
        copies = 1;
    if (n < 0)
        n = 0;
    if (ms < 0)
        ms = 0;
    printf("sleeper: n=%ld ms=%ld\n", n, ms);
    fflush(stdout);

    int yrc = sched_yield();
    printf("sched_yield -> %d\n", yrc);

    long long start = now_ns();
    for (long i = 0; i < n; i++) {
        const char *how;
        if (i % 3 == 2) {
            how = "nanosleep";
            struct timespec req = {ms / 1000, (ms % 1000) * 1000000L};
            while (nanosleep(&req, &req) != 0) {
                if (errno != EINTR) {
                    printf("nanosleep failed errno=%d\n", errno);
                    return 1;
                }
            }
        } else {
            how = "poll";
            int rc = poll(NULL, 0, (int)ms);
            if (rc != 0) {
                printf("poll returned %d errno=%d\n", rc, errno);
                return 1;
            }
        }
        long long el = now_ns() - start;
        for (long c = 0; c < copies; c++) {
            printf("i=%ld %s elapsed_ms=%lld.%03lld\n", i, how, el / 1000000, (el / 1000) % 1000);
            fflush(stdout);
        }
    }
    long long total = now_ns() - start;
    printf("sleeper: done after %lld ms (expected >= %ld)\n", total / 1000000, n * ms);
    return 0;
}
