// A quantized embedding table's rows for token ids, as one op (MLX's lookup, mx.dequantize(w[ids], scales[ids],
// biases[ids]), is ~25 small ops on the CPU: three gathers and the unpacking's shifts, masks and casts). Float32
// scales and biases only (the CPU's: machine/backend.DtypePolicy keeps an embedding's scales in the compute dtype),
// where MLX's arithmetic is float(q) * scale + bias, a product and then a sum, in float32: the same bits.
#pragma once
#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace edge {
namespace mx = mlx::core;

// ids: integer array of any shape; w [N, K * bits / 32] uint32, scales/biases [N, K / group_size] float32.
// Returns float32 [*ids.shape, K]; an id outside [0, N) gives a row of NaN.
mx::array dequantized_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                           const std::optional<mx::array>& biases, int bits, int group_size, mx::StreamOrDevice s = {});

class CpuDequantizedRows : public mx::UnaryPrimitive {
 public:
  CpuDequantizedRows(mx::Stream stream, int bits, int group_size, bool has_biases)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size), has_biases_(has_biases) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "EdgeCpuDequantizedRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuDequantizedRows&>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_ && has_biases_ == o.has_biases_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_, group_size_;
  bool has_biases_;
};

}  // namespace edge
