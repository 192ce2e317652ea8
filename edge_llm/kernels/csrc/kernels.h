/* edge-llm CPU kernels: matrix products for MLX's CPU backend where its own kernels are slow.
 *
 * Plain C (no MLX types) so the same code serves any binding. Activations and results are float32;
 * weights are MLX affine-quantized (w = scale * q + bias per group, q packed as a little-endian bit
 * stream) or float (bf16 / f16 / f32). Every product is exact up to summation order: a row's result does not
 * depend on how many rows, tasks or threads share the call (the tests compare bits across those).
 */
#ifndef EDGE_LLM_KERNELS_H
#define EDGE_LLM_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum el_dtype { EL_F32 = 0, EL_F16 = 1, EL_BF16 = 2 };

/* One weight matrix [N, K], or a stack of E of them (experts), laid out as MLX stores them. */
typedef struct {
  const void* w;        /* quantized: packed bytes [E][N][K * bits / 8]; float: [E][N][K] of w_dtype */
  const void* scales;   /* quantized only: [E][N][K / group_size] of s_dtype */
  const void* biases;   /* quantized only: same shape, or NULL (all zero) */
  int w_dtype;          /* float weights: enum el_dtype */
  int s_dtype;          /* quantized: dtype of scales and biases */
  int bits;             /* 0: float weights; else 2, 3, 4, 5, 6 or 8 */
  int group_size;       /* quantized: 32, 64 or 128, dividing K */
  int64_t N, K, E;
} el_weights;

/* y[r, :] = x[r, :] @ W[expert(r)].T for rows r < rows of x [rows, K] -> y [rows, N].
 * experts: NULL (one matrix) or one expert id per run of ``rows_per_id`` consecutive rows.
 * Runs of rows that share an expert are computed together (the weights read once per block of rows).
 * Returns 0, or -1 for an argument the kernels do not take (the caller falls back). */
int el_matmul(const el_weights* W, const float* x, float* y, int64_t rows, const uint32_t* experts,
              int64_t rows_per_id);

/* y_i = x @ W_i.T for n (at most EL_MAX_WEIGHTS) matrices sharing K, bits and group size (a layer's q/k/v or
 * gate/up projections): one job on the pool, x prepared once. Each y_i is what el_matmul gives. */
#define EL_MAX_WEIGHTS 8
int el_matmul_many(const el_weights* const* Ws, int n, const float* x, float* const* ys, int64_t rows);

/* Which instruction set the kernels run with ("avx2+fma+f16c", "generic"). */
const char* el_isa(void);

/* Threads the kernels use (the caller's plus workers); set before the first product or at any time. */
void el_set_threads(int n);
int el_threads(void);

/* Work handed to the thread pool: fn(arg, task) for task in [0, tasks), the caller taking part. */
typedef void (*el_task_fn)(void* arg, int64_t task);
void el_parallel_for(el_task_fn fn, void* arg, int64_t tasks);

#ifdef __cplusplus
}
#endif
#endif
