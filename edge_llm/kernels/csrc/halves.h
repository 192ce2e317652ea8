// The arithmetic of a decoder layer's two fused halves, run inside a task (weights bound, caches writable). One
// copy serves the one-half ops (attention_block, mlp_block) and the whole-stack op (decode_plan), so all of them
// compute the same bits.
#pragma once
#include "fused.h"
#include "kernels.h"

namespace edge {

struct AttentionHalf {
  el_weights q, k, v, o;
  el_cache_rows keys, values;  // where the step's rows go, and the caches' shapes
  int64_t heads;               // query heads
  el_rotation rot;
  float scale;
  bool causal;
};

// y = x + o(attention(rope(q), caches)) for q/k/v the projections of rms_norm(x, norm, eps) (rows of K values), the
// step's keys (rotated) and values written into the caches first.
void attention_half(const AttentionHalf& a, const float* x, const void* norm, int norm_dtype, float eps, int64_t rows,
                    float* k_cache, float* v_cache, float* y);

// y = x + down(silu(gate(n)) * up(n)) for n = rms_norm(x, norm, eps).
void mlp_half(const el_weights& gate, const el_weights& up, const el_weights& down, const float* x, const void* norm,
              int norm_dtype, float eps, int64_t rows, float* y);

}  // namespace edge
