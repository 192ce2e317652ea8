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

/* cos and sin of each position's angles: [L][dims / 2][2]; NULL when out of memory. */
static float* rope_table(int64_t L, int64_t half, const float* inv_freq, float scale, int64_t offset) {
  float* cs = malloc(sizeof(float) * 2 * (L > 0 ? L : 1) * (half > 0 ? half : 1));
  if (!cs) return NULL;
  for (int64_t l = 0; l < L; l++)
    for (int64_t i = 0; i < half; i++) {
      const float theta = (float)(offset + l) * scale * inv_freq[i];
      cs[(l * half + i) * 2] = cosf(theta);
      cs[(l * half + i) * 2 + 1] = sinf(theta);
    }
  return cs;
}

/* One row of D features, its first dims rotated by the angles c ([dims / 2][2]); the rest copied. */
static void rotate(const float* xr, float* yr, const float* c, int64_t D, int64_t dims, int traditional) {
  const int64_t half = dims / 2;
  for (int64_t i = 0; i < half; i++) {
    const int64_t a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
    const float x1 = xr[a], x2 = xr[b], co = c[2 * i], si = c[2 * i + 1];
    yr[a] = x1 * co - x2 * si;
    yr[b] = x1 * si + x2 * co;
  }
  for (int64_t i = dims; i < D; i++) yr[i] = xr[i];
}

void el_rope(const float* x, float* y, int64_t heads, int64_t L, int64_t D, int64_t dims, int traditional,
             const float* inv_freq, float scale, int64_t offset) {
  const int64_t half = dims / 2;
  float* cs = rope_table(L, half, inv_freq, scale, offset);
  if (!cs) return;
  for (int64_t h = 0; h < heads; h++)
    for (int64_t l = 0; l < L; l++) rotate(x + (h * L + l) * D, y + (h * L + l) * D, cs + l * half * 2, D, dims, traditional);
  free(cs);
}

/* A task: `heads` query heads (of one key/value head's group, at one query position) over the same keys and
 * values, so each key and value row is read once for all of them (GQA: the cache is read group times less). */
typedef struct {
  const el_attention_args* a;
  int64_t heads;  /* query heads per task, dividing the group */
  int64_t chunks; /* head chunks per (b, key/value head, l) */
  int64_t splits; /* key chunks per (b, key/value head, l, head chunk): 1 while a query sees at most KEY_CHUNK keys */
  float* partial; /* splits > 1: per (b, query head, l, split): the chunk's top score, its total, its Dv sums */
} attention_job;

/* 8 floats: compiled to whatever vectors the target has (two SSE registers on baseline x86-64, NEON on arm64). */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load_v8(const float* p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* q . k over D features: 8 lanes, then the lanes summed pairwise, then the tail; one fixed order. */
static inline float dot(const float* q, const float* k, int64_t D) {
  v8 acc = {0};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) acc += load_v8(q + i) * load_v8(k + i);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < D; i++) s += q[i] * k[i];
  return s;
}

/* dot() of q with four keys at once: four independent chains (dot alone is one chain of dependent adds), each
 * key's arithmetic and order exactly dot's. */
static inline void dot4(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, int64_t D,
                        float out[4]) {
  v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const v8 x = load_v8(q + i);
    a0 += x * load_v8(k0 + i), a1 += x * load_v8(k1 + i), a2 += x * load_v8(k2 + i), a3 += x * load_v8(k3 + i);
  }
  const v8* acc[4] = {&a0, &a1, &a2, &a3};
  const float* ks[4] = {k0, k1, k2, k3};
  for (int j = 0; j < 4; j++) {
    const v8 a = *acc[j];
    float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (int64_t r = i; r < D; r++) s += q[r] * ks[j][r];
    out[j] = s;
  }
}

/* out_j[c..c+8) = sum over t of p_j[t] * v_t[c..c+8), for up to four heads j, t in order from zero, each sum kept
 * in a register (one chain per head, the heads' chains interleaved): per element the adds of a running sum
 * ``acc + p * v`` over t, as a loop over t that adds p * v_t into acc in memory would make. */
static inline void weighted_rows(const float* const* p, int m, const float* v, int64_t stride, int64_t T, int64_t c,
                                 float* const* out) {
  v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  for (int64_t t = 0; t < T; t++) {
    const v8 x = load_v8(v + t * stride + c);
    a0 += p[0][t] * x;
    if (m > 1) a1 += p[1][t] * x;
    if (m > 2) a2 += p[2][t] * x;
    if (m > 3) a3 += p[3][t] * x;
  }
  const v8 a[4] = {a0, a1, a2, a3};
  for (int j = 0; j < m; j++) memcpy(out[j] + c, &a[j], sizeof a[j]);
}

