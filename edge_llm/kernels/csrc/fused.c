/* See fused.h. Plain C: these ops read kilobytes per token, so dispatch, not arithmetic, is their cost. */
#include "fused.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "scalar.h"

void el_rms_norm(const float* x, const void* w, int w_dtype, float* y, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
    const float norm = 1.f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) yr[i] = xr[i] * norm * el_load_float(w, w_dtype, i);
  }
}

void el_rope(const float* x, float* y, int64_t heads, int64_t L, int64_t D, int64_t dims, int traditional,
             const float* inv_freq, float scale, int64_t offset) {
  const int64_t half = dims / 2;
  float* cs = malloc(sizeof(float) * 2 * L * half);
  if (!cs) return;
  for (int64_t l = 0; l < L; l++)
    for (int64_t i = 0; i < half; i++) {
      const float theta = (float)(offset + l) * scale * inv_freq[i];
      cs[(l * half + i) * 2] = cosf(theta);
      cs[(l * half + i) * 2 + 1] = sinf(theta);
    }
  for (int64_t h = 0; h < heads; h++)
    for (int64_t l = 0; l < L; l++) {
      const float* xr = x + (h * L + l) * D;
      float* yr = y + (h * L + l) * D;
      const float* c = cs + l * half * 2;
      for (int64_t i = 0; i < half; i++) {
        const int64_t a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
        const float x1 = xr[a], x2 = xr[b], co = c[2 * i], si = c[2 * i + 1];
        yr[a] = x1 * co - x2 * si;
        yr[b] = x1 * si + x2 * co;
      }
      for (int64_t i = dims; i < D; i++) yr[i] = xr[i];
    }
  free(cs);
}

typedef struct {
  const el_attention_args* a;
  int64_t rows_per_task;
} attention_job;

static void attention_rows(void* arg, int64_t task) {
  const attention_job* job = (const attention_job*)arg;
  const el_attention_args* a = job->a;
  const int64_t rows = a->B * a->Hq * a->L, group = a->Hq / a->Hkv, D = a->D, Dv = a->Dv;
  float* scores = malloc(sizeof(float) * a->T);
  float* acc = malloc(sizeof(float) * Dv);
  if (!scores || !acc) {
    free(scores), free(acc);
    return;
  }
  for (int64_t row = task * job->rows_per_task; row < rows && row < (task + 1) * job->rows_per_task; row++) {
    const int64_t l = row % a->L, h = (row / a->L) % a->Hq, b = row / (a->L * a->Hq), hk = h / group;
    const float* q = a->q + row * D;
    const float* k = a->k + b * a->k_strides[0] + hk * a->k_strides[1];
    const float* v = a->v + b * a->v_strides[0] + hk * a->v_strides[1];
    const int64_t visible = a->causal ? a->T - a->L + l + 1 : a->T;
    float top = -INFINITY;
    for (int64_t t = 0; t < visible; t++) {
      const float* kt = k + t * a->k_strides[2];
      float s = 0.f;
      for (int64_t i = 0; i < D; i++) s += q[i] * kt[i];
      scores[t] = s * a->scale;
      if (scores[t] > top) top = scores[t];
    }
    float total = 0.f;
    for (int64_t t = 0; t < visible; t++) total += scores[t] = expf(scores[t] - top);
    for (int64_t i = 0; i < Dv; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < visible; t++) {
      const float* vt = v + t * a->v_strides[2];
      const float p = scores[t];
      for (int64_t i = 0; i < Dv; i++) acc[i] += p * vt[i];
    }
    float* out = a->out + row * Dv;
    const float inv = visible > 0 ? 1.f / total : 0.f;
    for (int64_t i = 0; i < Dv; i++) out[i] = acc[i] * inv;
  }
  free(scores), free(acc);
}

void el_attention(const el_attention_args* a) {
  const int64_t rows = a->B * a->Hq * a->L;
  const int64_t work = a->T * (a->D + a->Dv); /* multiply-adds per row */
  int64_t per_task = (1 << 15) / (work > 0 ? work : 1);
  if (per_task < 1) per_task = 1;
  attention_job job = {a, per_task};
  el_parallel_for(attention_rows, &job, (rows + per_task - 1) / per_task);
}
