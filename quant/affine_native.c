/* The error-minimising affine search of quant/affine.py, compiled: a group per vector lane.
 *
 * Per group of `gs` weights (float32 or bfloat16 in, float32 arithmetic) it runs affine.py's steps: a
 * clipping search over `grid`, `steps` least-squares refinements (each kept only where it lowers the
 * error), scale and offset rounded to the stored dtype (bfloat16 or float16) and the codes re-assigned
 * against them; then, per group, whichever of that and MLX's own min-max quantization
 * (mlx/backend/cpu/quantized.cpp, reproduced exactly) reconstructs better as mx.dequantize computes it
 * (two roundings to the dtype: T(T(s*q) + b)). Codes are packed in MLX's layout (one little-endian bit
 * stream per row).
 *
 * L consecutive groups (L = the vector width in floats) are transposed into a [gs][L] block, so every
 * per-group quantity (range,
 * scale, offset, error, least-squares sums) is one vector and every step is plain vertical arithmetic:
 * no horizontal sums, no branches. Codes are assigned with a reciprocal (one division per candidate),
 * except min-max's, which divide as MLX does so that they are MLX's bit for bit. No allocation, no
 * threads: the caller splits the groups between threads.
 *
 * Built without -ffast-math and with -ffp-contract=off: rounding to the nearest code uses the 1.5*2^23
 * trick on values already clipped to [0, n], which needs plain IEEE additions.
 */
#include <stdint.h>
#include <string.h>

/* Built once per instruction set (affine_native.py): EL_WIDTH floats per vector, the machine's own width
 * (16: AVX-512, 8: AVX2, 4: SSE2 or NEON), so no operation is split or scalarised; EL_ISA names the entry
 * point. Every width gives the same bits: lanes are independent groups and each sums in index order. */
#ifndef EL_WIDTH
#define EL_WIDTH 4
#endif
#ifndef EL_ISA
#define EL_ISA generic
#endif
#define L EL_WIDTH /* groups per block: the vector width in floats */
typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));
typedef uint32_t vu __attribute__((vector_size(L * 4)));

#define INLINE static inline __attribute__((always_inline))
#define NAME2(a, b) a##_##b
#define NAME(a, b) NAME2(a, b)

#define MAGIC 12582912.0f /* 1.5 * 2^23: x + MAGIC - MAGIC rounds 0 <= x < 2^22 to the nearest even integer */
#define MAX_GROUP 128

enum { IN_F32 = 0, IN_BF16 = 1 };
enum { OUT_BF16 = 1, OUT_F16 = 2 };
enum { BAD_INPUT = 1, BAD_SCALE = 2, BAD_BIAS = 4 };

INLINE vf splat(float x) { return (vf){0} + x; }
INLINE vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
/* min and max as x86's minps/maxps define them (a < b ? a : b, a > b ? a : b): one instruction where the
 * vector is the machine's own, a compare and a select elsewhere; the same bits either way. */
