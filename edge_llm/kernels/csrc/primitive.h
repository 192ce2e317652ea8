#pragma once
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx_glue.h"

namespace edge {
namespace mx = mlx::core;

// x [..., K] @ W.T -> [..., N]; W quantized (bits > 0: w, scales, biases as MLX's affine format) or float (bits 0).
// With indices, w is a stack of experts [E, N, K'] and the rows of x split evenly among the ids in order.
mx::array matmul(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                 const std::optional<mx::array>& biases, const std::optional<mx::array>& indices, int bits,
                 int group_size, mx::StreamOrDevice s = {});

// [x @ W_i.T for each W_i]: weights sharing K and format (all float, or all quantized alike, biases or none), one
// job on the thread pool (a layer's q/k/v or gate/up projections). ws: w_i, or w_i, scales_i[, biases_i]. With
// norm, x is first RMS-normalized (as rms_norm(x, norm, eps): the pre-norm of a decoder layer, float32 x).
std::vector<mx::array> matmul_many(const mx::array& x, const std::vector<mx::array>& ws, int bits, int group_size,
                                   bool has_biases, const std::optional<mx::array>& norm = std::nullopt,
                                   float eps = 0.f, mx::StreamOrDevice s = {});

class CpuMatmulMany : public mx::Primitive {
 public:
  CpuMatmulMany(mx::Stream stream, int bits, int group_size, bool has_biases, int count, bool has_norm, float eps)
      : mx::Primitive(stream), bits_(bits), group_size_(group_size), has_biases_(has_biases), count_(count),
        has_norm_(has_norm), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EdgeCpuMatmulMany"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int per_weight() const { return inputs_per_weight(bits_, has_biases_); }
  int bits_, group_size_;
  bool has_biases_;
  int count_;
  bool has_norm_;  // inputs end with the norm's weight
  float eps_;
};

class CpuMatmul : public mx::Primitive {
 public:
  CpuMatmul(mx::Stream stream, int bits, int group_size, bool has_biases, bool gathered)
      : mx::Primitive(stream), bits_(bits), group_size_(group_size), has_biases_(has_biases), gathered_(gathered) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EdgeCpuMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_, group_size_;
  bool has_biases_, gathered_;
};

}  // namespace edge
