/* clockrand: exercises every non-deterministic source a guest can read -- clocks, clock
 * resolutions, getentropy, rand() seeded from entropy -- and prints NaN bit patterns of float
 * operations (which must be canonical under the hypervisor's NaN canonicalization).
 * usage: clockrand [N=3]   (N rounds, with a short nanosleep between) */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __wasi__
#include <wasi/api.h>
#else
#include <sys/random.h>
#endif

/* wasi-libc does not expose CLOCK_PROCESS_CPUTIME_ID (its clockid_t is an opaque pointer), so
 * under WASI call the preview1 clock functions for that clock directly. */
static int cpu_time(struct timespec *ts)
{
#ifdef __wasi__
    __wasi_timestamp_t t;
    __wasi_errno_t e = __wasi_clock_time_get(__WASI_CLOCKID_PROCESS_CPUTIME_ID, 1, &t);
    if (e != 0) {
        errno = e;
        return -1;
    }
    ts->tv_sec = (time_t)(t / 1000000000u);
    ts->tv_nsec = (long)(t % 1000000000u);
    return 0;
#else
    return clock_gettime(CLOCK_PROCESS_CPUTIME_ID, ts);
#endif
}

static int cpu_res(struct timespec *ts)
{
#ifdef __wasi__
    __wasi_timestamp_t t;
    __wasi_errno_t e = __wasi_clock_res_get(__WASI_CLOCKID_PROCESS_CPUTIME_ID, &t);
    if (e != 0) {
        errno = e;
        return -1;
    }
    ts->tv_sec = (time_t)(t / 1000000000u);
    ts->tv_nsec = (long)(t % 1000000000u);
    return 0;
#else
    return clock_getres(CLOCK_PROCESS_CPUTIME_ID, ts);
#endif
}

static void print_ts(const char *what, int rc, const struct timespec *ts)
{
    if (rc != 0)
        printf("  %-22s error errno=%d (%s)\n", what, errno, strerror(errno));
    else
        printf("  %-22s %lld.%09ld\n", what, (long long)ts->tv_sec, (long)ts->tv_nsec);
}

static uint64_t dbits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static double dfrom(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static float ffrom(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* volatile so the compiler cannot fold the NaN-producing operations at compile time. */
static volatile double vzero = 0.0, vone = 1.0, vminus1 = -1.0;
static volatile float fzero = 0.0f, fminus1 = -1.0f;

static void print_nans(void)
{
    volatile double inf = vone / vzero;
    volatile float finf = 1.0f / fzero;
    /* quiet NaNs with non-default payloads, and a signalling NaN, both signs */
    volatile double payload = dfrom(0x7ff8000000000123ull);
    volatile double npayload = dfrom(0xfff80000deadbeefull);
    volatile double snan = dfrom(0x7ff0000000000001ull);
    volatile float fpayload = ffrom(0x7fc00abcu);
    volatile float fsnan = ffrom(0x7f800001u);

    printf("nan bits:\n");
    printf("  f64 0/0            %016" PRIx64 "\n", dbits(vzero / vzero));
    printf("  f64 sqrt(-1)       %016" PRIx64 "\n", dbits(sqrt(vminus1)));
    printf("  f64 inf-inf        %016" PRIx64 "\n", dbits(inf - inf));
    printf("  f64 0*inf          %016" PRIx64 "\n", dbits(vzero * inf));
    printf("  f64 payload+1      %016" PRIx64 "\n", dbits(payload + vone));
    printf("  f64 -payload*1     %016" PRIx64 "\n", dbits(npayload * vone));
    printf("  f64 snan+0         %016" PRIx64 "\n", dbits(snan + vzero));
    printf("  f64 payload+npay   %016" PRIx64 "\n", dbits(payload + npayload));
    printf("  f64 -(0/0)         %016" PRIx64 "\n", dbits(-(vzero / vzero)));
    printf("  f32 0/0            %08" PRIx32 "\n", fbits(fzero / fzero));
    printf("  f32 sqrtf(-1)      %08" PRIx32 "\n", fbits(sqrtf(fminus1)));
    printf("  f32 inf-inf        %08" PRIx32 "\n", fbits(finf - finf));
    printf("  f32 payload*2      %08" PRIx32 "\n", fbits(fpayload * 2.0f));
    printf("  f32 snan-0         %08" PRIx32 "\n", fbits(fsnan - fzero));
    printf("  f32 (float)payload %08" PRIx32 "\n", fbits((float)payload));
    printf("  f64 (double)fpay   %016" PRIx64 "\n", dbits((double)fpayload));
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    if (rounds < 0)
        rounds = 0;
    struct timespec ts;
    int rc;

    printf("clockrand: %d rounds\n", rounds);
    printf("resolutions:\n");
    rc = clock_getres(CLOCK_REALTIME, &ts);
    print_ts("CLOCK_REALTIME", rc, &ts);
    rc = clock_getres(CLOCK_MONOTONIC, &ts);
    print_ts("CLOCK_MONOTONIC", rc, &ts);
    rc = cpu_res(&ts);
    print_ts("CLOCK_PROCESS_CPUTIME", rc, &ts);

    unsigned char seed_bytes[sizeof(unsigned)];
    if (getentropy(seed_bytes, sizeof seed_bytes) != 0) {
        printf("getentropy(seed) failed errno=%d\n", errno);
        return 1;
    }
    unsigned seed;
    memcpy(&seed, seed_bytes, sizeof seed);
    srand(seed);
    printf("srand seed %08x\n", seed);

    for (int r = 0; r < rounds; r++) {
        printf("round %d:\n", r);
        rc = clock_gettime(CLOCK_REALTIME, &ts);
        print_ts("CLOCK_REALTIME", rc, &ts);
        rc = clock_gettime(CLOCK_MONOTONIC, &ts);
        print_ts("CLOCK_MONOTONIC", rc, &ts);
        rc = cpu_time(&ts);
        print_ts("CLOCK_PROCESS_CPUTIME", rc, &ts);
        printf("  time()                 %lld\n", (long long)time(NULL));

        unsigned char buf[16];
        if (getentropy(buf, sizeof buf) != 0) {
            printf("  getentropy failed errno=%d\n", errno);
            return 1;
        }
        printf("  entropy                ");
        for (size_t i = 0; i < sizeof buf; i++)
            printf("%02x", buf[i]);
        printf("\n  rand()                ");
        for (int i = 0; i < 4; i++)
            printf(" %d", rand());
        printf("\n");
        fflush(stdout);

        struct timespec nap = {0, 20 * 1000 * 1000}; /* 20 ms */
        while (nanosleep(&nap, &nap) != 0 && errno == EINTR) {
        }
    }
    print_nans();
    printf("clockrand: done\n");
    return 0;
}
