// EdgeCpuMatmul: an MLX primitive (CPU only) that runs el_matmul, so the graph stays lazy and compilable.
#include "primitive.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

namespace edge {

namespace {

template <typename T>
void to_float(const void* src, float* dst, size_t n) {
  const T* s = static_cast<const T*>(src);
  for (size_t i = 0; i < n; i++) dst[i] = static_cast<float>(s[i]);
}

template <typename T>
void from_float(const float* src, void* dst, size_t n) {
  T* d = static_cast<T*>(dst);
  for (size_t i = 0; i < n; i++) d[i] = static_cast<T>(src[i]);
}

}  // namespace

void CpuMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);

  const mx::array& x = inputs[0];
  const mx::array& w = inputs[1];
  el_weights W{};
  W.bits = bits_;
  W.group_size = group_size_;
  W.K = x.shape(-1);
  W.N = w.shape(-2);
  W.E = w.ndim() == 3 ? w.shape(0) : 1;
  if (bits_) W.s_dtype = el_dtype_of(inputs[2].dtype());
  else W.w_dtype = el_dtype_of(w.dtype());
  const size_t ids_at = bits_ ? (has_biases_ ? 4 : 3) : 2;
  const int64_t rows = x.size() / W.K;
  const int64_t rows_per_id = gathered_ ? rows / inputs[ids_at].size() : rows;
  const int x_dtype = el_dtype_of(x.dtype()), y_dtype = el_dtype_of(out.dtype());
  std::vector<Operand> operands(inputs.begin(), inputs.end());

  encoder.dispatch([W, rows, rows_per_id, x_dtype, y_dtype, operands = std::move(operands), bits = bits_,
                    has_biases = has_biases_, gathered = gathered_, ids_at, y_ptr = out.data<void>(),
                    n = out.size()]() mutable {
    const uint8_t* x_ptr = operands[0].bytes();
    W.w = operands[1].bytes();
    if (bits) {
      W.scales = operands[2].bytes();
      W.biases = has_biases ? operands[3].bytes() : nullptr;
    }
    const uint32_t* ids = gathered ? reinterpret_cast<const uint32_t*>(operands[ids_at].bytes()) : nullptr;
    std::vector<float> xbuf, ybuf;
    const float* xf = reinterpret_cast<const float*>(x_ptr);
    if (x_dtype != EL_F32) {
      xbuf.resize(rows * W.K);
      if (x_dtype == EL_F16) to_float<mx::float16_t>(x_ptr, xbuf.data(), xbuf.size());
      else to_float<mx::bfloat16_t>(x_ptr, xbuf.data(), xbuf.size());
      xf = xbuf.data();
    }
    float* yf = static_cast<float*>(y_ptr);
    if (y_dtype != EL_F32) {
      ybuf.resize(n);
      yf = ybuf.data();
    }
    if (el_matmul(&W, xf, yf, rows, ids, rows_per_id) != 0) {
      // Only an expert id out of range gets here (the op checked everything else): NaN, never garbage.
      for (size_t i = 0; i < n; i++) yf[i] = __builtin_nanf("");
    }
    if (y_dtype == EL_F16) from_float<mx::float16_t>(yf, y_ptr, n);
    else if (y_dtype == EL_BF16) from_float<mx::bfloat16_t>(yf, y_ptr, n);
  });
}

void CpuMatmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

bool CpuMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const CpuMatmul&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && has_biases_ == o.has_biases_ && gathered_ == o.gathered_;
}

std::vector<mx::Shape> CpuMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(-2);
  return {shape};
}

mx::array matmul(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                 const std::optional<mx::array>& biases, const std::optional<mx::array>& indices, int bits,
                 int group_size, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check(is_float(x.dtype()) && x.ndim() >= 1, "x must be a float array");
  check(w.ndim() == 2 || w.ndim() == 3, "w must be [N, K'] or [E, N, K']");
  const int64_t K = x.shape(-1);
  std::vector<mx::array> inputs = {x, w};
  if (bits) {
    check(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 2-6 or 8");
    check(group_size == 32 || group_size == 64 || group_size == 128, "group size must be 32, 64 or 128");
    check(w.dtype() == mx::uint32 && K % group_size == 0 && int64_t(w.shape(-1)) * 32 == K * bits,
          "w does not hold K values of these bits per row");
    check(scales.has_value() && is_float(scales->dtype()) && scales->ndim() == w.ndim() &&
              scales->shape(-1) * group_size == K && scales->shape(-2) == w.shape(-2) &&
              (w.ndim() == 2 || scales->shape(0) == w.shape(0)),
          "scales must be [.., N, K / group_size]");
    inputs.push_back(*scales);
    if (biases) {
      check(biases->dtype() == scales->dtype() && biases->shape() == scales->shape(), "biases must match scales");
      inputs.push_back(*biases);
    }
  } else {
    check(is_float(w.dtype()) && w.shape(-1) == K, "float w must be [.., N, K]");
  }
  if (indices) {
    check(indices->dtype() == mx::uint32 && w.ndim() == 3, "indices must be uint32 ids into w's experts");
    const int64_t rows = x.size() / K;
    check(indices->size() > 0 && rows % int64_t(indices->size()) == 0, "rows must split evenly among indices");
    inputs.push_back(*indices);
  } else {
    check(w.ndim() == 2, "a stack of experts needs indices");
  }
  auto shape = x.shape();
  shape.back() = w.shape(-2);
  // as MLX's ops: x promoted with the scales (quantized) or the weight (float)
  const auto dtype = mx::promote_types(x.dtype(), bits ? scales->dtype() : w.dtype());
  return mx::array(shape, dtype,
                   std::make_shared<CpuMatmul>(stream, bits, group_size, biases.has_value(), indices.has_value()),
                   std::move(inputs));
}

}  // namespace edge
