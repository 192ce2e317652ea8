// EdgeCpuAttentionBlock (attention_block.h): the norm, q/k/v as one product, the cache writes, attention, the
// output projection and the residual, in one task.
#include "attention_block.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "halves.h"
#include "mlx_glue.h"

namespace edge {

namespace {

struct Layout {  // where each input sits: x, norm, q, k, v, o, k_cache, v_cache, inv_freq
  size_t per, q, k, v, o, k_cache, v_cache, inv_freq;
  Layout(WeightFormat f, WeightFormat fo) : per(inputs_per_weight(f.bits, f.has_biases)) {
    q = 2, k = q + per, v = k + per, o = v + per;
    k_cache = o + inputs_per_weight(fo.bits, fo.has_biases), v_cache = k_cache + 1, inv_freq = k_cache + 2;
  }
};

el_weights format_of(int64_t K, const std::vector<mx::array>& inputs, size_t at, WeightFormat f) {
  return weights_of(K, inputs[at], f.bits ? &inputs[at + 1] : nullptr, f.bits, f.group_size);
}

}  // namespace

void CpuAttentionBlock::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  release_sibling_inputs(inputs, outputs);
  const Layout at(f_, fo_);
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const bool copy_k = take_cache_buffer(inputs[at.k_cache], outputs[1]);
  const bool copy_v = take_cache_buffer(inputs[at.v_cache], outputs[2]);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  for (auto& a : outputs) encoder.set_output_array(a);
  const auto& x = inputs[0];
  const int64_t K = x.shape(-1), rows = x.size() / K, L = x.shape(1);
  AttentionHalf half{};
  half.q = format_of(K, inputs, at.q, f_), half.k = format_of(K, inputs, at.k, f_), half.v = format_of(K, inputs, at.v, f_);
  half.keys = cache_rows(inputs[at.k_cache], L, p_.offset), half.values = cache_rows(inputs[at.v_cache], L, p_.offset);
  half.heads = half.q.N / half.keys.D;
  half.o = format_of(half.heads * half.values.D, inputs, at.o, fo_);
  half.rot = {p_.dims, p_.traditional, nullptr, p_.rope_scale};
  half.scale = p_.scale, half.causal = p_.causal;
  const int norm_dtype = el_dtype_of(inputs[1].dtype());
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), half, rows, at, norm_dtype, copy_k, copy_v, eps = eps_, f = f_, fo = fo_,
                    y = out.data<float>(), kc = outputs[1].data<float>(), vc = outputs[2].data<float>(),
                    k_bytes = outputs[1].nbytes(), v_bytes = outputs[2].nbytes()]() mutable {
    if (copy_k) std::memcpy(kc, ops[at.k_cache].bytes(), k_bytes);
    if (copy_v) std::memcpy(vc, ops[at.v_cache].bytes(), v_bytes);
    bind_weight(half.q, ops, at.q, f.has_biases);
    bind_weight(half.k, ops, at.k, f.has_biases);
    bind_weight(half.v, ops, at.v, f.has_biases);
    bind_weight(half.o, ops, at.o, fo.has_biases);
    half.rot.inv_freq = reinterpret_cast<const float*>(ops[at.inv_freq].bytes());
    attention_half(half, reinterpret_cast<const float*>(ops[0].bytes()), ops[1].bytes(), norm_dtype, eps, rows, kc, vc,
                   y);
  });
}

void CpuAttentionBlock::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

std::vector<mx::Shape> CpuAttentionBlock::output_shapes(const std::vector<mx::array>& inputs) {
  const Layout at(f_, fo_);
  return {inputs[0].shape(), inputs[at.k_cache].shape(), inputs[at.v_cache].shape()};
}

std::vector<mx::array> attention_block(const mx::array& x, const mx::array& norm, float eps,
                                       const std::vector<mx::array>& qkv, const std::vector<mx::array>& out_proj,
                                       const mx::array& k_cache, const mx::array& v_cache, int offset, int dims,
                                       bool traditional, const mx::array& inv_freq, float rope_scale, float scale,
                                       bool causal, WeightFormat f, WeightFormat fo, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  for (const auto* a : {&x, &k_cache, &v_cache, &inv_freq})
    check(a->dtype() == mx::float32, "attention block: float32 x, caches and angles");
  check(x.ndim() == 3, "attention block: x must be [B, L, hidden]");
  const int64_t B = x.shape(0), L = x.shape(1), hidden = x.shape(2);
  check(is_float(norm.dtype()) && norm.ndim() == 1 && norm.shape(0) == hidden,
        "attention block: the norm's weight must be [hidden]");
  check(k_cache.ndim() == 4 && v_cache.ndim() == 4, "attention block: caches must be [B, Hkv, capacity, D]");
  const int64_t Hkv = k_cache.shape(1), cap = k_cache.shape(2), D = k_cache.shape(3), Dv = v_cache.shape(3);
  check(k_cache.shape(0) == B && v_cache.shape(0) == B && v_cache.shape(1) == Hkv && v_cache.shape(2) == cap,
        "attention block: the caches must share [B, Hkv, capacity] with x's B");
  check(L > 0 && offset >= 0 && offset + L <= cap, "attention block: the new rows must fit the caches");
  check(dims > 0 && dims % 2 == 0 && dims <= D && int64_t(inv_freq.size()) == dims / 2,
        "attention block: rope dims / angles");
  const size_t per = inputs_per_weight(f.bits, f.has_biases), per_o = inputs_per_weight(fo.bits, fo.has_biases);
  check(qkv.size() == 3 * per && out_proj.size() == per_o,
        "attention block: q, k, v and o, each with its scales (and biases) when quantized");
  auto weight = [](const std::vector<mx::array>& ws, size_t i, WeightFormat f, int64_t K, int64_t N, const char* what) {
    check_set_weight(ws, i, f.bits, f.group_size, f.has_biases, K, N, what);
  };
  weight(qkv, 0, f, hidden, -1, "attention block: q must be [Hq * D, hidden]");
  const int64_t Nq = qkv[0].shape(0);
  check(Nq % D == 0 && (Nq / D) % Hkv == 0, "attention block: query heads must be a multiple of key/value heads");
  weight(qkv, 1, f, hidden, Hkv * D, "attention block: k must be [Hkv * D, hidden]");
  weight(qkv, 2, f, hidden, Hkv * Dv, "attention block: v must be [Hkv * Dv, hidden]");
  weight(out_proj, 0, fo, Nq / D * Dv, hidden, "attention block: o must be [hidden, Hq * Dv]");
  std::vector<mx::array> inputs = {x, norm};
  inputs.insert(inputs.end(), qkv.begin(), qkv.end());
  inputs.insert(inputs.end(), out_proj.begin(), out_proj.end());
  inputs.insert(inputs.end(), {k_cache, v_cache, inv_freq});
  const StepParams p{offset, dims, traditional, causal, rope_scale, scale};
  return mx::array::make_arrays({x.shape(), k_cache.shape(), v_cache.shape()},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<CpuAttentionBlock>(stream, p, eps, f, fo), inputs);
}

}  // namespace edge
