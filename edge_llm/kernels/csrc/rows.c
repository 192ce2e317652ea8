/* Row kernels, compiled once per instruction set (EL_ISA names it: avx2 with -mavx2 -mfma -mf16c; generic
 * without flags, which on arm64 means NEON). Written with GCC/Clang vector types so one source serves all.
 *
 * Summation order, fixed for a row whatever else is computed with it: per 32-value block, two partial
 * products (values 0-7 and 16-23 of the block as loaded, then 8-15 and 24-31) added, times the group's
 * scale, into one of two accumulators by block parity; the accumulators' lanes summed at the end; then the
 * bias term, sum over groups of bias * (sum of x over the group). 4-bit weights on AVX-512 instead: each
 * weight ``scale * q + bias`` as MLX's dequantize computes it, times x, into four accumulators (block parity x
 * low/high nibbles). Float weights: the same two accumulators, fed directly, and a scalar tail for K % 32
 * values.
 */
#include <string.h>
#if defined(__AVX2__) || defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "job.h"
#include "scalar.h"

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name##_, EL_ISA)
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(32)));
typedef uint8_t vb8 __attribute__((vector_size(8)));
typedef uint8_t vb16 __attribute__((vector_size(16)));
typedef uint8_t vb32 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef _Float16 vf16x8 __attribute__((vector_size(16)));

#define ROW_BLOCK 4 /* rows sharing one unpacked block of weights */

/* log2 of the 32-value blocks per group (group sizes 32, 64, 128): a block's group is blk >> group_shift. */
INLINE int group_shift(const el_weights* W) { return W->group_size == 32 ? 0 : W->group_size == 64 ? 1 : 2; }

INLINE vf load8(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

INLINE vf splat(float s) { return (vf){s, s, s, s, s, s, s, s}; }

/* a * b + c. Explicit, and the file is compiled with -ffp-contract=off: a compiler free to fuse multiplies
 * and adds may fuse them differently in each inlined copy (one row or four), and a row's bits would then
 * depend on its neighbours. */
INLINE vf fma8(vf a, vf b, vf c) {
#if defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

INLINE float hsum(vf v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* through int32: a direct u8 -> float conversion is scalarized by GCC 12 */
INLINE vf bytes_to_float(vb8 b) { return __builtin_convertvector(__builtin_convertvector(b, vi8), vf); }

/* 8 float weights of dtype at p -> floats. */
INLINE vf load8_weights(const void* p, int dtype) {
  if (dtype == EL_F32) return load8((const float*)p);
#if defined(__F16C__) /* GCC 12 converts the vector below one value at a time */
  if (dtype == EL_F16) return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#endif
  if (dtype == EL_F16) {
    vf16x8 h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
  }
  vh8 h;
  memcpy(&h, p, sizeof h);
  vu8 u = __builtin_convertvector(h, vu8) << 16;
  return (vf)u;
}

/* n values of dtype at p -> floats, 8 at a time where they can be. */
INLINE void convert_row(const void* p, int dtype, float* out, int64_t n) {
  const int size = dtype == EL_F32 ? 4 : 2;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vf v = load8_weights((const uint8_t*)p + i * size, dtype);
    memcpy(out + i, &v, sizeof v);
  }
  for (; i < n; i++) out[i] = el_load_float(p, dtype, i);
}

/* The 32 weights of one block, unscaled (q), as four vectors matching x's layout for these bits. */
INLINE void unpack_block(const uint8_t* p, int bits, vf w[4]) {
#if defined(__AVX2__) /* GCC 12 scalarizes the byte shuffles of the portable form below */
  if (bits == 4) {
    const __m128i m = _mm_set1_epi8(0x0F), b = _mm_loadu_si128((const __m128i*)p);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    w[0] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    return;
  }
  if (bits == 8) {
    for (int i = 0; i < 4; i++)
      w[i] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * i))));
    return;
  }
