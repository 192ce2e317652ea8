// What the primitives share: argument checks, dtypes, and operands read inside the dispatched task.
#pragma once

#include <cstring>
#include <memory>
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
// its bytes are read only inside the dispatched task (``bytes()``), never in eval_cpu itself.
struct Operand {
  const uint8_t* data;
  bool contiguous;
  mx::Shape shape;
  mx::Strides strides;
  size_t itemsize, size;
  std::shared_ptr<std::vector<uint8_t>> copy;

  explicit Operand(const mx::array& a)
      : data(a.data<uint8_t>()), contiguous(a.flags().row_contiguous), shape(a.shape()), strides(a.strides()),
        itemsize(a.itemsize()), size(a.size()) {}

  // The elements in row-major order: the buffer itself, or a copy gathered through the strides.
  const uint8_t* bytes() {
    if (contiguous) return data;
    if (!copy) {
      copy = std::make_shared<std::vector<uint8_t>>(size * itemsize);
      for (size_t i = 0; i < size; i++) {
        auto loc = mx::elem_to_loc(i, shape, strides);
        std::memcpy(copy->data() + i * itemsize, data + loc * itemsize, itemsize);
      }
    }
    return copy->data();
  }
};

}  // namespace edge
