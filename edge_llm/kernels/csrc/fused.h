/* Single-op CPU versions of the fast ops that MLX's CPU backend runs as graphs of many small ops
 * (mx.fast.rms_norm, mx.fast.rope, mx.fast.scaled_dot_product_attention): each costs MLX one dispatch
 * per op, and a decode step of a small model spends more time dispatching them than computing. Float32. */
#ifndef EDGE_LLM_FUSED_H
#define EDGE_LLM_FUSED_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, rows of D values; w: D values of w_dtype (enum el_dtype). */
void el_rms_norm(const float* x, const void* w, int w_dtype, float* y, int64_t rows, int64_t D, float eps);

/* Rotary embedding of rows [B*H, L, D] at positions offset + l, the first ``dims`` features rotated:
 * halves (traditional 0) or pairs (1); inv_freq: dims/2 values (angle per position unit); scale multiplies
 * positions. Features past ``dims`` are copied. */
void el_rope(const float* x, float* y, int64_t heads, int64_t L, int64_t D, int64_t dims, int traditional,
             const float* inv_freq, float scale, int64_t offset);

/* Attention for q [B, Hq, L, D] (contiguous) over k [B, Hkv, T, D] and v [B, Hkv, T, Dv] given by strides
 * (elements) of their first three axes (the last is contiguous): out [B, Hq, L, Dv]. causal: query l sees
 * keys t <= T - L + l. */
typedef struct {
  const float *q, *k, *v;
  float* out;
  int64_t B, Hq, Hkv, L, T, D, Dv;
  int64_t k_strides[3], v_strides[3];
  float scale;
  int causal;
  int out_by_position; /* 0: out [B, Hq, L, Dv]; 1: out [B, L, Hq, Dv] (what the output projection takes) */
} el_attention_args;
void el_attention(const el_attention_args* a);

/* A decode step's attention against a cache of float rows [B, H, capacity, D] (a buffer the cache grows in
 * steps), in two ops so that each can write into its input's buffer (MLX donates a buffer to a single-output
 * op only): the new keys (rotated) and values written at rows offset.., then attention over offset + L rows.
 * Bit for bit el_rope + a slice update + el_attention. */
typedef struct {
  int64_t B, H, L, D, capacity, offset; /* the rows [B, L, H, D] go to cache rows offset .. offset + L - 1 */
} el_cache_rows;
typedef struct {
  int64_t dims; /* the first dims features rotated (even) */
  int traditional;
  const float* inv_freq; /* dims / 2 angles per position unit */
  float scale;           /* multiplies positions */
} el_rotation;
/* cache[b, h, offset + l] = rotate(rows[b, l, h]) (rot NULL: copied). */
void el_cache_write(const float* rows, float* cache, const el_cache_rows* c, const el_rotation* rot);
/* out [B, L, Hq, Dv] = attention of rotate(q [B, L, Hq, D]) over the first offset + L rows of the caches (k
 * gives their shape; v_cache's rows are Dv wide); causal: query l sees rows up to offset + l. */
void el_attention_cached(const float* q, const float* k_cache, const float* v_cache, float* out,
                         const el_cache_rows* k, int64_t Hq, int64_t Dv, const el_rotation* rot, float scale,
                         int causal);

/* y = silu(g) * u with MLX's bits (its nn.silu then a multiply); y may be g. */
void el_silu_mul(const float* g, const float* u, float* y, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
