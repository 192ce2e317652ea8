// A dense decoder stack's decode step as one op (decoding on the CPU): every layer's attention half and SwiGLU
// feed-forward half (halves.h, the arithmetic of attention_block and mlp_block, so the same bits) in one task, with
// the layers' weights held here from the plan's creation. Made from Python one layer at a time, a step cost ~40 us
// of graph building per layer and two dispatches (~4 us each): on a 2-core machine, time taken from the kernels.
#pragma once
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "attention_block.h"

namespace edge {

struct PlanLayer {
  mx::array attn_norm;
  float attn_eps;
  std::vector<mx::array> qkv, out_proj;
  WeightFormat qkv_format, out_format;
  int dims;  // rotated features of each head
  bool traditional;
  float scale;  // of the attention scores
  mx::array mlp_norm;
  float mlp_eps;
  std::vector<mx::array> mlp;  // gate, up, down
  WeightFormat mlp_format;
};

class DecodePlan {
 public:
  void add_layer(PlanLayer layer);
  size_t size() const { return layers_->size(); }
  // h [B, L, hidden] through every layer at positions offset..; per layer its caches and this step's rope angles and
  // position scale. Returns {h', the k caches, the v caches} (the caches with the new rows, written in place where
  // nothing else holds them).
  std::tuple<mx::array, std::vector<mx::array>, std::vector<mx::array>> run(
      const mx::array& h, const std::vector<mx::array>& k_caches, const std::vector<mx::array>& v_caches,
      const std::vector<mx::array>& inv_freq, const std::vector<float>& rope_scale, int offset);

 private:
  // The step's arguments against the layers: every shape attention_block and mlp_block check, those ops' own checks
  // run once per new set of shapes (a cache grown, another batch), cheap comparisons otherwise.
  void check_step(const mx::array& h, const std::vector<mx::array>& k_caches, const std::vector<mx::array>& v_caches,
                  const std::vector<mx::array>& inv_freq, const std::vector<float>& rope_scale, int offset);
  std::vector<mx::Shape> checked_;  // h's shape, then per layer its caches' (capacity 0) and angles' last checked
  std::mutex checking_;             // two threads decoding with one model (each its own caches) share the plan
  std::shared_ptr<std::vector<PlanLayer>> layers_ = std::make_shared<std::vector<PlanLayer>>();
};

// inputs: h, then per layer k_cache, v_cache, inv_freq; outputs: h', then per layer k_cache', v_cache'. The weights
// are the plan's (evaluated when it took them, held by the op), not inputs.
class CpuDecoderStack : public mx::Primitive {
 public:
  CpuDecoderStack(mx::Stream stream, std::shared_ptr<const std::vector<PlanLayer>> layers, int offset, bool causal,
                  std::vector<float> rope_scale)
      : mx::Primitive(stream), layers_(std::move(layers)), offset_(offset), causal_(causal),
        rope_scale_(std::move(rope_scale)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EdgeCpuDecoderStack"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuDecoderStack&>(other);
    return layers_ == o.layers_ && offset_ == o.offset_ && causal_ == o.causal_ && rope_scale_ == o.rope_scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::shared_ptr<const std::vector<PlanLayer>> layers_;
  int offset_;
  bool causal_;
  std::vector<float> rope_scale_;
};

}  // namespace edge
