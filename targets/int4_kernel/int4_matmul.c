/* g3n's int4 x int8 matmul microkernels, linked into IREE's CPU executables (hal.executable.objects).

   y[m, n] = sum_g f16(ws[n, g]) * xd[m, g] * sum_{k in group g} (code(n, k) - 8) * xq[m, k]

   The operand layouts (weights as unsigned codes + 8 in superblocks of S = min(G, 16) groups, activations
   as Q8_0 int8 in the matching order) are specified in layout.py, next to the code that writes them; a
   32-bit lane holds 4 consecutive k of one group, so vpdpbusd leaves each group's dot product in its own
   lane. The -8 of the unsigned codes is applied once per group as -8 * sum(xq) (computed here per call,
   reused for every row).

   ABI: IREE passes each buffer as (base pointer, offset in elements) and the workgroup's rows
   [row_begin, row_end). Freestanding: no libc, no globals with relocations, no stack protector.
   Variants: g3n_q4_matmul_avx512vnni (AVX-512 F/BW/VL + VNNI + F16C), _avx2 (AVX2 + FMA + F16C),
   _scalar (portable C, the reference). Only the variant named by G3N_ISA is compiled. */

#include <stddef.h>
#include <stdint.h>

#define MAX_GROUPS 1024 /* K <= 32768: the per-call group sums live on the stack */
#define M_BLOCK 4       /* activation rows that share one read of a weight row */
/* With several row blocks (prefill), a pass over the weight rows covers K_CHUNK activations per row, so the
   block's 4 x 2 KiB stay in L1 while the weights stream: at K = 8192, M = 128 one core went from 103-132 to
   140-168 GOP/s (K = 1024-4096 chunks alike). One row block (decode) reads each weight row in one go. */
#define K_CHUNK 2048

#define G3N_KERNEL(isa) g3n_q4_matmul_##isa
#define G3N_NAME(isa) G3N_KERNEL(isa)
#define ARGS                                                                                       \
  const int8_t *xq, size_t xq_off, const float *xd, size_t xd_off, const uint8_t *w, size_t w_off, \
      const uint16_t *ws, size_t ws_off, float *y, size_t y_off, size_t M, size_t N, size_t K,     \
      size_t row_begin, size_t row_end

#if !defined(G3N_ISA_avx512vnni)
/* neg_sum8[s] = -8 * sum of the 32 activations of group s, for the B superblocks of one row. */
static void group_sums(const int8_t *x, int32_t *neg_sum8, size_t S, size_t B) {
  for (size_t b = 0; b < B; ++b)
    for (size_t s = 0; s < S; ++s) {
      int32_t sum = 0;
      for (int j = 0; j < 8; ++j)
        for (int i = 0; i < 4; ++i) sum += x[(b * 8 + j) * 4 * S + 4 * s + i];
      neg_sum8[b * S + s] = -8 * sum;
    }
}

#endif

#if defined(G3N_ISA_avx512vnni)
#include <immintrin.h>

/* 4 * S bytes (S lanes of 4 bytes) and S lanes of 2 and 4 bytes: plain loads for whole superblocks. */
static inline __attribute__((always_inline)) __m512i load_bytes(const void *p, size_t S) {
  return S == 16 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(((__mmask64)1 << (4 * S)) - 1, p);
}
static inline __attribute__((always_inline)) __m512 load_scales(const uint16_t *p, size_t S) {
  return _mm512_cvtph_ps(S == 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16((__mmask16)((1u << S) - 1), p));
}
static inline __attribute__((always_inline)) __m512 load_floats(const float *p, size_t S) {
  return S == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << S) - 1), p);
}

/* Weight row n against activation rows m0 .. m0 + MB - 1 over superblocks b0 .. b1 - 1 (added to y unless
   b0 = 0). MB and, for whole superblocks, S are constants after inlining, so every offset below is an
   immediate and the activation loads fold into vpdpbusd.
   Each superblock starts fresh integer sums: out-of-order execution overlaps successive superblocks'
   vpdpbusd chains (interleaving 2-4 weight rows instead measured 1.5-2x slower on a K = 2048 matvec, on a
   shared machine: it breaks the sequential stream). The prefetch runs 2 KiB ahead in the row (+15 % on
   one core for a 76 MB matrix, also measured on a shared machine). */