#define EL_MAX_GROUP 16 /* query heads one task takes at most */
/* Keys one task takes at most: past it, a query's keys are split into chunks of this many (each chunk's softmax
 * part taken against its own top score, then combined: flash-decoding), so a long cache is shared among the
 * threads even with fewer key/value heads than threads (SmolLM2: 3 on 2 threads). Up to it, one task takes all of
 * a query's keys; a fixed size, so the bits never depend on the thread count. */
#define KEY_CHUNK 256

/* Compiled for AVX-512, AVX2 and the baseline, the best picked when the library loads (an ifunc): the 8-lane
 * vectors above are one instruction each on AVX2 and later, two on baseline x86-64; the same operations in the
 * same order on every one, so the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONED
#endif

CLONED static void attention_rows(void* arg, int64_t task) {
  const attention_job* job = (const attention_job*)arg;
  const el_attention_args* a = job->a;
  const int64_t group = a->Hq / a->Hkv, D = a->D, Dv = a->Dv, n = job->heads;
  const int64_t split = task % job->splits;
  task /= job->splits;
  const int64_t unit = task / job->chunks, l = unit % a->L, hk = (unit / a->L) % a->Hkv, b = unit / (a->L * a->Hkv);
  const int64_t h0 = hk * group + (task % job->chunks) * n;
  const int64_t sees = a->causal ? a->T - a->L + l + 1 : a->T;
  /* this task's keys: [first, first + visible) */
  const int64_t first = split * KEY_CHUNK;
  const int64_t visible = job->splits == 1 ? sees : first >= sees ? 0 : sees - first < KEY_CHUNK ? sees - first : KEY_CHUNK;
  float* scores = malloc(sizeof(float) * n * (visible > 0 ? visible : 1));
  float* acc = malloc(sizeof(float) * n * Dv);
  if (!scores || !acc) {
    free(scores), free(acc);
    return;
  }
  const float* k = a->k + b * a->k_strides[0] + hk * a->k_strides[1] + first * a->k_strides[2];
  const float* v = a->v + b * a->v_strides[0] + hk * a->v_strides[1] + first * a->v_strides[2];
  const float* q[EL_MAX_GROUP];
  float top[EL_MAX_GROUP], total[EL_MAX_GROUP];
  for (int64_t j = 0; j < n; j++) q[j] = a->q + ((b * a->Hq + h0 + j) * a->L + l) * D, top[j] = -INFINITY;
  const int64_t ks = a->k_strides[2], vs = a->v_strides[2];
  for (int64_t j = 0; j < n; j++) {
    float* sj = scores + j * visible;
    int64_t t = 0;
    for (; t + 4 <= visible; t += 4) {
      const float* kt = k + t * ks;
      dot4(q[j], kt, kt + ks, kt + 2 * ks, kt + 3 * ks, D, sj + t);
    }
    for (; t < visible; t++) sj[t] = dot(q[j], k + t * ks, D);
    for (t = 0; t < visible; t++) {
      const float s = sj[t] * a->scale;
      sj[t] = s;
      if (s > top[j]) top[j] = s;
    }
  }
  for (int64_t j = 0; j < n; j++) {
    float* sj = scores + j * visible;
    total[j] = 0.f;
    for (int64_t t = 0; t < visible; t++) total[j] += sj[t] = expf(sj[t] - top[j]);
  }
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int m = n - j0 < 4 ? (int)(n - j0) : 4;
    const float* p[4];
    float* out[4];
    for (int j = 0; j < m; j++) p[j] = scores + (j0 + j) * visible, out[j] = acc + (j0 + j) * Dv;
    int64_t c = 0;
    for (; c + 8 <= Dv; c += 8) weighted_rows(p, m, v, vs, visible, c, out);
    for (; c < Dv; c++)
      for (int j = 0; j < m; j++) {
        float sum = 0.f;
        for (int64_t t = 0; t < visible; t++) sum += p[j][t] * v[t * vs + c];
        out[j][c] = sum;
      }
  }
  for (int64_t j = 0; j < n; j++) {
    const int64_t h = h0 + j;
    if (job->splits > 1) { /* the chunk's part, combined in combine_splits */
      float* part = job->partial + (((b * a->Hq + h) * a->L + l) * job->splits + split) * (Dv + 2);
      part[0] = top[j], part[1] = visible > 0 ? total[j] : 0.f;
      for (int64_t i = 0; i < Dv; i++) part[2 + i] = visible > 0 ? acc[j * Dv + i] : 0.f;
      continue;
    }
    float* out = a->out + (a->out_by_position ? (b * a->L + l) * a->Hq + h : (b * a->Hq + h) * a->L + l) * Dv;
    const float inv = visible > 0 ? 1.f / total[j] : 0.f;
    for (int64_t i = 0; i < Dv; i++) out[i] = acc[j * Dv + i] * inv;
  }
  free(scores), free(acc);
}

