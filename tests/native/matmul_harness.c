/* Runs el_matmul (edge_llm/kernels/csrc) on cases read from a file, with 1 and with 2 threads, and writes both
 * results: tests/test_kernels_arm64.py builds it for arm64, runs it under qemu, and compares the results with
 * MLX's (computed on this machine). The kernels' C sources only: no MLX, no Python.
 *
 * Input: cases, each a header of int64 [bits, group_size, s_dtype, w_dtype, N, K, E, rows, ids, rows_per_id]
 * then w, scales, biases (quantized; sizes from the header), x [rows, K] float32, ids uint32.
 * Output: per case, y [rows, N] float32 with 1 thread, then with 2. */
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

static void* read_n(FILE* f, size_t bytes) {
  void* p = malloc(bytes ? bytes : 1);
  if (!p || fread(p, 1, bytes, f) != bytes) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
  return p;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[10];
  while (fread(h, sizeof h, 1, in) == 1) {
    el_weights W = {0};
    W.bits = (int)h[0], W.group_size = (int)h[1], W.s_dtype = (int)h[2], W.w_dtype = (int)h[3];
    W.N = h[4], W.K = h[5], W.E = h[6];
    const int64_t rows = h[7], ids = h[8], rows_per_id = h[9];
    const size_t wsize = W.bits ? 1 : (W.w_dtype == EL_F32 ? 4 : 2), ssize = W.s_dtype == EL_F32 ? 4 : 2;
    const size_t values = (size_t)(W.E * W.N * W.K);
    W.w = read_n(in, W.bits ? values * W.bits / 8 : values * wsize);
    if (W.bits) {
      W.scales = read_n(in, values / W.group_size * ssize);
      W.biases = read_n(in, values / W.group_size * ssize);
    }
    float* x = read_n(in, sizeof(float) * rows * W.K);
    uint32_t* experts = ids ? read_n(in, sizeof(uint32_t) * ids) : NULL;
    float* y = malloc(sizeof(float) * rows * W.N);
    for (int threads = 1; threads <= 2; threads++) {
      el_set_threads(threads);
      if (el_matmul(&W, x, y, rows, experts, rows_per_id) != 0) {
        fprintf(stderr, "el_matmul refused a case\n");
        return 3;
      }
      fwrite(y, sizeof(float), rows * W.N, out);
    }
    free((void*)W.w), free((void*)W.scales), free((void*)W.biases), free(x), free(experts), free(y);
  }
  printf("%s\n", el_isa());
  return fclose(out) == 0 ? 0 : 4;
}
