/* g3n-bench: the int4 kernel alone (kernel.py), linked with the object IREE links; KERNEL is the variant's
   symbol (-DKERNEL=...). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef __AVX512VNNI__
#include <immintrin.h>
#endif

void KERNEL(const int8_t *, size_t, const float *, size_t, const uint8_t *, size_t, const uint16_t *, size_t, float *,
            size_t, size_t, size_t, size_t, size_t, size_t);
static size_t M, N, K, rows, threads;
static long peak_steps;
static int8_t *xq; static float *xd, *y; static uint8_t *w; static uint16_t *ws;
static atomic_size_t next_row;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static void *matmul_worker(void *unused) {
  for (size_t b; (b = atomic_fetch_add(&next_row, rows)) < N;) KERNEL(xq, 0, xd, 0, w, 0, ws, 0, y, 0, M, N, K, b, b + rows);
  return unused;
}

#define DPBUSD(a) a = _mm512_dpbusd_epi32(a, u, s);
static void *peak_worker(void *out) {  /* 8 independent chains, spelled out: an array would live in memory */
#ifdef __AVX512VNNI__
  __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2), a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1),
          a2 = _mm512_set1_epi32(2), a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7);
  for (long n = 0; n < peak_steps; ++n) { DPBUSD(a0) DPBUSD(a1) DPBUSD(a2) DPBUSD(a3) DPBUSD(a4) DPBUSD(a5) DPBUSD(a6) DPBUSD(a7) }
  a0 = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                        _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  *(int *)out = _mm512_reduce_add_epi32(a0);
#endif
  return out;
}

static double timed(void *(*fn)(void *)) {  /* one pass on all threads */
  pthread_t th[256]; int out[256];
  double t0 = now();
  next_row = 0;
  for (size_t i = 1; i < threads; ++i) pthread_create(&th[i], 0, fn, &out[i]);
  fn(&out[0]);
  for (size_t i = 1; i < threads; ++i) pthread_join(th[i], 0);
  return now() - t0;
}

int main(int argc, char **argv) {  /* peak THREADS STEPS | matmul THREADS M N K ROWS PASSES: prints seconds (best) */
  threads = atol(argv[2]);
  if (threads < 1 || threads > 256) return 1;
  if (argv[1][0] == 'p') { peak_steps = atol(argv[3]); printf("%.6f\n", timed(peak_worker)); return 0; }
  M = atol(argv[3]); N = atol(argv[4]); K = atol(argv[5]); rows = atol(argv[6]);
  int passes = atoi(argv[7]);
  xq = malloc(M * K); xd = malloc(M * K / 8); y = malloc(M * N * 4); w = malloc(N * K / 2); ws = malloc(N * K / 16);
  if (!xq || !xd || !y || !w || !ws) return 1;
  srand(1);
  for (size_t i = 0; i < M * K; ++i) xq[i] = (int8_t)rand();
  for (size_t i = 0; i < N * K / 2; ++i) w[i] = (uint8_t)rand();
  for (size_t i = 0; i < M * K / 32; ++i) xd[i] = 1e-3f * (rand() % 100);
  for (size_t i = 0; i < N * K / 32; ++i) ws[i] = 0x2000 + rand() % 512;  /* f16 around 0.008 */
  double best = timed(matmul_worker);
  for (int p = 1; p < passes; ++p) { double t = timed(matmul_worker); if (t < best) best = t; }
  printf("%.6f\n", best);
  return 0;
}
