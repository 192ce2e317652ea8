// DecodePlan and its op, CpuDecoderStack (decode_plan.h).
#include "decode_plan.h"

#include "halves.h"
#include "mlp_block.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "mlx_glue.h"

namespace edge {

namespace {

int per(WeightFormat f) { return inputs_per_weight(f.bits, f.has_biases); }

// Weight i of a set the plan holds (evaluated, row-contiguous: add_layer), its pointers set, for rows of K values.
el_weights bound(int64_t K, const std::vector<mx::array>& set, size_t i, WeightFormat f) {
  const size_t at = i * per(f);
  el_weights W = weights_of(K, set[at], f.bits ? &set[at + 1] : nullptr, f.bits, f.group_size);
  W.w = set[at].data<void>();
  if (f.bits) {
    W.scales = set[at + 1].data<void>();
    W.biases = f.has_biases ? set[at + 2].data<void>() : nullptr;
  }
  return W;
}

// One layer as the task runs it: the halves' descriptors and where its caches and angles sit among the inputs.
struct LayerRun {
  AttentionHalf attn;
  el_weights gate, up, down;
  size_t k_cache, v_cache, inv_freq;
  bool copy_k, copy_v;
  float *kc, *vc;
  size_t k_bytes, v_bytes;
};

}  // namespace

void DecodePlan::add_layer(PlanLayer layer) {
  // The op reads these inside its task without holding them as inputs (a step would otherwise hand MLX some 800
  // inputs, copied into each of its 61 outputs): evaluated and row-contiguous now, held by the plan from here on.
  std::vector<mx::array*> arrays = {&layer.attn_norm, &layer.mlp_norm};
  for (auto* part : {&layer.qkv, &layer.out_proj, &layer.mlp})
    for (auto& a : *part) arrays.push_back(&a);
  for (auto* a : arrays)
    if (!a->flags().row_contiguous || !a->is_available()) *a = mx::contiguous(*a);
  std::vector<mx::array> pending;
  for (auto* a : arrays)
    if (!a->is_available()) pending.push_back(*a);
  if (!pending.empty()) mx::eval(pending);
  layers_->push_back(std::move(layer));
}

void DecodePlan::check_step(const mx::array& h, const std::vector<mx::array>& k_caches,
                            const std::vector<mx::array>& v_caches, const std::vector<mx::array>& inv_freq,
                            const std::vector<float>& rope_scale, int offset) {
  const auto& layers = *layers_;
  const size_t n = layers.size();
  check(n > 0, "decode plan: no layers");
  check(k_caches.size() == n && v_caches.size() == n && inv_freq.size() == n && rope_scale.size() == n,
        "decode plan: one k cache, v cache, set of angles and position scale per layer");
  check(h.dtype() == mx::float32 && h.ndim() == 3, "decode plan: h must be float32 [B, L, hidden]");
  std::vector<mx::Shape> shapes = {h.shape()};
  for (size_t i = 0; i < n; i++) {
    const auto &k = k_caches[i], &v = v_caches[i], &a = inv_freq[i];
    check(k.dtype() == mx::float32 && v.dtype() == mx::float32 && a.dtype() == mx::float32 && k.ndim() == 4 &&
              v.ndim() == 4 && a.ndim() == 1,
          "decode plan: float32 caches [B, Hkv, capacity, D] and angles");
    check(offset >= 0 && offset + h.shape(1) <= k.shape(2) && k.shape(2) == v.shape(2),
          "decode plan: the new rows must fit the caches");
    shapes.insert(shapes.end(), {{k.shape(0), k.shape(1), 0, k.shape(3)}, {v.shape(0), v.shape(1), 0, v.shape(3)},
                                 a.shape()});
  }
  std::lock_guard<std::mutex> lock(checking_);
  if (shapes == checked_) return;
  // New shapes: attention_block's and mlp_block's own checks, once (their ops are dropped unevaluated).
  mx::array x = h;
  for (size_t i = 0; i < n; i++) {
    const PlanLayer& l = layers[i];
    auto out = attention_block(x, l.attn_norm, l.attn_eps, l.qkv, l.out_proj, k_caches[i], v_caches[i], offset, l.dims,
                               l.traditional, inv_freq[i], rope_scale[i], l.scale, h.shape(1) > 1, l.qkv_format,
                               l.out_format);
    x = mlp_block(out[0], l.mlp_norm, l.mlp_eps, l.mlp, l.mlp_format.bits, l.mlp_format.group_size,
                  l.mlp_format.has_biases);
  }
  checked_ = std::move(shapes);
}

std::tuple<mx::array, std::vector<mx::array>, std::vector<mx::array>> DecodePlan::run(
    const mx::array& h, const std::vector<mx::array>& k_caches, const std::vector<mx::array>& v_caches,
    const std::vector<mx::array>& inv_freq, const std::vector<float>& rope_scale, int offset) {
  auto stream = mx::to_stream({});
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check_step(h, k_caches, v_caches, inv_freq, rope_scale, offset);
  const size_t n = layers_->size();
  std::vector<mx::array> inputs = {h};
  inputs.reserve(1 + 3 * n);
  for (size_t i = 0; i < n; i++) inputs.insert(inputs.end(), {k_caches[i], v_caches[i], inv_freq[i]});
  std::vector<mx::Shape> shapes = {h.shape()};
  for (size_t i = 0; i < n; i++) shapes.insert(shapes.end(), {k_caches[i].shape(), v_caches[i].shape()});
  auto outs = mx::array::make_arrays(
      std::move(shapes), std::vector<mx::Dtype>(1 + 2 * n, mx::float32),
      std::make_shared<CpuDecoderStack>(stream, layers_, offset, h.shape(1) > 1, rope_scale), inputs);
  std::vector<mx::array> ks, vs;
  for (size_t i = 0; i < n; i++) ks.push_back(outs[1 + 2 * i]), vs.push_back(outs[2 + 2 * i]);
  return {outs[0], std::move(ks), std::move(vs)};
}

void CpuDecoderStack::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  release_sibling_inputs(inputs, outputs);
  const auto& layers = *layers_;
  const size_t n = layers.size();
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& h = inputs[0];
  const int64_t K = h.shape(-1), rows = h.size() / K, L = h.shape(1);
  std::vector<LayerRun> runs(n);
  for (size_t i = 0; i < n; i++) {
    const PlanLayer& l = layers[i];
    LayerRun& r = runs[i];
    r.k_cache = 1 + 3 * i, r.v_cache = r.k_cache + 1, r.inv_freq = r.k_cache + 2;
    AttentionHalf& a = r.attn;
    a.q = bound(K, l.qkv, 0, l.qkv_format), a.k = bound(K, l.qkv, 1, l.qkv_format), a.v = bound(K, l.qkv, 2, l.qkv_format);
    a.keys = cache_rows(inputs[r.k_cache], L, offset_), a.values = cache_rows(inputs[r.v_cache], L, offset_);
    a.heads = a.q.N / a.keys.D;
    a.o = bound(a.heads * a.values.D, l.out_proj, 0, l.out_format);
    a.rot = {l.dims, l.traditional, nullptr, rope_scale_[i]};
    a.scale = l.scale, a.causal = causal_;
    r.gate = bound(K, l.mlp, 0, l.mlp_format), r.up = bound(K, l.mlp, 1, l.mlp_format);
    r.down = bound(r.gate.N, l.mlp, 2, l.mlp_format);
    r.copy_k = take_cache_buffer(inputs[r.k_cache], outputs[1 + 2 * i]);
    r.copy_v = take_cache_buffer(inputs[r.v_cache], outputs[2 + 2 * i]);
    r.kc = outputs[1 + 2 * i].data<float>(), r.vc = outputs[2 + 2 * i].data<float>();
    r.k_bytes = outputs[1 + 2 * i].nbytes(), r.v_bytes = outputs[2 + 2 * i].nbytes();
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  for (auto& a : outputs) encoder.set_output_array(a);
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), runs = std::move(runs), layers = layers_, rows, K,
                    y = out.data<float>()]() mutable {
    std::vector<float> half(rows * K), between(rows * K);
    const float* x = reinterpret_cast<const float*>(ops[0].bytes());
    for (size_t i = 0; i < runs.size(); i++) {
      LayerRun& r = runs[i];
      const PlanLayer& l = (*layers)[i];
      if (r.copy_k) std::memcpy(r.kc, ops[r.k_cache].bytes(), r.k_bytes);
      if (r.copy_v) std::memcpy(r.vc, ops[r.v_cache].bytes(), r.v_bytes);
      r.attn.rot.inv_freq = reinterpret_cast<const float*>(ops[r.inv_freq].bytes());
      attention_half(r.attn, x, l.attn_norm.data<void>(), el_dtype_of(l.attn_norm.dtype()), l.attn_eps, rows, r.kc,
                     r.vc, half.data());
      float* next = i + 1 == runs.size() ? y : between.data();
      mlp_half(r.gate, r.up, r.down, half.data(), l.mlp_norm.data<void>(), el_dtype_of(l.mlp_norm.dtype()), l.mlp_eps,
               rows, next);
      x = next;
    }
  });
}

void CpuDecoderStack::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

std::vector<mx::Shape> CpuDecoderStack::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes = {inputs[0].shape()};
  for (size_t i = 0; i < layers_->size(); i++)
    shapes.insert(shapes.end(), {inputs[1 + 3 * i].shape(), inputs[2 + 3 * i].shape()});
  return shapes;
}

}  // namespace edge
