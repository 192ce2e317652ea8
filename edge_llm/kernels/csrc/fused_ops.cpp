// CpuFused: one MLX primitive per fast op (fused.c does the work), so a decode step dispatches a few ops
// where MLX's CPU fallbacks dispatch dozens.
#include "fused_ops.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx_glue.h"

extern "C" {
#include "fused.h"
}

namespace edge {

void CpuFused::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  // the buffers stay alive until the task has run (without this an input nothing else held could be freed, and
  // its memory reused, before the task read it: wrong results now and then, and segfaults)
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  std::vector<Operand> ops(inputs.begin(), inputs.end());
  auto* y = out.data<float>();
  const Params p = p_;
  if (p.kind == RmsNorm) {
    const int64_t D = inputs[0].shape(-1), rows = inputs[0].size() / D;
    const int w_dtype = el_dtype_of(inputs[1].dtype());
    encoder.dispatch([ops = std::move(ops), y, p, D, rows, w_dtype]() mutable {
      el_rms_norm(reinterpret_cast<const float*>(ops[0].bytes()), ops[1].bytes(), w_dtype, y, rows, D, p.a);
    });
  } else if (p.kind == Rope) {
    const auto& x = inputs[0];
    const int64_t D = x.shape(-1), L = x.shape(-2), heads = x.size() / (D * L);
    encoder.dispatch([ops = std::move(ops), y, p, D, L, heads]() mutable {
      el_rope(reinterpret_cast<const float*>(ops[0].bytes()), y, heads, L, D, p.i, p.a != 0,
              reinterpret_cast<const float*>(ops[1].bytes()), p.b, p.j);
    });
  } else {
    const auto &q = inputs[0], &k = inputs[1];
    el_attention_args a{};
    a.B = q.shape(0), a.Hq = q.shape(1), a.L = q.shape(2), a.D = q.shape(3), a.Hkv = k.shape(1), a.T = k.shape(2);
    a.Dv = inputs[2].shape(3);
    a.scale = p.a;
    a.causal = p.j != 0;
    a.out = y;
    // keys and values are read in place through their strides (a cache buffer's leading rows) when their last
    // axis is contiguous; otherwise gathered first (then the row-major strides of the copy)
    bool direct[3] = {true, true, true};
    for (int t = 1; t <= 2; t++) {
      const auto& in = inputs[t];
      direct[t] = in.strides(3) == 1 || in.shape(3) == 1;
      int64_t* strides = t == 1 ? a.k_strides : a.v_strides;
      for (int d = 0; d < 3; d++)
        strides[d] = direct[t] ? in.strides(d) : (d == 0 ? in.shape(1) * in.shape(2) * in.shape(3)
                                                   : d == 1 ? in.shape(2) * in.shape(3) : in.shape(3));
    }
    encoder.dispatch([ops = std::move(ops), a, direct]() mutable {
      a.q = reinterpret_cast<const float*>(ops[0].bytes());
      a.k = reinterpret_cast<const float*>(direct[1] ? ops[1].data : ops[1].bytes());
      a.v = reinterpret_cast<const float*>(direct[2] ? ops[2].data : ops[2].bytes());
      el_attention(&a);
    });
  }
}

void CpuFused::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("edge-llm's CPU kernels have no GPU implementation");
}

const char* CpuFused::name() const {
  return p_.kind == RmsNorm ? "EdgeCpuRmsNorm" : p_.kind == Rope ? "EdgeCpuRope" : "EdgeCpuAttention";
}

std::vector<mx::Shape> CpuFused::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  if (p_.kind == Attention) shape.back() = inputs[2].shape(-1);
  return {shape};
}

static mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device == mx::Device::cpu, "CPU streams only");
  return stream;
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  check(x.dtype() == mx::float32 && x.ndim() >= 1, "rms_norm takes float32 x");
  check(is_float(weight.dtype()) && weight.ndim() == 1 && weight.shape(0) == x.shape(-1), "weight must be [D]");
  return mx::array(x.shape(), mx::float32, std::make_shared<CpuFused>(stream, CpuFused::Params{CpuFused::RmsNorm, eps}),
                   {x, weight});
}

mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& inv_freq, float scale, int offset,
               mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  check(x.dtype() == mx::float32 && x.ndim() >= 2, "rope takes float32 x [..., L, D]");
  check(dims % 2 == 0 && dims <= x.shape(-1), "rope: dims must be even and at most D");
  check(inv_freq.dtype() == mx::float32 && inv_freq.size() == size_t(dims / 2), "rope: inv_freq must be [dims/2]");
  CpuFused::Params p{CpuFused::Rope, traditional ? 1.f : 0.f, scale, dims, offset};
  return mx::array(x.shape(), mx::float32, std::make_shared<CpuFused>(stream, p), {x, inv_freq});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  check(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32, "attention: float32");
  check(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "attention: q, k, v must be [B, H, L, D]");
  check(k.shape(0) == q.shape(0) && k.shape(3) == q.shape(3) && v.shape(0) == k.shape(0) && v.shape(1) == k.shape(1)
            && v.shape(2) == k.shape(2), "attention: q [B, Hq, L, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]");
  check(k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0, "attention: heads must be a multiple of kv heads");
  check(!causal || k.shape(2) >= q.shape(2), "attention: causal needs as many keys as queries");
  CpuFused::Params p{CpuFused::Attention, scale, 0, 0, causal ? 1 : 0};
  auto shape = q.shape();
  shape.back() = v.shape(3);
  return mx::array(shape, mx::float32, std::make_shared<CpuFused>(stream, p), {q, k, v});
}

}  // namespace edge
