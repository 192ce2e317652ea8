#pragma once
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace edge {
namespace mx = mlx::core;

// mx.fast.rms_norm for float32 x [..., D] and a weight [D] of any float dtype.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});
// mx.fast.rope for float32 x [..., L, D] at positions offset.. with per-pair angles inv_freq [dims / 2] (float32).
mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& inv_freq, float scale, int offset,
               mx::StreamOrDevice s = {});
// mx.fast.scaled_dot_product_attention for float32 q [B, Hq, L, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; no
// mask or causal.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s = {});

class CpuFused : public mx::Primitive {
 public:
  enum Kind { RmsNorm, Rope, Attention };
  struct Params {
    Kind kind;
    float a = 0, b = 0;    // eps | traditional, scale | scale
    int64_t i = 0, j = 0;  // - | dims, offset | causal
    bool operator==(const Params& o) const { return kind == o.kind && a == o.a && b == o.b && i == o.i && j == o.j; }
  };
  CpuFused(mx::Stream stream, Params p) : mx::Primitive(stream), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override;
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const CpuFused&>(other).p_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  Params p_;
};

}  // namespace edge