static inline __attribute__((always_inline)) void row_avx512(
    int MB, const int8_t *xq, const float *xd, const uint8_t *wrow, const uint16_t *wsrow,
    const int32_t (*neg_sum8)[MAX_GROUPS], float *y, size_t N, size_t G, size_t S, size_t B, size_t b0,
    size_t b1) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[M_BLOCK];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t *wb = wrow + b * 16 * S;
    for (int line = 0; line < 4; ++line) _mm_prefetch((const char *)wb + 2048 + 64 * line, _MM_HINT_T0);
    __m512i dot[M_BLOCK];
    for (int r = 0; r < MB; ++r) dot[r] = load_bytes(neg_sum8[r] + b * S, S);
    for (int c = 0; c < 4; ++c) {
      __m512i v = load_bytes(wb + c * 4 * S, S);
      __m512i lo = _mm512_and_si512(v, nibble);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int r = 0; r < MB; ++r) {
        const int8_t *xb = xq + ((size_t)r * B + b) * 32 * S;
        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, load_bytes(xb + c * 4 * S, S));
        dot[r] = _mm512_dpbusd_epi32(dot[r], hi, load_bytes(xb + (4 + c) * 4 * S, S));
      }
    }
    __m512 scale = load_scales(wsrow + b * S, S);
    for (int r = 0; r < MB; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), load_floats(xd + r * G + b * S, S)), scale, acc[r]);
  }
  for (int r = 0; r < MB; ++r) y[r * N] = (b0 ? y[r * N] : 0.0f) + _mm512_reduce_add_ps(acc[r]);
}

/* neg_sum8[s] = -8 * sum of the 32 activations of group s, for the B superblocks of one row. */
static void group_sums(const int8_t *x, int32_t *neg_sum8, size_t S, size_t B) {
  const __mmask64 bytes = S == 16 ? ~(__mmask64)0 : (((__mmask64)1 << (4 * S)) - 1);
  const __mmask16 lanes = (__mmask16)((1u << S) - 1);
  const __m512i ones = _mm512_set1_epi8(1);
  for (size_t b = 0; b < B; ++b) {
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j)
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(bytes, x + (b * 8 + j) * 4 * S));
    _mm512_mask_storeu_epi32(neg_sum8 + b * S, lanes, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 3)));
  }
}

#define ROW(MB)                                                                                                  \
  (S == 16 ? row_avx512(MB, xq + m0 * K, xd + m0 * G, w + n * K / 2, ws + n * G, neg_sum8, y + m0 * N + n, N, G, 16, B, b0, b1) \
           : row_avx512(MB, xq + m0 * K, xd + m0 * G, w + n * K / 2, ws + n * G, neg_sum8, y + m0 * N + n, N, G, S, B, b0, b1))

#elif defined(G3N_ISA_avx2)
#include <immintrin.h>

/* Lanes [8h, 8h + n) of a 16-lane chunk of 4-byte lanes (n <= 8), zero beyond. */
static inline __attribute__((always_inline)) __m256i load_lanes(const void *p, int n) {
  if (n >= 8) return _mm256_loadu_si256((const __m256i *)p);
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_epi32((const int *)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), index));
}

static inline __attribute__((always_inline)) __m256 load_scales(const uint16_t *p, int n) {
  uint16_t h[8] = {0};
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
  for (int i = 0; i < n; ++i) h[i] = p[i];
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

static inline __attribute__((always_inline)) float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void row_avx2(
    int MB, const int8_t *xq, const float *xd, const uint8_t *wrow, const uint16_t *wsrow,
    const int32_t (*neg_sum8)[MAX_GROUPS], float *y, size_t N, size_t G, size_t S, size_t B, size_t b0,
    size_t b1) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
  __m256 acc[M_BLOCK];
  for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
  for (size_t b = b0; b < b1; ++b)
    for (int h = 0; h < 2; ++h) {  /* groups 8h .. 8h + 7 of the superblock */
      int n = (int)S - 8 * h;
      if (n <= 0) break;
      const uint8_t *wb = wrow + b * 16 * S + 32 * h;
      __m256i dot[M_BLOCK];
      for (int r = 0; r < MB; ++r) dot[r] = load_lanes(neg_sum8[r] + b * S + 8 * h, n);
      for (int c = 0; c < 4; ++c) {
        __m256i v = load_lanes(wb + c * 4 * S, n);
        __m256i lo = _mm256_and_si256(v, nibble);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int r = 0; r < MB; ++r) {
          const int8_t *xb = xq + ((size_t)r * B + b) * 32 * S + 32 * h;
          /* u8 x s8 pair sums stay within int16: 2 * 2 * 15 * 128 < 32768 */
          __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load_lanes(xb + c * 4 * S, n)),
                                       _mm256_maddubs_epi16(hi, load_lanes(xb + (4 + c) * 4 * S, n)));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones16));
        }
      }
      __m256 scale = load_scales(wsrow + b * S + 8 * h, n);
      for (int r = 0; r < MB; ++r) {
        __m256 xs = n >= 8 ? _mm256_loadu_ps(xd + r * G + b * S + 8 * h)
                           : _mm256_castsi256_ps(load_lanes(xd + r * G + b * S + 8 * h, n));
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot[r]), xs), scale, acc[r]);
      }
    }
  for (int r = 0; r < MB; ++r) y[r * N] = (b0 ? y[r * N] : 0.0f) + hsum(acc[r]);
}