#endif
  if (bits == 4) { /* byte i: value 2i low, 2i+1 high; x holds evens then odds */
    vb16 b;
    memcpy(&b, p, sizeof b);
    vb16 lo = b & 0x0F, hi = b >> 4;
    w[0] = bytes_to_float(__builtin_shufflevector(lo, lo, 0, 1, 2, 3, 4, 5, 6, 7));
    w[1] = bytes_to_float(__builtin_shufflevector(lo, lo, 8, 9, 10, 11, 12, 13, 14, 15));
    w[2] = bytes_to_float(__builtin_shufflevector(hi, hi, 0, 1, 2, 3, 4, 5, 6, 7));
    w[3] = bytes_to_float(__builtin_shufflevector(hi, hi, 8, 9, 10, 11, 12, 13, 14, 15));
    return;
  }
  uint8_t q[32];
  if (bits == 8) {
    memcpy(q, p, 32);
  } else { /* every 8 values fill ``bits`` bytes of the little-endian bit stream */
    const uint64_t mask = (1u << bits) - 1;
    for (int j = 0; j < 4; j++) {
      uint64_t u = 0;
      memcpy(&u, p + j * bits, bits);
      for (int v = 0; v < 8; v++) q[8 * j + v] = (uint8_t)((u >> (v * bits)) & mask);
    }
  }
  vb8 part;
  for (int i = 0; i < 4; i++) {
    memcpy(&part, q + 8 * i, 8);
    w[i] = bytes_to_float(part);
  }
}

/* x offsets of the four weight vectors of a block: 4-bit x is evens then odds, so w[1] pairs with x+8 either way */
INLINE vf block_dot(const vf w[4], const float* x) {
  return fma8(w[2], load8(x + 16), w[0] * load8(x)) + fma8(w[3], load8(x + 24), w[1] * load8(x + 8));
}

/* Sum over groups of bias * (sum of x over the group): 8 groups at a time, then the rest. */
INLINE float bias_term(const el_job* job, const float* bf, int64_t row, int64_t ng) {
  if (!bf) return 0.f;
  const float* xs = job->xsum + row * ng;
  vf b8 = splat(0.f);
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) b8 = fma8(load8(bf + g), load8(xs + g), b8);
  float bias = hsum(b8);
  for (; g < ng; g++) bias += bf[g] * xs[g];
  return bias;
}

INLINE void quantized_block_rows(const el_job* job, int bits, int R, const uint8_t* wrow, const float* sf,
                                 const float* bf, int64_t r, int64_t n) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, ng = K / W->group_size;
  const int gshift = group_shift(W);
  vf acc[ROW_BLOCK][2];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = splat(0.f);
  const int64_t blocks = K / 32;
  /* even blocks into acc[.][0], odd ones into acc[.][1]: two dependency chains, indices known at compile time */
  for (int64_t blk = 0; blk < blocks; blk += 2) {
    for (int half = 0; half < 2; half++) {
      if (half && blk + 1 >= blocks) break;
      vf w[4];
      unpack_block(wrow + (blk + half) * 4 * bits, bits, w);
      const vf s = splat(sf[(blk + half) >> gshift]);
      for (int i = 0; i < R; i++) {
        const float* x = job->x + (r + i) * K + (blk + half) * 32;
        if (half)
          acc[i][1] = fma8(s, block_dot(w, x), acc[i][1]);
        else
          acc[i][0] = fma8(s, block_dot(w, x), acc[i][0]);
      }
    }
  }
  for (int i = 0; i < R; i++) job->y[(r + i) * N + n] = hsum(acc[i][0] + acc[i][1]) + bias_term(job, bf, r + i, ng);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 4- and 8-bit blocks as two 16-float vectors, half the instructions of the 8-float form: 4-bit x is already
 * laid out as the block's 16 even values then its 16 odd ones, the low and the high nibbles. */
