#pragma once
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "fused.h"

namespace edge {
namespace mx = mlx::core;

// A decode step's attention in three ops (fused.h): q [B, L, Hq * D], k [B, L, Hkv * D] and v [B, L, Hkv * Dv]
// straight from the projections; rotary embedding at positions offset.. (dims rotated, per-pair angles
// inv_freq, positions times rope_scale); keys and values written into the cache buffers k_cache
// [B, Hkv, capacity, D] and v_cache [B, Hkv, capacity, Dv] at rows offset.. (in place when the old buffers are
// no longer referenced, as MLX's slice update, so a step writes L rows, not the cache); attention over the
// offset + L rows. Returns {out [B, L, Hq * Dv], k_cache', v_cache'}.
// With an output projection (out_proj: its w, or w, scales[, biases], as matmul's) and a residual [B, L, hidden],
// out is residual + attention @ W_o.T instead: the rest of a decoder layer's attention half, in the same op.
struct OutProj {
  bool on = false;
  int bits = 0, group_size = 0;
  bool has_biases = false;
  bool operator==(const OutProj& o) const {
    return on == o.on && bits == o.bits && group_size == o.group_size && has_biases == o.has_biases;
  }
};
std::vector<mx::array> attention_step(const mx::array& q, const mx::array& k, const mx::array& v,
                                      const mx::array& k_cache, const mx::array& v_cache, int offset, int dims,
                                      bool traditional, const mx::array& inv_freq, float rope_scale, float scale,
                                      bool causal, const std::vector<mx::array>& out_proj = {}, int bits = 0,
                                      int group_size = 0, bool has_biases = false,
                                      const std::optional<mx::array>& residual = std::nullopt,
                                      mx::StreamOrDevice s = {});

// A cache write's output buffer: the cache's own when nothing else holds it (MLX's donation, as its slice update
// does) and it holds every element; else a new one. Returns whether the caller must first copy the cache into it.
bool take_cache_buffer(const mx::array& cache, mx::array& out);

// The rows a step writes into cache [B, H, capacity, D] at offset.., L per sequence.
el_cache_rows cache_rows(const mx::array& cache, int64_t L, int64_t offset);

struct StepParams {
  int64_t offset, dims;  // dims 0: no rotation (values)
  bool traditional, causal;
  float rope_scale, scale;
  bool operator==(const StepParams& o) const {
    return offset == o.offset && dims == o.dims && traditional == o.traditional && causal == o.causal &&
           rope_scale == o.rope_scale && scale == o.scale;
  }
};

// cache' = cache with rows (rotated when dims > 0) at offset..; inputs {cache, rows[, inv_freq]}.
class CpuCacheWrite : public mx::UnaryPrimitive {
 public:
  CpuCacheWrite(mx::Stream stream, StepParams p) : mx::UnaryPrimitive(stream), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "EdgeCpuCacheWrite"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const CpuCacheWrite&>(other).p_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  StepParams p_;
};

// out [B, L, Hq * Dv]: rotated q over the first offset + L cache rows; inputs {q, k_cache, v_cache, inv_freq}; with
// an output projection, inputs then hold its weight and the residual, and out is residual + that product.
class CpuAttentionCached : public mx::UnaryPrimitive {
 public:
  CpuAttentionCached(mx::Stream stream, StepParams p, OutProj o = {}) : mx::UnaryPrimitive(stream), p_(p), o_(o) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "EdgeCpuAttentionCached"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuAttentionCached&>(other);
    return p_ == o.p_ && o_ == o.o_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  StepParams p_;
  OutProj o_;
};

}  // namespace edge
