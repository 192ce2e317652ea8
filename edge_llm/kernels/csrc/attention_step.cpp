// The decode step's attention ops (attention_step.h); fused.c does the work.
#include "attention_step.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

extern "C" {
#include "fused.h"
}

namespace edge {

namespace {

[[noreturn]] void no_gpu() { throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation"); }

}  // namespace

el_cache_rows cache_rows(const mx::array& cache, int64_t L, int64_t offset) {
  return {cache.shape(0), cache.shape(1), L, cache.shape(3), cache.shape(2), offset};
}

bool take_cache_buffer(const mx::array& cache, mx::array& out) {
  const bool copy = !(cache.is_donatable() && cache.flags().row_contiguous && cache.data_size() == cache.size());
  if (copy) out.set_data(mx::allocator::malloc(out.nbytes()));
  else out.copy_shared_buffer(cache);
  return copy;
}

void CpuCacheWrite::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& cache = inputs[0];
  const bool copy = take_cache_buffer(cache, out);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  const el_cache_rows c = cache_rows(cache, inputs[1].shape(1), p_.offset);
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), c, copy, p = p_, dst = out.data<float>(), bytes = out.nbytes()]() mutable {
    if (copy) std::memcpy(dst, ops[0].bytes(), bytes);
    el_rotation rot{p.dims, p.traditional, nullptr, p.rope_scale};
    if (p.dims) rot.inv_freq = reinterpret_cast<const float*>(ops[2].bytes());
    el_cache_write(reinterpret_cast<const float*>(ops[1].bytes()), dst, &c, p.dims ? &rot : nullptr);
  });
}

void CpuCacheWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(); }

void CpuAttentionCached::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  const auto &q = inputs[0], &k_cache = inputs[1];
  const el_cache_rows k = cache_rows(k_cache, q.shape(1), p_.offset);
  const int64_t Hq = q.size() / (k.B * k.L * k.D), Dv = inputs[2].shape(3);
  el_weights Wo{};
  if (o_.on) Wo = weights_of(Hq * Dv, inputs[4], o_.bits ? &inputs[5] : nullptr, o_.bits, o_.group_size);
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), k, Hq, Dv, p = p_, o = o_, Wo, y = out.data<float>(),
                    n = out.size()]() mutable {
    // the caches are read in place: row-contiguous buffers (the cache-write op's outputs)
    const el_rotation rot{p.dims, p.traditional, reinterpret_cast<const float*>(ops[3].bytes()), p.rope_scale};
    std::vector<float> att(o.on ? k.B * k.L * Hq * Dv : 0);
    el_attention_cached(reinterpret_cast<const float*>(ops[0].bytes()), reinterpret_cast<const float*>(ops[1].bytes()),
                        reinterpret_cast<const float*>(ops[2].bytes()), o.on ? att.data() : y, &k, Hq, Dv, &rot,
                        p.scale, p.causal);
    if (!o.on) return;
    bind_weight(Wo, ops, 4, o.has_biases);
    if (el_matmul(&Wo, att.data(), y, k.B * k.L, nullptr, 0) != 0) std::fill(y, y + n, __builtin_nanf(""));
    const float* residual = reinterpret_cast<const float*>(ops.back().bytes());
    for (size_t i = 0; i < n; i++) y[i] = residual[i] + y[i];  // as MLX adds them: the same bits
  });
}

void CpuAttentionCached::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(); }

std::vector<mx::Shape> CpuAttentionCached::output_shapes(const std::vector<mx::array>& inputs) {
  if (o_.on) return {inputs.back().shape()};
  const auto& q = inputs[0];
  const int64_t heads = q.size() / (int64_t(q.shape(0)) * q.shape(1) * inputs[1].shape(3));
  return {{q.shape(0), q.shape(1), int(heads * inputs[2].shape(3))}};
}