INLINE void wide_block_rows(const el_job* job, int bits, int R, const uint8_t* wrow, const float* sf,
                            const float* bf, int64_t r, int64_t n) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, ng = K / W->group_size, blocks = K / 32;
  const int gshift = group_shift(W);
  __m512 acc[ROW_BLOCK][2];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; blk += 2) {
    for (int half = 0; half < 2; half++) {
      if (half && blk + 1 >= blocks) break;
      const uint8_t* p = wrow + (blk + half) * 4 * bits;
      __m512 w0, w1;
      if (bits == 4) {
        const __m128i m = _mm_set1_epi8(0x0F), b = _mm_loadu_si128((const __m128i*)p);
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
        w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
      } else {
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
        w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
      }
      const __m512 s = _mm512_set1_ps(sf[(blk + half) >> gshift]);
      for (int i = 0; i < R; i++) {
        const float* x = job->x + (r + i) * K + (blk + half) * 32;
        const __m512 d = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(x)));
        if (half)
          acc[i][1] = _mm512_fmadd_ps(s, d, acc[i][1]);
        else
          acc[i][0] = _mm512_fmadd_ps(s, d, acc[i][0]);
      }
    }
  }
  for (int i = 0; i < R; i++)
    job->y[(r + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) + bias_term(job, bf, r + i, ng);
}

/* 4-bit blocks through a table: each group's 16 possible weights ``scale * q + bias`` (rounded as MLX's
 * dequantize rounds them: a product, then a sum) sit in one vector, and a permute picks them by nibble
 * (the permute reads an index's low 4 bits, so the low nibbles need no mask). That replaces a conversion, a
 * multiply by the scale and the bias term per block, and makes a row 2 FMAs per 32 weights. Four
 * accumulators per row (block parity x low/high nibbles) keep the FMA chains independent. */
INLINE __m512 lut4(const float* sf, const float* bf, int64_t g) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lut = _mm512_mul_ps(_mm512_set1_ps(sf[g]), iota);
  return bf ? _mm512_add_ps(lut, _mm512_set1_ps(bf[g])) : lut;
}

/* One block into accumulators a and a + 1 of each row (a a compile-time constant once inlined). */
INLINE void lut4_block(const el_job* job, int R, const uint8_t* wrow, __m512 lut, int64_t blk, int64_t r,
                       __m512 acc[ROW_BLOCK][4], const int a) {
  const int64_t K = job->W->K;
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow + blk * 16)));
  const __m512 w0 = _mm512_permutexvar_ps(q, lut), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
  for (int i = 0; i < R; i++) {
    const float* x = job->x + (r + i) * K + blk * 32;
    acc[i][a] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[i][a]);
    acc[i][a + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc[i][a + 1]);
  }
}

INLINE void lut4_block_rows(const el_job* job, int R, const uint8_t* wrow, const float* sf, const float* bf,
                            int64_t r, int64_t n) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, blocks = K / 32;
  const int gshift = group_shift(W);
  const int64_t gmask = (1 << gshift) - 1;
  __m512 acc[ROW_BLOCK][4];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
  __m512 lut = _mm512_setzero_ps();
  int64_t blk = 0;
  for (; blk + 2 <= blocks; blk += 2) {
    if ((blk & gmask) == 0) lut = lut4(sf, bf, blk >> gshift);
    lut4_block(job, R, wrow, lut, blk, r, acc, 0);
    if (((blk + 1) & gmask) == 0) lut = lut4(sf, bf, (blk + 1) >> gshift);
    lut4_block(job, R, wrow, lut, blk + 1, r, acc, 2);
  }
  if (blk < blocks) {
    if ((blk & gmask) == 0) lut = lut4(sf, bf, blk >> gshift);
    lut4_block(job, R, wrow, lut, blk, r, acc, 0);
  }
  for (int i = 0; i < R; i++)
    job->y[(r + i) * N + n] =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
}

/* The lane sums of four vectors, each in the order _mm512_reduce_add_ps sums one (lane i + lane i+8, then + i+4,
 * then + i+2, then + i+1), so a row's bits do not depend on whether it was reduced alone or in a tile of four. */
INLINE __m128 reduce_add4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, v));
}

/* How far ahead a tile of four weight rows prefetches its rows: whole tiles, at least ~2 KB. Four rows read in
 * lockstep are four short streams the hardware prefetchers follow late (without this, 8-bit decoding ran 1.7x
 * slower); measured on SmolLM2-shaped steps, ~2 KB beat one tile of 4-bit rows, 4 KB and 8 KB, and a burst of
 * prefetches at each tile's start lost to one line per row every 64 bytes read. */