#if defined(__AVX512F__) && L == 16
#include <immintrin.h>
INLINE vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
INLINE vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__) && L == 8
#include <immintrin.h>
INLINE vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
INLINE vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#elif defined(__SSE2__) && L == 4
#include <emmintrin.h>
INLINE vf vmin(vf a, vf b) { return (vf)_mm_min_ps((__m128)a, (__m128)b); }
INLINE vf vmax(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
#else
INLINE vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
INLINE vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#endif
INLINE vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
INLINE vf clip_round(vf x, float n) { return (vmin(vmax(x, splat(0.0f)), splat(n)) + MAGIC) - MAGIC; }

INLINE vf vrint(vf x) { /* std::rint for any finite x: nearest integer, ties to even, sign kept */
    vf a = vabs(x), r = (a + 8388608.0f) - 8388608.0f;
    r = (vf)((vu)r | ((vu)x & 0x80000000u));
    return vsel(a < 8388608.0f, r, x);
}

INLINE float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Rounding a float to bfloat16 / float16 precision (nearest, ties to even), kept as float. Inputs are
 * finite; a value past the dtype's range becomes infinite, as a cast does. */
INLINE vf round_bf16(vf x) {
    vu u = (vu)x;
    return (vf)((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

INLINE vf round_f16(vf x) {
    vu u = (vu)x, sign = u & 0x80000000u, a = u & 0x7fffffffu;
    vu normal = (a + 0xfffu + ((a >> 13) & 1u)) & 0xffffe000u; /* 10 mantissa bits */
    vf big = vsel((vi)(normal > 0x477fe000u), splat(__builtin_inff()), (vf)normal); /* past 65504 */
    vf ax = (vf)a, sub = (ax + 0.75f) - 0.75f; /* below 2^-14 float16 is fixed-point: multiples of 2^-24 */
    vf r = vsel((vi)(a < 0x38800000u), sub, big);
    return (vf)((vu)r | sign);
}

INLINE vf round_to(vf x, int dtype) { return dtype == OUT_BF16 ? round_bf16(x) : round_f16(x); }

INLINE vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Squared error per lane for codes clip(round((x - bias) * inv)) with scale and bias in float32. */
INLINE vf search_error(const float *xt, int gs, vf scale, vf bias, float n) {
    vf inv = 1.0f / scale, acc0 = splat(0.0f), acc1 = splat(0.0f);
    for (int j = 0; j < gs; j += 2) {
        vf w0 = load(xt + j * L), w1 = load(xt + (j + 1) * L);
        vf d0 = scale * clip_round((w0 - bias) * inv, n) + bias - w0;
        vf d1 = scale * clip_round((w1 - bias) * inv, n) + bias - w1;
        acc0 += d0 * d0;
        acc1 += d1 * d1;
    }
    return acc0 + acc1;
}

/* The sums a least-squares fit needs (of q, q², q·x) for the codes nearest under (scale, bias), in index
 * order, and the squared error per lane of those codes, summed as search_error does. */
INLINE vf error_and_sums(const float *xt, int gs, vf scale, vf bias, float n, vf *aq, vf *aqq, vf *aqw) {
    vf inv = 1.0f / scale, acc0 = splat(0.0f), acc1 = splat(0.0f), sq = splat(0.0f), sqq = sq, sqw = sq;
    for (int j = 0; j < gs; j += 2) {
        vf w0 = load(xt + j * L), w1 = load(xt + (j + 1) * L);
        vf q0 = clip_round((w0 - bias) * inv, n), q1 = clip_round((w1 - bias) * inv, n);
        sq += q0;
        sqq += q0 * q0;
        sqw += q0 * w0;
        sq += q1;
        sqq += q1 * q1;
        sqw += q1 * w1;
        vf d0 = scale * q0 + bias - w0, d1 = scale * q1 + bias - w1;
        acc0 += d0 * d0;
        acc1 += d1 * d1;
    }
    *aq = sq;
    *aqq = sqq;
    *aqw = sqw;
    return acc0 + acc1;
}

/* The least-squares (scale, bias) per lane for codes with those sums; a lane whose codes are all equal (a
 * degenerate fit) keeps its old pair. */
INLINE void fit(vf aq, vf aqq, vf aqw, vf sw, int gs, vf *scale, vf *bias) {
    float g = (float)gs;
    vf s = *scale, b = *bias, det = g * aqq - aq * aq;
    vi ok = det > 0.0f;
    vf ns = vsel(ok, (g * aqw - aq * sw) / vsel(ok, det, splat(1.0f)), s);
    ns = vsel(vabs(ns) > 1e-12f, ns, s);
    *bias = vsel(ok, (sw - ns * aq) / g, b);
    *scale = ns;
}

/* Codes for the stored scale and bias and the error as mx.dequantize reconstructs: T(T(s*q) + b). The codes
 * come from (x - bias_for_codes) times `by` (a reciprocal) or divided by it (as MLX assigns them), x the
 * weights or, with `round_input`, the weights rounded to the dtype (what MLX's min-max quantizes); the
 * error is always against the weights themselves. */
INLINE vf stored_error(const float *xt, int gs, vf by, int multiply, vf bias_for_codes, vf scale, vf bias, float n,
                       int dtype, int round_input, float *codes) {
    vf acc = splat(0.0f);
    for (int j = 0; j < gs; j++) {
        vf w = load(xt + j * L), xr = round_input ? round_to(w, dtype) : w;
        vf q = clip_round(multiply ? (xr - bias_for_codes) * by : (xr - bias_for_codes) / by, n);
        store(codes + j * L, q);
        vf d = round_to(round_to(scale * q, dtype) + bias, dtype) - w;
        acc += d * d;
    }
    return acc;
}

/* Packs the codes of `lanes` groups into MLX's bit stream: lane i from `a` or `b` (by `first`) where `pick`
 * says ours, else from `theirs`. */
INLINE void pack(const float *a, const float *b, const float *theirs, vi first, vi pick, int gs, int bits, int lanes,
                 uint32_t *out) {
    uint32_t words[MAX_GROUP * 8 / 32][L];
    vu acc[MAX_GROUP * 8 / 32];
    int n_words = gs * bits / 32;
    for (int k = 0; k < n_words; k++) acc[k] = (vu){0};
    for (int j = 0; j < gs; j++) {
        vf ours = vsel(first, load(a + j * L), load(b + j * L));
        vu q = (vu)__builtin_convertvector(vsel(pick, ours, load(theirs + j * L)), vi);
        int bit = j * bits, k = bit / 32, off = bit % 32;
        acc[k] |= q << off;
        if (off + bits > 32) acc[k + 1] |= q >> (32 - off);
    }
    for (int k = 0; k < n_words; k++) memcpy(words[k], &acc[k], sizeof acc[k]);
    for (int i = 0; i < lanes; i++)
        for (int k = 0; k < n_words; k++) out[i * n_words + k] = words[k][i];
}

/* Up to L groups, transposed into xt [gs][L] (unused lanes zero). Returns BAD_* flags. */
INLINE int quantize_block(const float *xt, int gs, int bits, int dtype, int round_input, const float *grid,
                          int n_grid, int starts, int steps, int lanes, uint32_t *packed, float *scales_out,
                          float *biases_out) {
    float n = (float)((1 << bits) - 1);
    vf lo = load(xt), hi = lo, sw = splat(0.0f), nan = splat(0.0f), rlo = round_to(lo, dtype), rhi = rlo;
    for (int j = 0; j < gs; j++) {
        vf w = load(xt + j * L);
        lo = vmin(lo, w);
        hi = vmax(hi, w);
        sw += w;
        nan += w * 0.0f; /* NaN in a lane as soon as one of its weights is infinite or NaN */
        if (round_input) {
            vf r = round_to(w, dtype);
            rlo = vmin(rlo, r);
            rhi = vmax(rhi, r);
        }
    }
    for (int i = 0; i < lanes; i++)
        if (nan[i] != 0.0f) return BAD_INPUT;
    if (!round_input) {
        rlo = lo;
        rhi = hi;
    }

    /* ours: the clipping search keeps its `starts` best candidates (1 or 2); least-squares refinement from
     * each, every step kept where it lowers the error; each result is rounded to the dtype and measured as
     * stored, so the choice below is made on what the file will hold */
    vf span = hi - lo, top_e[2], top_s[2], top_b[2];
    for (int k = 0; k < 2; k++) {
        top_e[k] = splat(__builtin_inff());
        top_s[k] = splat(1.0f);
        top_b[k] = splat(0.0f);
    }
    if (starts > n_grid) starts = n_grid;
    for (int i = 0; i < n_grid; i++) {
        float t = grid[i];
        vf low = lo + t * span, s = vmax(span * (1 - 2 * t) / n, splat(1e-12f));
        vf e = search_error(xt, gs, s, low, n);
        for (int k = 0; k < starts; k++) { /* into the sorted list of the best, pushing the rest down */
            vi better = e < top_e[k];
            vf pe = top_e[k], ps = top_s[k], pb = top_b[k];
            top_e[k] = vsel(better, e, pe);
            top_s[k] = vsel(better, s, ps);
            top_b[k] = vsel(better, low, pb);
            e = vsel(better, pe, e);
            s = vsel(better, ps, s);
            low = vsel(better, pb, low);
        }
    }
    float codes[2][MAX_GROUP * L], mm_codes[MAX_GROUP * L];
    vf err[2], stored_s[2], stored_b[2];
    for (int k = 0; k < starts; k++) {
        /* each step: the least-squares pair for the codes of the best so far, measured with its own codes,
         * whose sums serve the next step where it becomes the best (one pass per step) */
        vf best = top_e[k], scale = top_s[k], bias = top_b[k], aq, aqq, aqw;
        if (steps > 0) error_and_sums(xt, gs, scale, bias, n, &aq, &aqq, &aqw);
        for (int i = 0; i < steps; i++) {
            vf s = scale, b = bias, cq, cqq, cqw;
            fit(aq, aqq, aqw, sw, gs, &s, &b);
            vf e = error_and_sums(xt, gs, s, b, n, &cq, &cqq, &cqw);
            vi better = e < best;
            best = vsel(better, e, best);
            scale = vsel(better, s, scale);
            bias = vsel(better, b, bias);
            aq = vsel(better, cq, aq);
            aqq = vsel(better, cqq, aqq);
            aqw = vsel(better, cqw, aqw);
        }
        stored_s[k] = round_to(scale, dtype);
        stored_b[k] = round_to(bias, dtype);
        vf by = 1.0f / vsel(stored_s[k] == 0.0f, splat(1.0f), stored_s[k]);
        err[k] = stored_error(xt, gs, by, 1, stored_b[k], stored_s[k], stored_b[k], n, dtype, 0, codes[k]);
    }
    vi first = splat(0.0f) == 0.0f; /* all lanes: the first start's result */
    vf ours = splat(__builtin_inff()), scale = splat(0.0f), bias = splat(0.0f);
    if (starts > 0) {
        first = starts < 2 ? first : err[0] <= err[1];
        ours = starts < 2 ? err[0] : vsel(first, err[0], err[1]);
        scale = starts < 2 ? stored_s[0] : vsel(first, stored_s[0], stored_s[1]);
        bias = starts < 2 ? stored_b[0] : vsel(first, stored_b[0], stored_b[1]);
    }

    /* MLX's min-max, as mlx/backend/cpu/quantized.cpp computes it */
    vi mask = vabs(rlo) > vabs(rhi);
    vf mm_scale = vmax((rhi - rlo) / n, splat(1e-7f));
    mm_scale = vsel(mask, mm_scale, -mm_scale);
    vf edge = vsel(mask, rlo, rhi), q0 = vrint(edge / mm_scale);
    vi moved = q0 != 0.0f;
    mm_scale = vsel(moved, edge / vsel(moved, q0, splat(1.0f)), mm_scale);
    vf mm_bias = vsel(moved, edge, splat(0.0f));
    vf mm_scale_st = round_to(mm_scale, dtype), mm_bias_st = round_to(mm_bias, dtype);
    vf theirs = stored_error(xt, gs, mm_scale, 0, mm_bias, mm_scale_st, mm_bias_st, n, dtype, round_input, mm_codes);

    vi pick = ours <= theirs;
    scale = vsel(pick, scale, mm_scale_st);
    bias = vsel(pick, bias, mm_bias_st);
    pack(codes[0], starts > 1 ? codes[1] : codes[0], mm_codes, first, pick, gs, bits, lanes, packed);
    float s_out[L], b_out[L];
    store(s_out, scale);
    store(b_out, bias);
    int flags = 0;
    for (int i = 0; i < lanes; i++) {
        scales_out[i] = s_out[i];
        biases_out[i] = b_out[i];
        if (s_out[i] - s_out[i] != 0) flags |= BAD_SCALE;
        if (b_out[i] - b_out[i] != 0) flags |= BAD_BIAS;
    }
    return flags;
}

/* L rows of L floats, r[i][c] -> r[c][i], in registers: one stage per bit of the index, each swapping that
 * bit of the row index with the same bit of the column index (lo[c] = c & h ? L + c - h : c, hi[c] = c & h ?
 * L + c : c + h for the stage of bit h). */
#if defined(__GNUC__) && !defined(__clang__)
#if L == 16
#define STAGES 4
static const vi lo_mask[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                              {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                              {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                              {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
static const vi hi_mask[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                              {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                              {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                              {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
#elif L == 8
#define STAGES 3
static const vi lo_mask[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 8, 2, 10, 4, 12, 6, 14}};
static const vi hi_mask[3] = {{4, 5, 6, 7, 12, 13, 14, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {1, 9, 3, 11, 5, 13, 7, 15}};
#elif L == 4
#define STAGES 2
static const vi lo_mask[2] = {{0, 1, 4, 5}, {0, 4, 2, 6}};
static const vi hi_mask[2] = {{2, 3, 6, 7}, {1, 5, 3, 7}};
#endif
#endif

#ifdef STAGES
INLINE void transpose(vf r[L]) {
    for (int stage = 0, h = L / 2; stage < STAGES; stage++, h /= 2)
        for (int a = 0; a < L; a++) {
            if (a & h) continue;
            vf x = r[a], y = r[a + h];
            r[a] = __builtin_shuffle(x, y, lo_mask[stage]);
            r[a + h] = __builtin_shuffle(x, y, hi_mask[stage]);
        }
}
#endif

typedef uint16_t vh __attribute__((vector_size(L * 2)));

/* L weights of group i from column c: bfloat16 (widened exactly) or float32; bf16 is a constant once inlined. */
INLINE vf load_lanes(const void *src, int bf16, int gs, int i, int c) {
    if (!bf16) return load((const float *)src + (int64_t)i * gs + c);
    vh h;
    memcpy(&h, (const uint16_t *)src + (int64_t)i * gs + c, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

INLINE float load_one(const void *src, int bf16, int64_t at) {
    return bf16 ? bits_f((uint32_t)((const uint16_t *)src)[at] << 16) : ((const float *)src)[at];
}

/* Groups (rows of `gs` bfloat16 or float32 weights) -> xt [gs][L], lane i = group i; lanes past `lanes` are zero. */
INLINE void transpose_groups(const void *src, int bf16, int gs, int lanes, float *xt) {
#ifdef STAGES
    if (lanes == L) {
        for (int c = 0; c < gs; c += L) {
            vf r[L];
            for (int i = 0; i < L; i++) r[i] = load_lanes(src, bf16, gs, i, c);
            transpose(r);
            for (int j = 0; j < L; j++) store(xt + (c + j) * L, r[j]);
        }
        return;
    }
#endif
    memset(xt, 0, sizeof(float) * gs * L);
    for (int i = 0; i < lanes; i++)
        for (int j = 0; j < gs; j++) xt[j * L + i] = load_one(src, bf16, (int64_t)i * gs + j);
}

/* `count` groups of `gs` consecutive float32 or bfloat16 weights -> packed codes (gs*bits/32 words per
 * group) and float32 scales and biases (one per group), exactly representable in the stored dtype.
 * Returns the OR of BAD_* flags, -1 for a group size it does not take. An empty grid gives MLX's min-max
 * quantization alone. */
int NAME(el_affine_quantize, EL_ISA)(const void *weights, int in_dtype, int64_t count, int gs, int bits, int dtype,
                              const float *grid, int n_grid, int starts, int steps, uint32_t *packed, float *scales,
                              float *biases) {
    if (gs % L || gs > MAX_GROUP || (gs * bits) % 32 || bits < 1 || bits > 8 || starts < 0 || starts > 2) return -1;
    int words = gs * bits / 32, flags = 0, round_input = !(in_dtype == IN_BF16 && dtype == OUT_BF16);
    float xt[MAX_GROUP * L];
    for (int64_t k = 0; k < count; k += L) {
        int lanes = count - k < L ? (int)(count - k) : L;
        if (in_dtype == IN_BF16)
            transpose_groups((const uint16_t *)weights + k * gs, 1, gs, lanes, xt);
        else
            transpose_groups((const float *)weights + k * gs, 0, gs, lanes, xt);
        flags |= quantize_block(xt, gs, bits, dtype, round_input, grid, n_grid, starts, steps, lanes, packed + k * words,
                                scales + k, biases + k);
        if (flags & BAD_INPUT) return flags;
    }
    return flags;
}
