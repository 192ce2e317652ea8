/* el_matmul: checks the arguments, prepares x once per call, splits the product into tasks over runs of
 * rows sharing an expert and chunks of output rows, and runs them on the pool with the best row kernel
 * this CPU has (chosen once; EDGE_LLM_CPU_ISA=avx2 or generic forces a lesser one). */
#include <stdlib.h>
#include <string.h>

#include "job.h"

#define TASK_WEIGHT_BYTES (48 << 10) /* weights one task reads: a few per core keeps both busy */

typedef struct {
  int64_t expert, r0, r1;
} segment;

typedef struct {
  el_job job;
  el_rows_fn rows;
  const segment* segments;
  int64_t chunk, chunks; /* output rows per task, tasks per segment */
} plan;

static el_rows_fn chosen;
static const char* chosen_name;

static void choose_isa(void) {
  if (chosen) return;
  const char* force = getenv("EDGE_LLM_CPU_ISA");
  chosen = el_rows_generic;
  chosen_name = "generic";
#if defined(__x86_64__)
  __builtin_cpu_init();
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                     && __builtin_cpu_supports("avx512vl");
  if (force && strcmp(force, "generic") == 0) return;
  if (avx512 && !(force && strcmp(force, "avx2") == 0)) {
    chosen = el_rows_avx512;
    chosen_name = "avx512";
  } else if (avx2) {
    chosen = el_rows_avx2;
    chosen_name = "avx2+fma+f16c";
  }
#elif defined(__aarch64__)
  (void)force;
  chosen_name = "neon";
#else
  (void)force;
#endif
}

const char* el_isa(void) {
  choose_isa();
  return chosen_name;
}

static void run_task(void* arg, int64_t task) {
  const plan* p = (const plan*)arg;
  const segment* s = &p->segments[task / p->chunks];
  int64_t n0 = (task % p->chunks) * p->chunk, n1 = n0 + p->chunk;
  if (n1 > p->job.W->N) n1 = p->job.W->N;
  p->rows(&p->job, s->expert, s->r0, s->r1, n0, n1);
}

/* 4-bit: each 32-value block of x as its 16 even values, then its 16 odd ones (the nibble order). */
static void prepare_x(const el_weights* W, const float* x, int64_t rows, float* xp, float* xsum) {
  const int64_t K = W->K, gs = W->group_size, ng = K / gs;
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * K;
    for (int64_t g = 0; g < ng; g++) {
      float s = 0.f;
      for (int64_t k = 0; k < gs; k++) s += xr[g * gs + k];
      xsum[r * ng + g] = s;
    }
    if (xp) {
      for (int64_t b = 0; b < K; b += 32)
        for (int j = 0; j < 16; j++) {
          xp[r * K + b + j] = xr[b + 2 * j];
          xp[r * K + b + 16 + j] = xr[b + 2 * j + 1];
        }
    }
  }
}

int el_matmul(const el_weights* W, const float* x, float* y, int64_t rows, const uint32_t* experts,
              int64_t rows_per_id) {
  if (W->N <= 0 || W->K <= 0 || W->E <= 0 || rows < 0) return -1;
  if (rows == 0) return 0;
  if (W->bits) {
    const int b = W->bits;
    if (!(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8)) return -1;
    const int gs = W->group_size;
    if (!(gs == 32 || gs == 64 || gs == 128) || W->K % gs) return -1;
  }
  if (experts) {
    if (rows_per_id <= 0 || rows % rows_per_id) return -1;
    for (int64_t i = 0; i < rows / rows_per_id; i++)
      if (experts[i] >= (uint64_t)W->E) return -1;
  }
  choose_isa();

  int64_t ids = experts ? rows / rows_per_id : 1, count = 0;
  segment* segments = malloc(sizeof(segment) * ids);
  if (!segments) return -1;
  for (int64_t i = 0; i < ids; i++) {
    int64_t e = experts ? experts[i] : 0;
    if (count && segments[count - 1].expert == e) {
      segments[count - 1].r1 += experts ? rows_per_id : rows;
    } else {
      segments[count++] = (segment){e, experts ? i * rows_per_id : 0, experts ? (i + 1) * rows_per_id : rows};
    }
  }

  float *xp = NULL, *xsum = NULL;
  if (W->bits) {
    xsum = malloc(sizeof(float) * rows * (W->K / W->group_size));
    if (W->bits == 4) xp = malloc(sizeof(float) * rows * W->K);
    if (!xsum || (W->bits == 4 && !xp)) {
      free(segments), free(xsum), free(xp);
      return -1;
    }
    prepare_x(W, x, rows, xp, xsum);
  }

  const int64_t row_bytes = W->bits ? W->K * W->bits / 8 : W->K * (W->w_dtype == EL_F32 ? 4 : 2);
  int64_t chunk = TASK_WEIGHT_BYTES / row_bytes;
  const int64_t threads = el_threads();
  const int64_t balanced = (W->N * count + 4 * threads - 1) / (4 * threads); /* a few tasks per thread */
  if (chunk > balanced) chunk = balanced;
  if (chunk < 4) chunk = 4;
  if (chunk > W->N) chunk = W->N;
  plan p = {{W, xp ? xp : x, xsum, y}, chosen, segments, chunk, (W->N + chunk - 1) / chunk};
  el_parallel_for(run_task, &p, count * p.chunks);
  free(segments), free(xsum), free(xp);
  return 0;
}
