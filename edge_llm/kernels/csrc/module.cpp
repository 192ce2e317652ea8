// The Python module edge-llm loads (edge_llm/kernels/extension.py): nanobind, in MLX's nanobind domain so
// mlx.core.array passes through as is.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_block.h"
#include "attention_step.h"
#include "decode_plan.h"
#include "embedding.h"
#include "fused_ops.h"
#include "mlp_block.h"
#include "primitive.h"

extern "C" {
#include "kernels.h"
}

namespace nb = nanobind;
using namespace nb::literals;

namespace {
// (bits, group_size, has_biases) as Python passes a weight set's format
edge::WeightFormat weight_format(std::tuple<int, int, bool> t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }
}  // namespace

NB_MODULE(_edge_kernels, m) {
  m.doc() = "edge-llm CPU kernels for MLX";
  m.def("matmul", &edge::matmul, "x"_a, "w"_a, "scales"_a = nb::none(), "biases"_a = nb::none(),
        "indices"_a = nb::none(), "bits"_a = 0, "group_size"_a = 0, nb::kw_only(), "stream"_a = nb::none(),
        "x @ W.T on the CPU for quantized (bits > 0) or float W; with indices, one expert per run of rows");
  m.def("matmul_many", &edge::matmul_many, "x"_a, "ws"_a, "bits"_a = 0, "group_size"_a = 0, "has_biases"_a = false,
        "norm"_a = nb::none(), "eps"_a = 0.f, nb::kw_only(), "stream"_a = nb::none(),
        "[x @ W.T for each W] in one job: ws lists each weight (with its scales and biases when quantized); with "
        "norm, of rms_norm(x, norm, eps)");
  m.def("dequantized_rows", &edge::dequantized_rows, "ids"_a, "w"_a, "scales"_a, "biases"_a = nb::none(), "bits"_a,
        "group_size"_a, nb::kw_only(), "stream"_a = nb::none(),
        "a quantized table's rows for ids, float32 (float32 scales and biases: MLX's dequantize, the same bits)");
  m.def("rms_norm", &edge::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rope", &edge::rope, "x"_a, "dims"_a, "traditional"_a, "inv_freq"_a, "scale"_a, "offset"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("attention", &edge::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("attention_step", &edge::attention_step, "q"_a, "k"_a, "v"_a, "k_cache"_a, "v_cache"_a, "offset"_a, "dims"_a,
        "traditional"_a, "inv_freq"_a, "rope_scale"_a, "scale"_a, "causal"_a, "out_proj"_a = std::vector<mlx::core::array>{},
        "bits"_a = 0, "group_size"_a = 0, "has_biases"_a = false, "residual"_a = nb::none(), nb::kw_only(),
        "stream"_a = nb::none());
  m.def(
      "attention_block",
      [](const mlx::core::array& x, const mlx::core::array& norm, float eps, const std::vector<mlx::core::array>& qkv,
         const std::vector<mlx::core::array>& out_proj, const mlx::core::array& k_cache,
         const mlx::core::array& v_cache, int offset, int dims, bool traditional, const mlx::core::array& inv_freq,
         float rope_scale, float scale, bool causal, std::tuple<int, int, bool> f, std::tuple<int, int, bool> fo) {
        return edge::attention_block(x, norm, eps, qkv, out_proj, k_cache, v_cache, offset, dims, traditional,
                                     inv_freq, rope_scale, scale, causal, weight_format(f), weight_format(fo));
      },
      "x"_a, "norm"_a, "eps"_a, "qkv"_a, "out_proj"_a, "k_cache"_a, "v_cache"_a, "offset"_a, "dims"_a,
      "traditional"_a, "inv_freq"_a, "rope_scale"_a, "scale"_a, "causal"_a, "qkv_format"_a, "out_format"_a,
      "x + o(attention) for q/k/v of rms_norm(x), the cache rows written: one op; formats (bits, group_size, "
      "has_biases)");
  nb::class_<edge::DecodePlan>(m, "DecodePlan",
                                "a dense decoder stack's decode step as one call: attention_block + mlp_block per layer")
      .def(nb::init<>())
      .def(
          "add_layer",
          [](edge::DecodePlan& plan, const mlx::core::array& attn_norm, float attn_eps,
             const std::vector<mlx::core::array>& qkv, const std::vector<mlx::core::array>& out_proj,
             std::tuple<int, int, bool> qkv_format, std::tuple<int, int, bool> out_format, int dims, bool traditional,
             float scale, const mlx::core::array& mlp_norm, float mlp_eps, const std::vector<mlx::core::array>& mlp,
             std::tuple<int, int, bool> mlp_format) {
            plan.add_layer({attn_norm, attn_eps, qkv, out_proj, weight_format(qkv_format), weight_format(out_format),
                            dims, traditional, scale, mlp_norm, mlp_eps, mlp, weight_format(mlp_format)});
          },
          "attn_norm"_a, "attn_eps"_a, "qkv"_a, "out_proj"_a, "qkv_format"_a, "out_format"_a, "dims"_a,
          "traditional"_a, "scale"_a, "mlp_norm"_a, "mlp_eps"_a, "mlp"_a, "mlp_format"_a)
      .def("__len__", &edge::DecodePlan::size)
      .def("run", &edge::DecodePlan::run, "h"_a, "k_caches"_a, "v_caches"_a, "inv_freq"_a, "rope_scale"_a,
           "offset"_a);
  m.def("mlp_block", &edge::mlp_block, "h"_a, "norm"_a, "eps"_a, "ws"_a, "bits"_a = 0, "group_size"_a = 0,
        "has_biases"_a = false, nb::kw_only(), "stream"_a = nb::none(),
        "h + down(silu(gate(n)) * up(n)) for n = rms_norm(h, norm, eps), one op");
  m.def("isa", []() { return std::string(el_isa()); });
  m.def("threads", []() { return el_threads(); });
  m.def("set_threads", [](int n) { el_set_threads(n); }, "n"_a);
}
