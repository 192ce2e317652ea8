// EdgeCpuMatmul: an MLX primitive (CPU only) that runs el_matmul, so the graph stays lazy and compilable.
#include "primitive.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

extern "C" {
#include "fused.h"
}

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
    Ws.push_back(weights_of(x.shape(-1), inputs[at], bits_ ? &inputs[at + 1] : nullptr, bits_, group_size_));
    ys.push_back(out.data<void>());
    y_dtypes.push_back(el_dtype_of(out.dtype()));
    y_sizes.push_back(out.size());
  }
  const int64_t rows = x.size() / x.shape(-1);
  const int norm_dtype = has_norm_ ? el_dtype_of(inputs.back().dtype()) : -1;
  std::vector<Operand> operands(inputs.begin(), inputs.end());
  encoder.dispatch([Ws = std::move(Ws), ys = std::move(ys), y_dtypes = std::move(y_dtypes),
                    y_sizes = std::move(y_sizes), rows, operands = std::move(operands),
                    x_dtype = el_dtype_of(x.dtype()), per = per_weight(), has_biases = has_biases_, norm_dtype, eps = eps_]() mutable {
    std::vector<float> xbuf;
    const int64_t K = Ws[0].K;
    const float* xf = x_as_float(operands[0].bytes(), x_dtype, rows * K, xbuf);
    if (norm_dtype >= 0) {  // x is float32 here (the op checked)
      xbuf.resize(rows * K);
      el_rms_norm(xf, operands.back().bytes(), norm_dtype, xbuf.data(), rows, K, eps);
      xf = xbuf.data();
    }
    std::vector<std::vector<float>> ybufs(Ws.size());
    std::vector<const el_weights*> wp;
    std::vector<float*> yf;
    for (size_t i = 0; i < Ws.size(); i++) {
      bind_weight(Ws[i], operands, 1 + i * per, has_biases);
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
  return bits_ == o.bits_ && group_size_ == o.group_size_ && has_biases_ == o.has_biases_ && count_ == o.count_ &&
         has_norm_ == o.has_norm_ && eps_ == o.eps_;
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
  el_weights W = weights_of(x.shape(-1), inputs[1], bits_ ? &inputs[2] : nullptr, bits_, group_size_);
  const size_t ids_at = bits_ ? (has_biases_ ? 4 : 3) : 2;
  const int64_t rows = x.size() / W.K;
  const int64_t rows_per_id = gathered_ ? rows / inputs[ids_at].size() : rows;
  const int x_dtype = el_dtype_of(x.dtype()), y_dtype = el_dtype_of(out.dtype());
  std::vector<Operand> operands(inputs.begin(), inputs.end());

  encoder.dispatch([W, rows, rows_per_id, x_dtype, y_dtype, operands = std::move(operands),
                    has_biases = has_biases_, gathered = gathered_, ids_at, y_ptr = out.data<void>(),
                    n = out.size()]() mutable {
    bind_weight(W, operands, 1, has_biases);
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
  check_weight(x.shape(-1), w, scales, biases, bits, group_size);
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
                                   bool has_biases, const std::optional<mx::array>& norm, float eps,
                                   mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check(is_float(x.dtype()) && x.ndim() >= 1, "x must be a float array");
  const size_t per = inputs_per_weight(bits, has_biases);
  const size_t count = ws.size() / per;
  check(count >= 1 && count <= EL_MAX_WEIGHTS && ws.size() == count * per, "matmul_many: 1 to 8 weights, each with "
        "its scales (and biases) when quantized");
  if (norm)
    check(x.dtype() == mx::float32 && is_float(norm->dtype()) && norm->ndim() == 1 && norm->shape(0) == x.shape(-1),
          "matmul_many: a norm takes float32 x and a weight [K]");
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < count; i++) {
    const auto& w = ws[i * per];
    check_set_weight(ws, i, bits, group_size, has_biases, x.shape(-1), -1, "matmul_many: weights must be [N, K']");
    auto shape = x.shape();
    shape.back() = w.shape(-2);
    shapes.push_back(shape);
    dtypes.push_back(mx::promote_types(x.dtype(), bits ? ws[i * per + 1].dtype() : w.dtype()));
  }
  std::vector<mx::array> inputs = {x};
  inputs.insert(inputs.end(), ws.begin(), ws.end());
  if (norm) inputs.push_back(*norm);
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<CpuMatmulMany>(stream, bits, group_size, has_biases, int(count), norm.has_value(), eps), inputs);
}

}  // namespace edge
