// DecodePlan (decode_plan.h): two ops per layer, made in a loop here rather than in Python.
#include "decode_plan.h"

#include "mlp_block.h"
#include "mlx_glue.h"

namespace edge {

std::tuple<mx::array, std::vector<mx::array>, std::vector<mx::array>> DecodePlan::run(
    mx::array h, const std::vector<mx::array>& k_caches, const std::vector<mx::array>& v_caches,
    const std::vector<mx::array>& inv_freq, const std::vector<float>& rope_scale, int offset) const {
  const size_t n = layers_.size();
  check(k_caches.size() == n && v_caches.size() == n && inv_freq.size() == n && rope_scale.size() == n,
        "decode plan: one k cache, v cache, set of angles and position scale per layer");
  check(h.ndim() == 3, "decode plan: h must be [B, L, hidden]");
  const bool causal = h.shape(1) > 1;
  std::vector<mx::array> ks, vs;
  ks.reserve(n), vs.reserve(n);
  for (size_t i = 0; i < n; i++) {
    const PlanLayer& l = layers_[i];
    auto out = attention_block(h, l.attn_norm, l.attn_eps, l.qkv, l.out_proj, k_caches[i], v_caches[i], offset, l.dims,
                               l.traditional, inv_freq[i], rope_scale[i], l.scale, causal, l.qkv_format,
                               l.out_format);
    h = mlp_block(out[0], l.mlp_norm, l.mlp_eps, l.mlp, l.mlp_format.bits, l.mlp_format.group_size,
                  l.mlp_format.has_biases);
    ks.push_back(std::move(out[1]));
    vs.push_back(std::move(out[2]));
  }
  return {std::move(h), std::move(ks), std::move(vs)};
}

}  // namespace edge
