// EdgeCpuDequantizedRows (embedding.h).
#include "embedding.h"

#include <cmath>
#include <cstring>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

namespace edge {

namespace {

// The ids as int64, whatever integer dtype they come in.
int64_t id_at(const uint8_t* ids, mx::Dtype dtype, size_t i) {
  switch (dtype) {
    case mx::uint32: return reinterpret_cast<const uint32_t*>(ids)[i];
    case mx::int32: return reinterpret_cast<const int32_t*>(ids)[i];
    case mx::int64: return reinterpret_cast<const int64_t*>(ids)[i];
    case mx::uint64: return int64_t(reinterpret_cast<const uint64_t*>(ids)[i] & 0x7FFFFFFFFFFFFFFFull);
    case mx::uint16: return reinterpret_cast<const uint16_t*>(ids)[i];
    case mx::int16: return reinterpret_cast<const int16_t*>(ids)[i];
    case mx::uint8: return ids[i];
    default: return reinterpret_cast<const int8_t*>(ids)[i];
  }
}

bool is_integer(mx::Dtype t) {
  return t == mx::uint32 || t == mx::int32 || t == mx::int64 || t == mx::uint64 || t == mx::uint16 ||
         t == mx::int16 || t == mx::uint8 || t == mx::int8;
}

}  // namespace

void CpuDequantizedRows::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  const int64_t N = inputs[1].shape(0), words = inputs[1].shape(1), K = words * 32 / bits_;
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), ids_dtype = inputs[0].dtype(), count = inputs[0].size(), N, K, words,
                    bits = bits_, group_size = group_size_, has_biases = has_biases_, y = out.data<float>()]() mutable {
    const uint8_t* ids = ops[0].bytes();
    const uint8_t* w = ops[1].bytes();
    const float* scales = reinterpret_cast<const float*>(ops[2].bytes());
    const float* biases = has_biases ? reinterpret_cast<const float*>(ops[3].bytes()) : nullptr;
    const int64_t groups = K / group_size;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    for (size_t i = 0; i < count; i++) {
      float* row = y + i * K;
      const int64_t id = id_at(ids, ids_dtype, i);
      if (id < 0 || id >= N) {
        std::fill(row, row + K, NAN);
        continue;
      }
      const uint8_t* packed = w + id * words * 4;  // a little-endian bit stream, value k at bits k * bits ..
      for (int64_t k = 0; k < K; k++) {
        const int64_t bit = k * bits;
        uint64_t chunk = 0;
        std::memcpy(&chunk, packed + bit / 8, std::min<int64_t>(8, words * 4 - bit / 8));
        const float q = float((chunk >> (bit % 8)) & mask);
        const int64_t g = id * groups + k / group_size;
        const float scaled = q * scales[g];  // two roundings, as MLX's multiply then add
        row[k] = biases ? scaled + biases[g] : scaled;
      }
    }
  });
}

void CpuDequantizedRows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

std::vector<mx::Shape> CpuDequantizedRows::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.push_back(inputs[1].shape(1) * 32 / bits_);
  return {shape};
}

mx::array dequantized_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                           const std::optional<mx::array>& biases, int bits, int group_size, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check(is_integer(ids.dtype()), "dequantized rows: integer ids");
  check(w.ndim() == 2 && scales.ndim() == 2, "dequantized rows: w [N, K'] and scales [N, groups]");
  check(scales.dtype() == mx::float32 && (!biases || biases->dtype() == mx::float32),
        "dequantized rows: float32 scales and biases");
  const int64_t K = int64_t(w.shape(1)) * 32 / std::max(bits, 1);
  check_weight(K, w, scales, biases, bits, group_size);
  auto shape = ids.shape();
  shape.push_back(int(K));
  std::vector<mx::array> inputs = {ids, w, scales};
  if (biases) inputs.push_back(*biases);
  return mx::array(shape, mx::float32,
                   std::make_shared<CpuDequantizedRows>(stream, bits, group_size, biases.has_value()), inputs);
}

}  // namespace edge
