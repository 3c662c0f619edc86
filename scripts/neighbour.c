// A CPU neighbour for scripts/cache-neighbour.sh: runs until killed.
//   neighbour alu MB   integer arithmetic only (touches nothing but registers after start-up)
//   neighbour mem MB   reads and writes one byte of every cache line of an MB-megabyte buffer
// Both do the same number of loop turns per pass, so under the same CPU budget they differ in
// what they leave in the caches, not in how much CPU they take.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "alu") != 0 && strcmp(argv[1], "mem") != 0)) {
        fprintf(stderr, "usage: neighbour alu|mem MB\n");
        return 2;
    }
    int walk = strcmp(argv[1], "mem") == 0;
    long mb = atol(argv[2]);
    if (mb < 1 || mb > 1024) {
        fprintf(stderr, "neighbour: MB must be 1..1024\n");
        return 2;
    }
    size_t n = (size_t)mb << 20;
    volatile uint8_t *buf = malloc(n);
    if (!buf) {
        fprintf(stderr, "neighbour: cannot allocate %ld MB\n", mb);
        return 1;
    }
    for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)i;
    uint64_t x = 1;
    for (;;) {
        if (walk) {
            for (size_t i = 0; i < n; i += 64) buf[i] += (uint8_t)x;
        } else {
            for (size_t i = 0; i < n; i += 64) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            buf[0] = (uint8_t)x;
        }
        x++;
    }
}
