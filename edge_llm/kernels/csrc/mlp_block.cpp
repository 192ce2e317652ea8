// EdgeCpuMlpBlock (mlp_block.h): the norm, gate/up as one product, silu(gate) * up, down, the residual.
#include "mlp_block.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

#include "halves.h"

namespace edge {

void CpuMlpBlock::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  const auto& h = inputs[0];
  const int per = inputs_per_weight(bits_, has_biases_);
  const size_t gate_at = 2, up_at = 2 + per, down_at = 2 + 2 * per;
  const int64_t D = h.shape(-1), rows = h.size() / D, F = inputs[gate_at].shape(0);
  el_weights gate = weights_of(D, inputs[gate_at], bits_ ? &inputs[gate_at + 1] : nullptr, bits_, group_size_);
  el_weights up = weights_of(D, inputs[up_at], bits_ ? &inputs[up_at + 1] : nullptr, bits_, group_size_);
  el_weights down = weights_of(F, inputs[down_at], bits_ ? &inputs[down_at + 1] : nullptr, bits_, group_size_);
  const int norm_dtype = el_dtype_of(inputs[1].dtype());
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  encoder.dispatch([ops = std::move(ops), gate, up, down, gate_at, up_at, down_at, rows, norm_dtype, eps = eps_,
                    has_biases = has_biases_, y = out.data<float>()]() mutable {
    bind_weight(gate, ops, gate_at, has_biases);
    bind_weight(up, ops, up_at, has_biases);
    bind_weight(down, ops, down_at, has_biases);
    mlp_half(gate, up, down, reinterpret_cast<const float*>(ops[0].bytes()), ops[1].bytes(), norm_dtype, eps, rows, y);
  });
}

void CpuMlpBlock::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

mx::array mlp_block(const mx::array& h, const mx::array& norm, float eps, const std::vector<mx::array>& ws, int bits,
                    int group_size, bool has_biases, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  check(h.dtype() == mx::float32 && h.ndim() >= 1, "mlp block: float32 h");
  const int64_t D = h.shape(-1);
  check(is_float(norm.dtype()) && norm.ndim() == 1 && norm.shape(0) == D, "mlp block: the norm's weight must be [D]");
  const size_t per = inputs_per_weight(bits, has_biases);
  check(ws.size() == 3 * per, "mlp block: gate, up and down, each with its scales (and biases) when quantized");
  auto part = [&](size_t i, int64_t K, int64_t N, const char* what) {
    check_set_weight(ws, i, bits, group_size, has_biases, K, N, what);
  };
  part(0, D, -1, "mlp block: gate must be [F, D]");
  const int64_t F = ws[0].shape(0);
  part(1, D, F, "mlp block: up must be [F, D]");
  part(2, F, D, "mlp block: down must be [D, F]");
  std::vector<mx::array> inputs = {h, norm};
  inputs.insert(inputs.end(), ws.begin(), ws.end());
  return mx::array(h.shape(), mx::float32, std::make_shared<CpuMlpBlock>(stream, bits, group_size, has_biases, eps),
                   std::move(inputs));
}

}  // namespace edge
