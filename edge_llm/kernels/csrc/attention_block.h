// A decoder layer's attention half as one op (decoding on the CPU): for n = rms_norm(x, norm, eps) and q/k/v its
// projections, the new keys (rotated) and values written into the cache buffers at rows offset.. (in place when
// nothing else holds them), attention over the offset + L rows, and out = x + attention @ W_o.T. Bit for bit
// matmul_many(norm=...) then attention_step(out_proj=..., residual=x): the same functions in the same order, with
// one dispatch where those take four (the projections, two cache writes, attention).
#pragma once
#include <vector>

#include "attention_step.h"

namespace edge {

// How a set of weights is stored: float (bits 0), or quantized alike.
struct WeightFormat {
  int bits = 0, group_size = 0;
  bool has_biases = false;
  bool operator==(const WeightFormat& o) const {
    return bits == o.bits && group_size == o.group_size && has_biases == o.has_biases;
  }
};

// x float32 [B, L, hidden]; qkv: q, k, v (each w, or w, scales[, biases]) in format f; out_proj: W_o in format fo;
// caches and rope as attention_step's. Returns {out [B, L, hidden], k_cache', v_cache'}.
std::vector<mx::array> attention_block(const mx::array& x, const mx::array& norm, float eps,
                                       const std::vector<mx::array>& qkv, const std::vector<mx::array>& out_proj,
                                       const mx::array& k_cache, const mx::array& v_cache, int offset, int dims,
                                       bool traditional, const mx::array& inv_freq, float rope_scale, float scale,
                                       bool causal, WeightFormat f, WeightFormat fo, mx::StreamOrDevice s = {});

class CpuAttentionBlock : public mx::Primitive {
 public:
  CpuAttentionBlock(mx::Stream stream, StepParams p, float eps, WeightFormat f, WeightFormat fo)
      : mx::Primitive(stream), p_(p), eps_(eps), f_(f), fo_(fo) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EdgeCpuAttentionBlock"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuAttentionBlock&>(other);
    return p_ == o.p_ && eps_ == o.eps_ && f_ == o.f_ && fo_ == o.fo_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  StepParams p_;
  float eps_;
  WeightFormat f_, fo_;
};

}  // namespace edge
