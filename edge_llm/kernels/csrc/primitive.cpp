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

// x as float32: the buffer itself, or a conversion into buf.
const float* x_as_float(const uint8_t* x, int dtype, size_t n, std::vector<float>& buf) {
  if (dtype == EL_F32) return reinterpret_cast<const float*>(x);
  buf.resize(n);
  if (dtype == EL_F16) to_float<mx::float16_t>(x, buf.data(), n);
  else to_float<mx::bfloat16_t>(x, buf.data(), n);
  return buf.data();
}

// Where el_matmul writes y: the output itself (float32), or buf, converted by store_y afterwards.
float* y_as_float(void* y, int dtype, size_t n, std::vector<float>& buf) {
  if (dtype == EL_F32) return static_cast<float*>(y);
  buf.resize(n);
  return buf.data();
}

void store_y(const float* yf, void* y, int dtype, size_t n) {
  if (dtype == EL_F16) from_float<mx::float16_t>(yf, y, n);
  else if (dtype == EL_BF16) from_float<mx::bfloat16_t>(yf, y, n);
}

el_weights weights_of(const mx::array& x, const mx::array& w, const mx::array* scales, int bits, int group_size) {
  el_weights W{};
  W.bits = bits;
  W.group_size = group_size;
  W.K = x.shape(-1);
  W.N = w.shape(-2);
  W.E = w.ndim() == 3 ? w.shape(0) : 1;
  if (bits) W.s_dtype = el_dtype_of(scales->dtype());
  else W.w_dtype = el_dtype_of(w.dtype());
  return W;
}

// The checks both ops make of one weight (and its scales and biases) against x's K.
void check_weight(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                  const std::optional<mx::array>& biases, int bits, int group_size) {
  const int64_t K = x.shape(-1);
  check(w.ndim() == 2 || w.ndim() == 3, "w must be [N, K'] or [E, N, K']");
  if (!bits) {
    check(is_float(w.dtype()) && w.shape(-1) == K, "float w must be [.., N, K]");
    return;
  }
  check(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 2-6 or 8");
  check(group_size == 32 || group_size == 64 || group_size == 128, "group size must be 32, 64 or 128");
  check(w.dtype() == mx::uint32 && K % group_size == 0 && int64_t(w.shape(-1)) * 32 == K * bits,
        "w does not hold K values of these bits per row");
  check(scales.has_value() && is_float(scales->dtype()) && scales->ndim() == w.ndim() &&
            scales->shape(-1) * group_size == K && scales->shape(-2) == w.shape(-2) &&
            (w.ndim() == 2 || scales->shape(0) == w.shape(0)),
        "scales must be [.., N, K / group_size]");
  if (biases)
    check(biases->dtype() == scales->dtype() && biases->shape() == scales->shape(), "biases must match scales");
}

}  // namespace

void CpuMatmulMany::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  std::vector<el_weights> Ws;
  std::vector<void*> ys;
  std::vector<int> y_dtypes;
  std::vector<size_t> y_sizes;
  const mx::array& x = inputs[0];
  for (int i = 0; i < count_; i++) {
    auto& out = outputs[i];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    const size_t at = 1 + i * per_weight();
    Ws.push_back(weights_of(x, inputs[at], bits_ ? &inputs[at + 1] : nullptr, bits_, group_size_));
    ys.push_back(out.data<void>());
    y_dtypes.push_back(el_dtype_of(out.dtype()));
    y_sizes.push_back(out.size());
  }
  const int64_t rows = x.size() / x.shape(-1);
  std::vector<Operand> operands(inputs.begin(), inputs.end());
  encoder.dispatch([Ws, ys, y_dtypes, y_sizes, rows, operands = std::move(operands), x_dtype = el_dtype_of(x.dtype()),
                    per = per_weight(), bits = bits_, has_biases = has_biases_]() mutable {
    std::vector<float> xbuf;
    const float* xf = x_as_float(operands[0].bytes(), x_dtype, rows * Ws[0].K, xbuf);
    std::vector<std::vector<float>> ybufs(Ws.size());
    std::vector<const el_weights*> wp;
    std::vector<float*> yf;
    for (size_t i = 0; i < Ws.size(); i++) {
      const size_t at = 1 + i * per;
      Ws[i].w = operands[at].bytes();
      if (bits) {
        Ws[i].scales = operands[at + 1].bytes();
        Ws[i].biases = has_biases ? operands[at + 2].bytes() : nullptr;
      }
      wp.push_back(&Ws[i]);
      yf.push_back(y_as_float(ys[i], y_dtypes[i], y_sizes[i], ybufs[i]));
    }
    if (el_matmul_many(wp.data(), int(wp.size()), xf, yf.data(), rows) != 0) {
      for (size_t i = 0; i < yf.size(); i++) std::fill(yf[i], yf[i] + y_sizes[i], __builtin_nanf(""));
    }
    for (size_t i = 0; i < yf.size(); i++) store_y(yf[i], ys[i], y_dtypes[i], y_sizes[i]);
  });
}

