/* What el_matmul hands its per-instruction-set row kernels (internal). */
#ifndef EDGE_LLM_JOB_H
#define EDGE_LLM_JOB_H

#include "kernels.h"

typedef struct {
  const el_weights* W;
  const float* x;     /* [rows, K]; for 4-bit weights each 32-value block holds its even values, then its odd ones */
  const float* xsum;  /* quantized: [rows, K / group_size] sums of each group of x (the bias term) */
  float* y;           /* [rows, N] */
} el_job;

/* y[r0:r1, n0:n1] for rows that all use expert e. */
typedef void (*el_rows_fn)(const el_job* job, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1);

void el_rows_generic(const el_job* job, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1);
#if defined(__x86_64__)
void el_rows_avx2(const el_job* job, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1);
void el_rows_avx512(const el_job* job, int64_t e, int64_t r0, int64_t r1, int64_t n0, int64_t n1);
#endif

#endif
