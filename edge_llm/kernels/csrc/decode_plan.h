// A dense decoder stack's decode step built in one call (decoding on the CPU): per layer, the attention half as
// attention_block and the SwiGLU feed-forward half as mlp_block, the same two ops the layers would make one by one
// from Python, with the layers' weights held here from the plan's creation. Building a step's graph from Python
// cost ~40 us per layer (on a 2-core machine, time taken from the kernels running the previous step); from C++ it
// is a few microseconds.
#pragma once
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
  void add_layer(PlanLayer layer) { layers_.push_back(std::move(layer)); }
  size_t size() const { return layers_.size(); }
  // h [B, L, hidden] through every layer at positions offset..; per layer its caches and this step's rope angles and
  // position scale. Returns {h', the k caches, the v caches} (the caches with the new rows).
  std::tuple<mx::array, std::vector<mx::array>, std::vector<mx::array>> run(
      mx::array h, const std::vector<mx::array>& k_caches, const std::vector<mx::array>& v_caches,
      const std::vector<mx::array>& inv_freq, const std::vector<float>& rope_scale, int offset) const;

 private:
  std::vector<PlanLayer> layers_;
};

}  // namespace edge