std::vector<mx::array> attention_step(const mx::array& q, const mx::array& k, const mx::array& v,
                                      const mx::array& k_cache, const mx::array& v_cache, int offset, int dims,
                                      bool traditional, const mx::array& inv_freq, float rope_scale, float scale,
                                      bool causal, const std::vector<mx::array>& out_proj, int bits, int group_size,
                                      bool has_biases, const std::optional<mx::array>& residual,
                                      mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  for (const auto* a : {&q, &k, &v, &k_cache, &v_cache, &inv_freq})
    check(a->dtype() == mx::float32, "attention step: float32 arrays");
  check(k_cache.ndim() == 4 && v_cache.ndim() == 4, "attention step: caches must be [B, Hkv, capacity, D]");
  const int64_t B = k_cache.shape(0), Hkv = k_cache.shape(1), cap = k_cache.shape(2), D = k_cache.shape(3);
  const int64_t Dv = v_cache.shape(3);
  check(v_cache.shape(0) == B && v_cache.shape(1) == Hkv && v_cache.shape(2) == cap, "attention step: v_cache shape");
  check(q.ndim() >= 2 && q.shape(0) == B && k.ndim() >= 2 && v.ndim() >= 2, "attention step: q, k, v [B, L, ...]");
  const int64_t L = q.shape(1);
  check(L > 0 && k.shape(0) == B && k.shape(1) == L && v.shape(0) == B && v.shape(1) == L,
        "attention step: q, k and v must share [B, L]");
  check(int64_t(k.size()) == B * L * Hkv * D && int64_t(v.size()) == B * L * Hkv * Dv,
        "attention step: k and v must hold Hkv heads of the caches' widths");
  check(int64_t(q.size()) % (B * L * D) == 0 && (q.size() / (B * L * D)) % Hkv == 0,
        "attention step: query heads must be a multiple of key/value heads");
  check(offset >= 0 && offset + L <= cap, "attention step: the new rows must fit the caches");
  check(dims > 0 && dims % 2 == 0 && dims <= D && int64_t(inv_freq.size()) == dims / 2,
        "attention step: rope dims / angles");
  const StepParams rotated{offset, dims, traditional, causal, rope_scale, scale};
  const StepParams copied{offset, 0, false, false, 0.f, 0.f};
  auto keys = mx::array(k_cache.shape(), mx::float32, std::make_shared<CpuCacheWrite>(stream, rotated),
                        {k_cache, k, inv_freq});
  auto values = mx::array(v_cache.shape(), mx::float32, std::make_shared<CpuCacheWrite>(stream, copied),
                          {v_cache, v});
  const int64_t Hq = q.size() / (B * L * D);
  std::vector<mx::array> inputs = {q, keys, values, inv_freq};
  OutProj o;
  mx::Shape shape = {int(B), int(L), int(Hq * Dv)};
  if (!out_proj.empty()) {
    check(residual.has_value() && residual->dtype() == mx::float32 && residual->ndim() == 3 &&
              residual->shape(0) == B && residual->shape(1) == L,
          "attention step: the residual must be float32 [B, L, hidden]");
    check(int64_t(out_proj.size()) == inputs_per_weight(bits, has_biases), "attention step: one output projection");
    std::optional<mx::array> scales, biases;
    if (bits) scales = out_proj[1];
    if (bits && has_biases) biases = out_proj[2];
    check_weight(Hq * Dv, out_proj[0], scales, biases, bits, group_size);
    check(out_proj[0].ndim() == 2 && out_proj[0].shape(0) == residual->shape(2),
          "attention step: the output projection must give the residual's width");
    o = {true, bits, group_size, has_biases};
    inputs.insert(inputs.end(), out_proj.begin(), out_proj.end());
    inputs.push_back(*residual);
    shape = residual->shape();
  }
  auto out = mx::array(shape, mx::float32, std::make_shared<CpuAttentionCached>(stream, rotated, o), std::move(inputs));
  return {out, keys, values};
}

}  // namespace edge
