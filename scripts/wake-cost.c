// What a thread wake-up costs on this machine (issue 4's benchmarks): two processes pass one byte
// back and forth over a pair of pipes, each blocking in read() until the other writes, either
// both pinned to CPU 0 or one on CPU 0 and one on CPU 1. Prints, per round trip (two wake-ups),
// the wall time and the CPU time (user + system) of each side.
// Usage: wake-cost [ROUND_TRIPS]          (built and run by scripts/wake-cost.sh)
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ROUND_TRIPS 1000000

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec * 1e-6; }

static double cpu_of(int who) {
    struct rusage r;
    getrusage(who, &r);
    return seconds(r.ru_utime) + seconds(r.ru_stime);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void full(ssize_t n) {
    if (n != 1) {
        perror("pipe");
        exit(1);
    }
}

static void measure(const char *name, int other_cpu, long n) {
    int there[2], back[2];
    if (pipe(there) != 0 || pipe(back) != 0) {
        perror("pipe");
        exit(1);
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        exit(1);
    }
    char c = 'x';
    if (child == 0) {
        pin(other_cpu);
        for (long i = 0; i < n; i++) {
            full(read(there[0], &c, 1));
            full(write(back[1], &c, 1));
        }
        _exit(0);
    }
    pin(0);
    double cpu0 = cpu_of(RUSAGE_SELF), t0 = now();
    for (long i = 0; i < n; i++) {
        full(write(there[1], &c, 1));
        full(read(back[0], &c, 1));
    }
    double wall = now() - t0, cpu = cpu_of(RUSAGE_SELF) - cpu0;
    int status;
    waitpid(child, &status, 0);
    double child_cpu = cpu_of(RUSAGE_CHILDREN);
    static double children_before;
    child_cpu -= children_before;
    children_before += child_cpu;
    printf("%-10s round trip %6.2f us wall, CPU %6.2f us (this side) + %6.2f us (other side)\n", name,
           wall / n * 1e6, cpu / n * 1e6, child_cpu / n * 1e6);
    close(there[0]);
    close(there[1]);
    close(back[0]);
    close(back[1]);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000;
    if (n < 1 || n > MAX_ROUND_TRIPS) {
        fprintf(stderr, "wake-cost: ROUND_TRIPS must be 1..%d\n", MAX_ROUND_TRIPS);
        return 2;
    }
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2) {
        fprintf(stderr, "wake-cost: needs two CPUs\n");
        return 2;
    }
    measure("same CPU", 0, n);
    measure("two CPUs", 1, n);
    return 0;
}