#define PREFETCH_BYTES 2048
INLINE int64_t prefetch_distance(int64_t row_bytes) {
  const int64_t tile = 4 * row_bytes;
  return (PREFETCH_BYTES + tile - 1) / tile * tile;
}

/* Block blk of four weight rows into accumulators a and a + 1 of each (a a compile-time constant once inlined). */
INLINE void lut4_tile4_block(const uint8_t* w, int64_t row_bytes, int64_t ahead, const float* sf, const float* bf,
                             int64_t ng, const float* x, int64_t blk, int gshift, __m512 lut[4], __m512 acc[4][4],
                             const int a) {
  const __m512 x0 = _mm512_loadu_ps(x + blk * 32), x1 = _mm512_loadu_ps(x + blk * 32 + 16);
  const int fresh = (blk & ((1 << gshift) - 1)) == 0;
  for (int i = 0; i < 4; i++) {
    if (fresh) lut[i] = lut4(sf + i * ng, bf ? bf + i * ng : NULL, blk >> gshift);
    const uint8_t* p = w + i * row_bytes + blk * 16;
    if ((blk & 3) == 0) __builtin_prefetch(p + ahead); /* a later tile's same row, a line at a time */
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    acc[i][a] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, lut[i]), x0, acc[i][a]);
    acc[i][a + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut[i]), x1, acc[i][a + 1]);
  }
}

/* One x row r times four weight rows n..n+3 (decoding): lut4_block_rows' arithmetic for each of them, with x
 * read once per block for all four. sf and bf hold the four rows' scales and biases, ng apart. */
INLINE void lut4_tile4(const el_job* job, const uint8_t* w, int64_t row_bytes, const float* sf, const float* bf,
                       int64_t r, int64_t n) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, blocks = K / 32, ng = K / W->group_size;
  const int gshift = group_shift(W);
  const float* x = job->x + r * K;
  const int64_t ahead = prefetch_distance(row_bytes);
  __m512 acc[4][4], lut[4];
  for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = lut[i] = _mm512_setzero_ps();
  int64_t blk = 0;
  for (; blk + 2 <= blocks; blk += 2) {
    lut4_tile4_block(w, row_bytes, ahead, sf, bf, ng, x, blk, gshift, lut, acc, 0);
    lut4_tile4_block(w, row_bytes, ahead, sf, bf, ng, x, blk + 1, gshift, lut, acc, 2);
  }
  if (blk < blocks) lut4_tile4_block(w, row_bytes, ahead, sf, bf, ng, x, blk, gshift, lut, acc, 0);
  __m512 sum[4];
  for (int i = 0; i < 4; i++)
    sum[i] = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
  float out[4];
  _mm_storeu_ps(out, reduce_add4(sum[0], sum[1], sum[2], sum[3]));
  for (int i = 0; i < 4; i++) job->y[r * N + n + i] = out[i];
}

/* Block blk of four 8-bit weight rows into accumulator a of each: wide_block_rows' arithmetic, x read once. */
INLINE void q8_tile4_block(const uint8_t* w, int64_t row_bytes, int64_t ahead, const float* sf, int64_t ng,
                           const float* x, int64_t blk, int gshift, __m512 acc[4][2], const int a) {
  const __m512 x0 = _mm512_loadu_ps(x + blk * 32), x1 = _mm512_loadu_ps(x + blk * 32 + 16);
  for (int i = 0; i < 4; i++) {
    const uint8_t* p = w + i * row_bytes + blk * 32;
    if ((blk & 1) == 0) __builtin_prefetch(p + ahead); /* a later tile's same row, a line at a time */
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
    const __m512 d = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
    acc[i][a] = _mm512_fmadd_ps(_mm512_set1_ps(sf[i * ng + (blk >> gshift)]), d, acc[i][a]);
  }
}