void CpuMatmulMany::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

bool CpuMatmulMany::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const CpuMatmulMany&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && has_biases_ == o.has_biases_ && count_ == o.count_;
}

std::vector<mx::Shape> CpuMatmulMany::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (int i = 0; i < count_; i++) {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1 + i * per_weight()].shape(-2);
    shapes.push_back(shape);
  }
  return shapes;
}

void CpuMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);

  const mx::array& x = inputs[0];
  el_weights W = weights_of(x, inputs[1], bits_ ? &inputs[2] : nullptr, bits_, group_size_);
  const size_t ids_at = bits_ ? (has_biases_ ? 4 : 3) : 2;
  const int64_t rows = x.size() / W.K;
  const int64_t rows_per_id = gathered_ ? rows / inputs[ids_at].size() : rows;
  const int x_dtype = el_dtype_of(x.dtype()), y_dtype = el_dtype_of(out.dtype());
  std::vector<Operand> operands(inputs.begin(), inputs.end());

  encoder.dispatch([W, rows, rows_per_id, x_dtype, y_dtype, operands = std::move(operands), bits = bits_,
                    has_biases = has_biases_, gathered = gathered_, ids_at, y_ptr = out.data<void>(),
                    n = out.size()]() mutable {
    W.w = operands[1].bytes();
    if (bits) {
      W.scales = operands[2].bytes();
      W.biases = has_biases ? operands[3].bytes() : nullptr;
    }
    const uint32_t* ids = gathered ? reinterpret_cast<const uint32_t*>(operands[ids_at].bytes()) : nullptr;
    std::vector<float> xbuf, ybuf;
    const float* xf = x_as_float(operands[0].bytes(), x_dtype, rows * W.K, xbuf);
    float* yf = y_as_float(y_ptr, y_dtype, n, ybuf);
    if (el_matmul(&W, xf, yf, rows, ids, rows_per_id) != 0) {
      // Only an expert id out of range gets here (the op checked everything else): NaN, never garbage.
      for (size_t i = 0; i < n; i++) yf[i] = __builtin_nanf("");
    }
    store_y(yf, y_ptr, y_dtype, n);
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
  check_weight(x, w, scales, biases, bits, group_size);
  const int64_t K = x.shape(-1);
  std::vector<mx::array> inputs = {x, w};
  if (bits) {
    inputs.push_back(*scales);
    if (biases) inputs.push_back(*biases);
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

namespace edge {

std::vector<mx::array> matmul_many(const mx::array& x, const std::vector<mx::array>& ws, int bits, int group_size,
                                   bool has_biases, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check(is_float(x.dtype()) && x.ndim() >= 1, "x must be a float array");
  const size_t per = bits ? (has_biases ? 3 : 2) : 1;
  const size_t count = ws.size() / per;
  check(count >= 1 && count <= EL_MAX_WEIGHTS && ws.size() == count * per, "matmul_many: 1 to 8 weights, each with "
        "its scales (and biases) when quantized");
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < count; i++) {
    const auto& w = ws[i * per];
    std::optional<mx::array> scales, biases;
    if (bits) scales = ws[i * per + 1];
    if (bits && has_biases) biases = ws[i * per + 2];
    check_weight(x, w, scales, biases, bits, group_size);
    check(w.ndim() == 2, "matmul_many: weights must be [N, K']");
    check(!bits || scales->dtype() == ws[1].dtype(), "matmul_many: scales must share a dtype");
    auto shape = x.shape();
    shape.back() = w.shape(-2);
    shapes.push_back(shape);
    dtypes.push_back(mx::promote_types(x.dtype(), bits ? scales->dtype() : w.dtype()));
  }
  std::vector<mx::array> inputs = {x};
  inputs.insert(inputs.end(), ws.begin(), ws.end());
  return mx::array::make_arrays(std::move(shapes), dtypes,
                                std::make_shared<CpuMatmulMany>(stream, bits, group_size, has_biases, int(count)),
                                inputs);
}

}  // namespace edge
