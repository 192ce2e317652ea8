// A decoder layer's feed-forward half as one op (decoding on the CPU): h + down(silu(gate(n)) * up(n)) for
// n = rms_norm(h, norm, eps), a dense SwiGLU MLP. Bit for bit what the ops give one by one: the same norm and
// products, MLX's own sigmoid (csrc/silu.c) and float32 multiplies and adds.
#pragma once
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace edge {
namespace mx = mlx::core;

// h float32 [..., D]; ws: gate, up, down, each w (float) or w, scales[, biases] (quantized alike).
mx::array mlp_block(const mx::array& h, const mx::array& norm, float eps, const std::vector<mx::array>& ws, int bits,
                    int group_size, bool has_biases, mx::StreamOrDevice s = {});

class CpuMlpBlock : public mx::UnaryPrimitive {
 public:
  CpuMlpBlock(mx::Stream stream, int bits, int group_size, bool has_biases, float eps)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size), has_biases_(has_biases), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "EdgeCpuMlpBlock"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuMlpBlock&>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_ && has_biases_ == o.has_biases_ && eps_ == o.eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  int bits_, group_size_;
  bool has_biases_;
  float eps_;
};

}  // namespace edge