/* One x row r times four 8-bit weight rows n..n+3 (decoding), as wide_block_rows computes each. */
INLINE void q8_tile4(const el_job* job, const uint8_t* w, int64_t row_bytes, const float* sf, const float* bf,
                     int64_t r, int64_t n) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, blocks = K / 32, ng = K / W->group_size;
  const int gshift = group_shift(W);
  const float* x = job->x + r * K;
  const int64_t ahead = prefetch_distance(row_bytes);
  __m512 acc[4][2];
  for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  int64_t blk = 0;
  for (; blk + 2 <= blocks; blk += 2) {
    q8_tile4_block(w, row_bytes, ahead, sf, ng, x, blk, gshift, acc, 0);
    q8_tile4_block(w, row_bytes, ahead, sf, ng, x, blk + 1, gshift, acc, 1);
  }
  if (blk < blocks) q8_tile4_block(w, row_bytes, ahead, sf, ng, x, blk, gshift, acc, 0);
  float out[4];
  _mm_storeu_ps(out, reduce_add4(_mm512_add_ps(acc[0][0], acc[0][1]), _mm512_add_ps(acc[1][0], acc[1][1]),
                                 _mm512_add_ps(acc[2][0], acc[2][1]), _mm512_add_ps(acc[3][0], acc[3][1])));
  for (int i = 0; i < 4; i++) job->y[r * N + n + i] = out[i] + bias_term(job, bf ? bf + i * ng : NULL, r, ng);
}

/* Four weight rows of 4 or 8 bits times one x row. */
INLINE void tile4(const el_job* job, int bits, const uint8_t* w, int64_t row_bytes, const float* sf,
                  const float* bf, int64_t r, int64_t n) {
  if (bits == 4)
    lut4_tile4(job, w, row_bytes, sf, bf, r, n);
  else
    q8_tile4(job, w, row_bytes, sf, bf, r, n);
}
#define TILE4(bits) ((bits) == 4 || (bits) == 8)
#define WIDE(bits) ((bits) == 4 || (bits) == 8)
#else
#define lut4_block_rows(job, R, wrow, sf, bf, r, n) quantized_block_rows(job, 4, R, wrow, sf, bf, r, n)
#define wide_block_rows quantized_block_rows
#define TILE4(bits) 0
#define tile4(job, bits, w, row_bytes, sf, bf, r, n) ((void)0)
#define WIDE(bits) 0
#endif

INLINE void quantized_rows(const el_job* job, int bits, int64_t e, int64_t r0, int64_t r1, int64_t n0,
                           int64_t n1) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, ng = K / W->group_size, row_bytes = K * bits / 8;
  const uint8_t* wbase = (const uint8_t*)W->w + (e * N) * row_bytes;
  const int ssize = W->s_dtype == EL_F32 ? 4 : 2;
  const uint8_t* sbase = (const uint8_t*)W->scales + (e * N) * ng * ssize;
  const uint8_t* bbase = W->biases ? (const uint8_t*)W->biases + (e * N) * ng * ssize : NULL;
  float sf[4 * ng], bf[4 * ng];
  int64_t n = n0;
  if (r1 - r0 == 1 && TILE4(bits)) /* decoding: four weight rows at a time, then the rest as below */
    for (; n + 4 <= n1; n += 4) {
      convert_row(sbase + n * ng * ssize, W->s_dtype, sf, 4 * ng);
      if (bbase) convert_row(bbase + n * ng * ssize, W->s_dtype, bf, 4 * ng);
      tile4(job, bits, wbase + n * row_bytes, row_bytes, sf, bbase ? bf : NULL, r0, n);
    }
  /* the rest, ROW_BLOCK rows of x at a time against each weight row left: a block of x (a few KB) stays in L1
   * while the task's weights pass by, where taking every row of x per weight row read a prompt's x from L2 each
   * time (46 rows of 576: 3x slower). The same arithmetic per row either way. */
  const int64_t first = n;
  for (int64_t r = r0; r < r1; r += ROW_BLOCK) {
    const int R = r1 - r >= ROW_BLOCK ? ROW_BLOCK : (int)(r1 - r);
    for (n = first; n < n1; n++) {
      convert_row(sbase + n * ng * ssize, W->s_dtype, sf, ng);
      if (bbase) convert_row(bbase + n * ng * ssize, W->s_dtype, bf, ng);
      const uint8_t* wrow = wbase + n * row_bytes;
      const float* b = bbase ? bf : NULL;
#define BLOCK_ROWS(R) \
  (bits == 4 && WIDE(4) ? lut4_block_rows(job, R, wrow, sf, b, r, n) \
   : WIDE(bits)        ? wide_block_rows(job, bits, R, wrow, sf, b, r, n) \
                       : quantized_block_rows(job, bits, R, wrow, sf, b, r, n))
      switch (R) {
        case 4: BLOCK_ROWS(4); break;
        case 3: BLOCK_ROWS(3); break;
        case 2: BLOCK_ROWS(2); break;
        default: BLOCK_ROWS(1); break;
      }
#undef BLOCK_ROWS
    }
  }
}

