// A decoder layer's halves (halves.h): the norm, the products, the cache writes, attention, silu and the residual,
// in the order and with the functions the ops one by one use.
#include "halves.h"

#include <algorithm>
#include <vector>

namespace edge {

namespace {

void fill_nan(float* p, size_t n) { std::fill(p, p + n, __builtin_nanf("")); }

}  // namespace

void attention_half(const AttentionHalf& a, const float* x, const void* norm, int norm_dtype, float eps, int64_t rows,
                    float* k_cache, float* v_cache, float* y) {
  const int64_t K = a.q.K;
  std::vector<float> n(rows * K), q(rows * a.q.N), k(rows * a.k.N), v(rows * a.v.N), att(rows * a.heads * a.values.D);
  el_rms_norm(x, norm, norm_dtype, n.data(), rows, K, eps);
  const el_weights* qkv[3] = {&a.q, &a.k, &a.v};
  float* projected[3] = {q.data(), k.data(), v.data()};
  if (el_matmul_many(qkv, 3, n.data(), projected, rows) != 0)  // as matmul_many: NaN, never garbage
    for (auto* t : {&q, &k, &v}) fill_nan(t->data(), t->size());
  el_cache_write(k.data(), k_cache, &a.keys, &a.rot);
  el_cache_write(v.data(), v_cache, &a.values, nullptr);
  el_attention_cached(q.data(), k_cache, v_cache, att.data(), &a.keys, a.heads, a.values.D, &a.rot, a.scale, a.causal);
  const size_t size = rows * a.o.N;
  if (el_matmul(&a.o, att.data(), y, rows, nullptr, 0) != 0) fill_nan(y, size);
  for (size_t i = 0; i < size; i++) y[i] = x[i] + y[i];  // as MLX adds them: the same bits
}

void mlp_half(const el_weights& gate, const el_weights& up, const el_weights& down, const float* x, const void* norm,
              int norm_dtype, float eps, int64_t rows, float* y) {
  const int64_t D = gate.K, F = gate.N;
  std::vector<float> n(rows * D), g(rows * F), u(rows * F);
  el_rms_norm(x, norm, norm_dtype, n.data(), rows, D, eps);
  const el_weights* gate_up[2] = {&gate, &up};
  float* gu[2] = {g.data(), u.data()};
  const size_t size = rows * D;
  if (el_matmul_many(gate_up, 2, n.data(), gu, rows) != 0) {
    fill_nan(y, size);
    return;
  }
  el_silu_mul(g.data(), u.data(), g.data(), g.size());
  if (el_matmul(&down, g.data(), y, rows, nullptr, 0) != 0) fill_nan(y, size);
  for (size_t i = 0; i < size; i++) y[i] = x[i] + y[i];  // h + mlp, as MLX adds them
}

}  // namespace edge
