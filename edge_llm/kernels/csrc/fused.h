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
} el_attention_args;
void el_attention(const el_attention_args* a);

#ifdef __cplusplus
}
#endif
#endif
