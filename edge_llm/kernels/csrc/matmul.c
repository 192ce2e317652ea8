/* el_matmul: checks the arguments, prepares x once per call, splits the product into tasks over runs of
 * rows sharing an expert and chunks of output rows, and runs them on the pool with the best row kernel
 * this CPU has (chosen once; EDGE_LLM_CPU_ISA=avx2 or generic forces a lesser one). */
#include <stdlib.h>
#include <string.h>

#include "job.h"

/* Weights one task reads, and tasks per thread at least: each task starts its rows' reads cold (the prefetch runs
 * ahead of a tile, not of a task), so fewer, larger tasks read faster, while two per thread still let one thread
 * take over a late one's share. SmolLM2 decoding, 2 threads: 48 KB / 4 a thread 132 tok/s (Q4_1) and 97 (Q8_0),
 * 96 KB / 2 141 and 100, 384 KB / 1 139 and 100 (medians of 4 runs alternated). */
#define TASK_WEIGHT_BYTES (96 << 10)
#define TASKS_PER_THREAD 2

typedef struct {
  int64_t expert, r0, r1;
} segment;

typedef struct {
  el_job job;
  const segment* segments;
  int64_t count;         /* segments */
  int64_t chunk, chunks; /* output rows per task, tasks per segment */
  int64_t first;         /* this part's first task */
} part;

typedef struct {
  part parts[EL_MAX_WEIGHTS];
  int n;
  el_rows_fn rows;
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
  int i = 0;
  while (i + 1 < p->n && task >= p->parts[i + 1].first) i++;
  const part* q = &p->parts[i];
  task -= q->first;
  const segment* s = &q->segments[task / q->chunks];
  int64_t n0 = (task % q->chunks) * q->chunk, n1 = n0 + q->chunk;
  if (n1 > q->job.W->N) n1 = q->job.W->N;
  p->rows(&q->job, s->expert, s->r0, s->r1, n0, n1);
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

static int check_weights(const el_weights* W) {
  if (W->N <= 0 || W->K <= 0 || W->E <= 0) return -1;
  if (W->bits) {
    const int b = W->bits, gs = W->group_size;
    if (!(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8)) return -1;
    if (!(gs == 32 || gs == 64 || gs == 128) || W->K % gs) return -1;
  }
  return 0;
}

/* x as the row kernels of W take it (4-bit: permuted; quantized: group sums), in *xp / *xsum (malloc'd, or NULL
 * where x serves as is). */
static int prepared_x(const el_weights* W, const float* x, int64_t rows, float** xp, float** xsum) {
  *xp = *xsum = NULL;
  if (!W->bits) return 0;
  *xsum = malloc(sizeof(float) * rows * (W->K / W->group_size));
  if (W->bits == 4) *xp = malloc(sizeof(float) * rows * W->K);
  if (!*xsum || (W->bits == 4 && !*xp)) {
    free(*xsum), free(*xp);
    return -1;
  }
  prepare_x(W, x, rows, *xp, *xsum);
  return 0;
}

/* Output rows per task: ~TASK_WEIGHT_BYTES of weights, and at least TASKS_PER_THREAD tasks per thread over ``work``
 * rows. */
static int64_t chunk_rows(const el_weights* W, int64_t work) {
  const int64_t row_bytes = W->bits ? W->K * W->bits / 8 : W->K * (W->w_dtype == EL_F32 ? 4 : 2);
  int64_t chunk = TASK_WEIGHT_BYTES / row_bytes;
  const int64_t tasks = TASKS_PER_THREAD * el_threads();
  const int64_t balanced = (work + tasks - 1) / tasks;
  if (chunk > balanced) chunk = balanced;
  chunk = chunk < 4 ? 4 : chunk & ~(int64_t)3; /* whole tiles of four rows (csrc/rows.c decodes four at a time) */
  return chunk > W->N ? W->N : chunk;
}

static part make_part(const el_weights* W, const float* x, const float* xsum, float* y, const segment* segments,
                      int64_t count, int64_t work, int64_t first) {
  part q = {{W, x, xsum, y}, segments, count, chunk_rows(W, work), 0, first};
  q.chunks = (W->N + q.chunk - 1) / q.chunk;
  return q;
}

int el_matmul(const el_weights* W, const float* x, float* y, int64_t rows, const uint32_t* experts,
              int64_t rows_per_id) {
  if (check_weights(W) || rows < 0) return -1;
  if (rows == 0) return 0;
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
  float *xp, *xsum;
  if (prepared_x(W, x, rows, &xp, &xsum)) {
    free(segments);
    return -1;
  }
  plan p = {.n = 1, .rows = chosen};
  p.parts[0] = make_part(W, xp ? xp : x, xsum, y, segments, count, W->N * count, 0);
  el_parallel_for(run_task, &p, count * p.parts[0].chunks);
  free(segments), free(xsum), free(xp);
  return 0;
}

int el_matmul_many(const el_weights* const* Ws, int n, const float* x, float* const* ys, int64_t rows) {
  if (n < 1 || n > EL_MAX_WEIGHTS || rows < 0) return -1;
  for (int i = 0; i < n; i++) {
    const el_weights* W = Ws[i];
    if (check_weights(W) || W->E != 1 || W->K != Ws[0]->K || W->bits != Ws[0]->bits ||
        (W->bits && W->group_size != Ws[0]->group_size))
      return -1;
  }
  if (rows == 0) return 0;
  choose_isa();
  float *xp, *xsum;
  if (prepared_x(Ws[0], x, rows, &xp, &xsum)) return -1;
  const segment all = {0, 0, rows};
  int64_t work = 0, tasks = 0;
  for (int i = 0; i < n; i++) work += Ws[i]->N;
  plan p = {.n = n, .rows = chosen};
  for (int i = 0; i < n; i++) {
    p.parts[i] = make_part(Ws[i], xp ? xp : x, xsum, ys[i], &all, 1, work, tasks);
    tasks += p.parts[i].chunks;
  }
  el_parallel_for(run_task, &p, tasks);
  free(xsum), free(xp);
  return 0;
}
