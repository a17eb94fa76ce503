/* g3n-bench: streaming memory-read bandwidth (bandwidth.py). Usage: bandwidth BYTES PASSES -> best seconds,
   threads, checksum. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    size_t n = strtoull(argv[1], 0, 10) / sizeof(uint64_t);
    int passes = atoi(argv[2]);
    uint64_t *a = aligned_alloc(64, n * sizeof(uint64_t));
    if (!a) return 1;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 1e30;
    uint64_t check = 0;
    for (int p = 0; p < passes; p++) {
        uint64_t sum = 0;
        double t0 = omp_get_wtime();
        #pragma omp parallel for schedule(static) reduction(+:sum)
        for (size_t i = 0; i < n; i++) sum += a[i];
        double t = omp_get_wtime() - t0;
        if (t < best) best = t;
        check ^= sum;
    }
    printf("%.6f %d %llu\n", best, omp_get_max_threads(), (unsigned long long)check);
    return 0;
}