INLINE void float_block_rows(const el_job* job, int dtype, int R, const uint8_t* wrow, int64_t r, int64_t n) {
  const int64_t K = job->W->K, N = job->W->N, size = dtype == EL_F32 ? 4 : 2;
  vf acc[ROW_BLOCK][2];
  float tail[ROW_BLOCK];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = splat(0.f), tail[i] = 0.f;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    vf w[4];
    for (int j = 0; j < 4; j++) w[j] = load8_weights(wrow + (k + 8 * j) * size, dtype);
    for (int i = 0; i < R; i++) {
      const float* x = job->x + (r + i) * K + k;
      acc[i][0] = fma8(w[0], load8(x), acc[i][0]);
      acc[i][1] = fma8(w[1], load8(x + 8), acc[i][1]);
      acc[i][0] = fma8(w[2], load8(x + 16), acc[i][0]);
      acc[i][1] = fma8(w[3], load8(x + 24), acc[i][1]);
    }
  }
  for (; k < K; k++) {
    const float wk = el_load_float(wrow, dtype, k);
    for (int i = 0; i < R; i++) tail[i] += wk * job->x[(r + i) * K + k];
  }
  for (int i = 0; i < R; i++) job->y[(r + i) * N + n] = hsum(acc[i][0] + acc[i][1]) + tail[i];
}

INLINE void float_rows(const el_job* job, int dtype, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  const el_weights* W = job->W;
  const int64_t K = W->K, N = W->N, size = dtype == EL_F32 ? 4 : 2;
  const uint8_t* wbase = (const uint8_t*)W->w + (e * N) * K * size;
  for (int64_t r = r0; r < r1; r += ROW_BLOCK) { /* a block of x in L1 against each weight row, as quantized_rows */
    const int R = r1 - r >= ROW_BLOCK ? ROW_BLOCK : (int)(r1 - r);
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* wrow = wbase + n * K * size;
      switch (R) {
        case 4: float_block_rows(job, dtype, 4, wrow, r, n); break;
        case 3: float_block_rows(job, dtype, 3, wrow, r, n); break;
        case 2: float_block_rows(job, dtype, 2, wrow, r, n); break;
        default: float_block_rows(job, dtype, 1, wrow, r, n); break;
      }
    }
  }
}

void FN(el_rows)(const el_job* job, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  switch (job->W->bits) {
    case 0:
      switch (job->W->w_dtype) {
        case EL_F32: float_rows(job, EL_F32, e, r0, r1, n0, n1); return;
        case EL_F16: float_rows(job, EL_F16, e, r0, r1, n0, n1); return;
        default: float_rows(job, EL_BF16, e, r0, r1, n0, n1); return;
      }
    case 2: quantized_rows(job, 2, e, r0, r1, n0, n1); return;
    case 3: quantized_rows(job, 3, e, r0, r1, n0, n1); return;
    case 4: quantized_rows(job, 4, e, r0, r1, n0, n1); return;
    case 5: quantized_rows(job, 5, e, r0, r1, n0, n1); return;
    case 6: quantized_rows(job, 6, e, r0, r1, n0, n1); return;
    default: quantized_rows(job, 8, e, r0, r1, n0, n1); return;
  }
}
