// What the primitives share: argument checks, dtypes, and operands read inside the dispatched task.
#pragma once

#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/common/utils.h"

extern "C" {
#include "kernels.h"
}

namespace edge {
namespace mx = mlx::core;

inline void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("edge-llm CPU kernel: " + what);
}

inline bool is_float(mx::Dtype t) { return t == mx::float32 || t == mx::float16 || t == mx::bfloat16; }

inline int el_dtype_of(mx::Dtype t) {
  if (t == mx::float32) return EL_F32;
  if (t == mx::float16) return EL_F16;
  if (t == mx::bfloat16) return EL_BF16;
  throw std::invalid_argument("edge-llm CPU kernels take float32, float16 or bfloat16");
}

// An input as eval_cpu sees it. Its buffer exists then but is filled by earlier tasks on the stream, so
// its bytes are read only inside the dispatched task (``bytes()``), never in eval_cpu itself. Cheap to copy into
// the task (a decode step makes hundreds): the layout is kept only for an input that is not row-contiguous.
struct Operand {
  struct Layout {
    mx::Shape shape;
    mx::Strides strides;
  };
  const uint8_t* data;
  size_t itemsize, size;
  std::shared_ptr<const Layout> layout;  // null: row-contiguous
  std::shared_ptr<std::vector<uint8_t>> copy;

  explicit Operand(const mx::array& a)
      : data(a.data<uint8_t>()), itemsize(a.itemsize()), size(a.size()),
        layout(a.flags().row_contiguous ? nullptr : std::make_shared<const Layout>(Layout{a.shape(), a.strides()})) {}

  // The elements in row-major order: the buffer itself, or a copy gathered through the strides.
  const uint8_t* bytes() {
    if (!layout) return data;
    if (!copy) {
      copy = std::make_shared<std::vector<uint8_t>>(size * itemsize);
      for (size_t i = 0; i < size; i++) {
        auto loc = mx::elem_to_loc(i, layout->shape, layout->strides);
        std::memcpy(copy->data() + i * itemsize, data + loc * itemsize, itemsize);
      }
    }
    return copy->data();
  }
};


// W's shape and formats for products of rows of K values (pointers unset: inputs are read inside the dispatched
// task, bind_weight).
inline el_weights weights_of(int64_t K, const mx::array& w, const mx::array* scales, int bits, int group_size) {
  el_weights W{};
  W.bits = bits;
  W.group_size = group_size;
  W.K = K;
  W.N = w.shape(-2);
  W.E = w.ndim() == 3 ? w.shape(0) : 1;
  if (bits) W.s_dtype = el_dtype_of(scales->dtype());
  else W.w_dtype = el_dtype_of(w.dtype());
  return W;
}

// The checks every product op makes of one weight (and its scales and biases) against x's K.
inline void check_weight(int64_t K, const mx::array& w, const std::optional<mx::array>& scales,
                  const std::optional<mx::array>& biases, int bits, int group_size) {
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

// Inputs per weight: w, or w, scales[, biases].
inline int inputs_per_weight(int bits, bool has_biases) { return bits ? (has_biases ? 3 : 2) : 1; }

// Weight i of a set ws (each w, or w, scales[, biases], quantized alike) checked as check_weight does for rows of K
// values, and as a matrix of N rows (N < 0: any) whose scales share the set's dtype; ``what`` names the expected shape.
inline void check_set_weight(const std::vector<mx::array>& ws, size_t i, int bits, int group_size, bool has_biases,
                             int64_t K, int64_t N, const std::string& what) {
  const size_t at = i * inputs_per_weight(bits, has_biases);
  std::optional<mx::array> scales, biases;
  if (bits) scales = ws[at + 1];
  if (bits && has_biases) biases = ws[at + 2];
  check_weight(K, ws[at], scales, biases, bits, group_size);
  check(ws[at].ndim() == 2 && (N < 0 || ws[at].shape(0) == N), what);
  check(!bits || scales->dtype() == ws[1].dtype(), "scales must share a dtype (" + what + ")");
}

// Points W at its operands (inside the dispatched task), the weight's first input at ``at``.
inline void bind_weight(el_weights& W, std::vector<Operand>& ops, size_t at, bool has_biases) {
  W.w = ops[at].bytes();
  if (W.bits) {
    W.scales = ops[at + 1].bytes();
    W.biases = has_biases ? ops[at + 2].bytes() : nullptr;
  }
}

// MLX gives every output of a multi-output op its own reference to the op's inputs, so an input is never
// donatable there. By the time eval_cpu runs the graph walk is over, and MLX drops every output's inputs right
// after it; dropping the other outputs' references first lets an input nothing else holds be donated (written in
// place), as to a one-output op. Only when called as MLX's CPU eval calls it (inputs: one output's own list).
inline void release_sibling_inputs(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int own = 0;
  for (auto& o : outputs) own += &o.inputs() == &inputs;
  if (own != 1) return;
  for (auto& o : outputs)
    if (&o.inputs() != &inputs) o.inputs().clear();
}

}  // namespace edge