/* The key chunks' parts of each query into its output: each chunk's exponentials were taken against its own top
 * score, so each part is scaled by exp(chunk top - overall top); the sums in chunk order. */
static void combine_splits(const attention_job* job) {
  const el_attention_args* a = job->a;
  const int64_t S = job->splits, Dv = a->Dv, stride = Dv + 2;
  float* weight = malloc(sizeof(float) * S);
  if (!weight) return;
  for (int64_t b = 0; b < a->B; b++)
    for (int64_t h = 0; h < a->Hq; h++)
      for (int64_t l = 0; l < a->L; l++) {
        const float* part = job->partial + ((b * a->Hq + h) * a->L + l) * S * stride;
        float* out = a->out + (a->out_by_position ? (b * a->L + l) * a->Hq + h : (b * a->Hq + h) * a->L + l) * Dv;
        float top = -INFINITY, total = 0.f;
        for (int64_t s = 0; s < S; s++)
          if (part[s * stride + 1] > 0.f && part[s * stride] > top) top = part[s * stride];
        for (int64_t s = 0; s < S; s++) {
          weight[s] = part[s * stride + 1] > 0.f ? expf(part[s * stride] - top) : 0.f;
          total += part[s * stride + 1] * weight[s];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t i = 0; i < Dv; i++) {
          float sum = 0.f;
          for (int64_t s = 0; s < S; s++) sum += part[s * stride + 2 + i] * weight[s];
          out[i] = sum * inv;
        }
      }
  free(weight);
}

void el_attention(const el_attention_args* a) {
  const int64_t group = a->Hq / a->Hkv, units = a->B * a->Hkv * a->L;
  /* all of a group's heads in one task, unless that leaves too few tasks for the threads to share */
  const int64_t splits = a->T > KEY_CHUNK ? (a->T + KEY_CHUNK - 1) / KEY_CHUNK : 1;
  int64_t heads = group;
  while (heads > 1 && (heads > EL_MAX_GROUP || units * (group / heads) * splits < el_threads())) {
    int64_t smaller = heads - 1;
    while (group % smaller) smaller--;
    heads = smaller;
  }
  attention_job job = {a, heads, group / heads, splits, NULL};
  if (splits > 1 && !(job.partial = calloc((size_t)(a->B * a->Hq * a->L * splits * (a->Dv + 2)), sizeof(float))))
    return;
  el_parallel_for(attention_rows, &job, units * job.chunks * splits);
  if (splits > 1) {
    combine_splits(&job);
    free(job.partial);
  }
}

void el_cache_write(const float* rows, float* cache, const el_cache_rows* c, const el_rotation* rot) {
  const int64_t half = rot ? rot->dims / 2 : 0;
  float* cs = rot ? rope_table(c->L, half, rot->inv_freq, rot->scale, c->offset) : NULL;
  if (rot && !cs) return;
  for (int64_t b = 0; b < c->B; b++)
    for (int64_t l = 0; l < c->L; l++)
      for (int64_t h = 0; h < c->H; h++) {
        const float* src = rows + ((b * c->L + l) * c->H + h) * c->D;
        float* dst = cache + ((b * c->H + h) * c->capacity + c->offset + l) * c->D;
        if (rot) rotate(src, dst, cs + l * half * 2, c->D, rot->dims, rot->traditional);
        else memcpy(dst, src, sizeof(float) * c->D);
      }
  free(cs);
}

void el_attention_cached(const float* q, const float* k_cache, const float* v_cache, float* out,
                         const el_cache_rows* k, int64_t Hq, int64_t Dv, const el_rotation* rot, float scale,
                         int causal) {
  const int64_t B = k->B, L = k->L, D = k->D, cap = k->capacity, half = rot->dims / 2;
  float* cs = rope_table(L, half, rot->inv_freq, rot->scale, k->offset);
  float* qr = malloc(sizeof(float) * B * Hq * L * D);
  if (cs && qr) {
    for (int64_t b = 0; b < B; b++)
      for (int64_t l = 0; l < L; l++)
        for (int64_t h = 0; h < Hq; h++)
          rotate(q + ((b * L + l) * Hq + h) * D, qr + ((b * Hq + h) * L + l) * D, cs + l * half * 2, D, rot->dims,
                 rot->traditional);
    const int64_t H = k->H;
    el_attention_args a = {qr, k_cache, v_cache, out, B, Hq, H, L, k->offset + L, D, Dv,
                           {H * cap * D, cap * D, D}, {H * cap * Dv, cap * Dv, Dv}, scale, causal, 1};
    el_attention(&a);
  }
  free(cs), free(qr);
}