#define ROW(MB) row_avx2(MB, xq + m0 * K, xd + m0 * G, w + n * K / 2, ws + n * G, neg_sum8, y + m0 * N + n, N, G, S, B, b0, b1)

#else /* scalar */

static float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023, bits;
  if (e == 0 && m == 0) {
    bits = sign;
  } else if (e == 0) { /* subnormal: normalize */
    e = 113;
    while (!(m & 1024)) { m <<= 1; --e; }
    bits = sign | (e << 23) | ((m & 1023) << 13);
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  union { uint32_t u; float f; } v = {bits};
  return v.f;
}

static void row_scalar(int MB, const int8_t *xq, const float *xd, const uint8_t *wrow, const uint16_t *wsrow,
                       const int32_t (*neg_sum8)[MAX_GROUPS], float *y, size_t N, size_t G, size_t S, size_t B, size_t b0,
    size_t b1) {
  for (int r = 0; r < MB; ++r) {
    float acc = 0;
    for (size_t b = b0; b < b1; ++b)
      for (size_t s = 0; s < S; ++s) {
        int32_t dot = neg_sum8[r][b * S + s];
        for (int c = 0; c < 4; ++c)
          for (int i = 0; i < 4; ++i) {
            uint8_t v = wrow[b * 16 * S + c * 4 * S + 4 * s + i];
            const int8_t *xb = xq + ((size_t)r * B + b) * 32 * S + 4 * s + i;
            dot += (v & 15) * xb[c * 4 * S] + (v >> 4) * xb[(4 + c) * 4 * S];
          }
        acc += f16_to_f32(wsrow[b * S + s]) * xd[r * G + b * S + s] * (float)dot;
      }
    y[r * N] = (b0 ? y[r * N] : 0.0f) + acc;
  }
}

#define ROW(MB) row_scalar(MB, xq + m0 * K, xd + m0 * G, w + n * K / 2, ws + n * G, neg_sum8, y + m0 * N + n, N, G, S, B, b0, b1)

#endif

void G3N_NAME(G3N_ISA)(ARGS) {
  xq += xq_off; xd += xd_off; w += w_off; ws += ws_off; y += y_off;
  if (row_end > N) row_end = N;
  const size_t G = K / 32, S = G < 16 ? G : 16, B = G / S;
  int32_t neg_sum8[M_BLOCK][MAX_GROUPS];
  if (G == 0 || G > MAX_GROUPS || G % S) return; /* shapes the pass never emits */
  const size_t BC = M > M_BLOCK && B * 32 * S > K_CHUNK ? K_CHUNK / (32 * S) : B;
  for (size_t m0 = 0; m0 < M; m0 += M_BLOCK) {
    size_t mb = M - m0 < M_BLOCK ? M - m0 : M_BLOCK;
    for (size_t r = 0; r < mb; ++r) group_sums(xq + (m0 + r) * K, neg_sum8[r], S, B);
    for (size_t b0 = 0; b0 < B; b0 += BC) {
      const size_t b1 = B - b0 < BC ? B : b0 + BC;
      for (size_t n = row_begin; n < row_end; ++n) switch (mb) {
          case 4: ROW(4); break;
          case 3: ROW(3); break;
          case 2: ROW(2); break;
          default: ROW(1); break;
        }
    }
  }
}
