/* compute: CPU benchmark with no I/O but its result. Each iteration runs
 *   - xorshift64* fill of a 256 KiB buffer and an FNV-1a hash over it,
 *   - a sieve of Eratosthenes up to 200000 (segment offset varies per iteration),
 *   - a 48x48 double matrix multiply,
 *   - a few steps of a 16-body gravity simulation in doubles,
 * and folds everything into a 64-bit checksum that must be identical natively and in wasm.
 * Prints its own compute time (elapsed_ms, monotonic clock), read around the loop.
 * usage: compute [ITERATIONS]   (default sized for roughly 1 s natively) */
#define _POSIX_C_SOURCE 200809L
#pragma STDC FP_CONTRACT OFF
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

#define DEFAULT_ITERS 1300
#define BUF_WORDS (256 * 1024 / 8)
#define SIEVE_N 200000
#define MAT_N 48
#define BODIES 16
#define NBODY_STEPS 40

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}

static uint64_t dbits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static uint64_t xorshift_state = 0x853c49e6748fea9bull;

static uint64_t xorshift64s(void)
{
    uint64_t x = xorshift_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    xorshift_state = x;
    return x * 0x2545f4914f6cdd1dull;
}

static uint64_t hash_phase(uint64_t *buf)
{
    for (size_t i = 0; i < BUF_WORDS; i++)
        buf[i] = xorshift64s();
    /* FNV-1a over the bytes, 8 at a time */
    uint64_t h = 0xcbf29ce484222325ull;
    const unsigned char *b = (const unsigned char *)buf;
    for (size_t i = 0; i < BUF_WORDS * 8; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t sieve_phase(unsigned char *composite, unsigned iter)
{
    unsigned n = SIEVE_N - (iter % 64) * 97; /* vary the bound a little */
    memset(composite, 0, n + 1);
    uint64_t count = 0, sum = 0;
    for (unsigned i = 2; i <= n; i++) {
        if (composite[i])
            continue;
        count++;
        sum += i;
        if ((uint64_t)i * i <= n)
            for (unsigned j = i * i; j <= n; j += i)
                composite[j] = 1;
    }
    return mix(count, sum);
}

static uint64_t matmul_phase(double *a, double *b, double *c, unsigned iter)
{
    for (int i = 0; i < MAT_N; i++)
        for (int j = 0; j < MAT_N; j++) {
            a[i * MAT_N + j] = (double)((i * 31 + j * 17 + (int)iter) % 101) / 101.0 - 0.5;
            b[i * MAT_N + j] = (double)((i * 7 + j * 13 + 3 * (int)iter) % 89) / 89.0 - 0.5;
        }
    for (int i = 0; i < MAT_N; i++)
        for (int j = 0; j < MAT_N; j++) {
            double s = 0.0;
            for (int k = 0; k < MAT_N; k++)
                s += a[i * MAT_N + k] * b[k * MAT_N + j];
            c[i * MAT_N + j] = s;
        }
    double trace = 0.0, total = 0.0;
    for (int i = 0; i < MAT_N; i++) {
        trace += c[i * MAT_N + i];
        for (int j = 0; j < MAT_N; j++)
            total += c[i * MAT_N + j];
    }
    return mix(dbits(trace), dbits(total));
}

struct body {
    double x, y, z, vx, vy, vz, m;
};

static struct body bodies[BODIES];

static void nbody_init(void)
{
    for (int i = 0; i < BODIES; i++) {
        double t = (double)i / BODIES * 6.283185307179586;
        double r = 1.0 + 0.25 * i;
        bodies[i].x = r * cos(t);
        bodies[i].y = r * sin(t);
        bodies[i].z = 0.01 * (i % 5) - 0.02;
        bodies[i].vx = -0.3 * sin(t) / sqrt(r);
        bodies[i].vy = 0.3 * cos(t) / sqrt(r);
        bodies[i].vz = 0.0;
        bodies[i].m = i == 0 ? 10.0 : 0.01 + 0.001 * i;
    }
    bodies[0].x = bodies[0].y = bodies[0].vx = bodies[0].vy = 0.0;
}

static uint64_t nbody_phase(void)
{
    const double dt = 0.001, soft = 1e-3;
    for (int s = 0; s < NBODY_STEPS; s++) {
        for (int i = 0; i < BODIES; i++)
            for (int j = i + 1; j < BODIES; j++) {
                double dx = bodies[i].x - bodies[j].x;
                double dy = bodies[i].y - bodies[j].y;
                double dz = bodies[i].z - bodies[j].z;
                double d2 = dx * dx + dy * dy + dz * dz + soft;
                double inv = 1.0 / (d2 * sqrt(d2));
                double fi = bodies[j].m * inv * dt, fj = bodies[i].m * inv * dt;
                bodies[i].vx -= dx * fi;
                bodies[i].vy -= dy * fi;
                bodies[i].vz -= dz * fi;
                bodies[j].vx += dx * fj;
                bodies[j].vy += dy * fj;
                bodies[j].vz += dz * fj;
            }
        for (int i = 0; i < BODIES; i++) {
            bodies[i].x += bodies[i].vx * dt;
            bodies[i].y += bodies[i].vy * dt;
            bodies[i].z += bodies[i].vz * dt;
        }
    }
    double e = 0.0;
    for (int i = 0; i < BODIES; i++)
        e += 0.5 * bodies[i].m *
             (bodies[i].vx * bodies[i].vx + bodies[i].vy * bodies[i].vy +
              bodies[i].vz * bodies[i].vz);
    return dbits(e);
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? strtol(argv[1], NULL, 10) : DEFAULT_ITERS;
    if (iters < 0)
        iters = 0;
    uint64_t *buf = malloc(BUF_WORDS * sizeof *buf);
    unsigned char *composite = malloc(SIEVE_N + 1);
    double *a = malloc(3 * MAT_N * MAT_N * sizeof(double));
    if (!buf || !composite || !a) {
        printf("compute: out of memory\n");
        return 1;
    }
    double *b = a + MAT_N * MAT_N, *c = b + MAT_N * MAT_N;
    nbody_init();

    /* The guest's own measure of its compute time (two clock readings through the gate), so a
     * benchmark can compare steady-state speed without process start-up and pairing. */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t h = 0, hh = 0, hs = 0, hm = 0, hn = 0;
    for (long i = 0; i < iters; i++) {
        uint64_t x = hash_phase(buf);
        uint64_t y = sieve_phase(composite, (unsigned)i);
        uint64_t z = matmul_phase(a, b, c, (unsigned)i);
        uint64_t w = nbody_phase();
        hh = mix(hh, x);
        hs = mix(hs, y);
        hm = mix(hm, z);
        hn = mix(hn, w);
        h = mix(mix(mix(mix(h, x), y), z), w);
    }
    printf("compute: iterations=%ld hash=%016" PRIx64 " sieve=%016" PRIx64 " matmul=%016" PRIx64
           " nbody=%016" PRIx64 "\n",
           iters, hh, hs, hm, hn);
    printf("checksum=%016" PRIx64 "\n", h);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("compute: elapsed_ms=%lld\n",
           (long long)(t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    free(buf);
    free(composite);
    free(a);
    return 0;
}
