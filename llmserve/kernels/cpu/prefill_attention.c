/* Causal self-attention of fresh prefills on CPU, fp32: each sequence's queries over its own new
 * keys (no cached context), flash-style (online softmax over blocks of keys), GQA. It replaces
 * torch's SDPA for these rows: at head_dim 32 on 2 cores (8 sequences of 1,024 tokens) it ran
 * at 111-120 GFLOP/s against SDPA's 79-100, whose tiles are small GEMM calls with 32-deep
 * products.
 *
 * Layouts (rows of the step's fused qkv output, see llmserve/kernels/cpu_prefill.py):
 *   q:      token t, head j at q + t * q_row_stride + j * D
 *   k, v:   token t, KV head h at k + t * kv_row_stride + h * D
 *   out:    [tokens, num_heads, D] contiguous
 *   starts, lens: [num_seqs]: sequence i is tokens starts[i] .. starts[i] + lens[i]
 * Query head j uses KV head j / G (G = num_heads / num_kv_heads). Position p of a sequence
 * attends to its positions 0..p.
 *
 * How: K of each (sequence, KV head) is first transposed into [D][keys], so that a block of
 * scores is an outer-product sum over d (a broadcast query element times a vector of keys), with
 * no horizontal sums. Work items are (sequence, KV head, block of BQ query tokens), spread over
 * torch's OpenMP threads; each item is computed by one thread, so results do not depend on the
 * thread count. Built like paged_decode.c (-O3 -march=native -ffp-contract=fast, no
 * -ffast-math).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpositive.h"

/* One AVX-512 register of floats where there is one, else 8 floats (AVX, or two NEON
 * registers). Unlike the decode kernel, this GEMM-like one gains from the width: 58-66 against
 * 49-51 GFLOP/s on one thread with 8-float vectors. */
#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
typedef float vec __attribute__((vector_size(VL * sizeof(float))));
typedef uint32_t uvec __attribute__((vector_size(VL * sizeof(uint32_t))));
typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t)))); /* comparisons */

#define KV 4          /* key vectors per block */
#define BK (KV * VL)  /* keys per block */
#define QV 4          /* query rows per pass: QV x KV score accumulators in registers */
#define DV_PASS 4     /* V vectors per row per pass of the weighted sum: QV x DV_PASS of them */
#define BQ 16         /* query tokens per work item */

static inline vec vload(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* Lanes of a where mask is set (all bits), else of b. */
static inline vec vselect(ivec mask, vec a, vec b)
{
    return (vec)(((uvec)a & (uvec)mask) | ((uvec)b & ~(uvec)mask));
}

/* `exp_nonpositive` on a whole vector. */
static inline vec vexp_nonpositive(vec x)
{
    const vec lo = (vec){0} - 87.0f;
    x = vselect(x < lo, lo, x);
    const vec shifted = x * EXP_LOG2E + EXP_ROUND;
    const vec n = shifted - EXP_ROUND;
    const vec r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    const uvec bits = ((uvec)shifted - 0x4B400000u + 127u) << 23;
    return EXP_POLY(r) * (vec)bits;
}

struct job {
    const float *q, *k, *v;
    float *out, *kt;
    int64_t q_row_stride, kv_row_stride, H, KVH, D, G;
    float scale;
    const int64_t *starts, *lens, *kt_offset; /* kt_offset[i]: first float of i's K^T */
};

static inline int64_t padded(int64_t n) { return (n + BK - 1) / BK * BK; }

/* K^T of sequence i, KV head h: [D][padded(len)], the padding zero. */
static void transpose_k(const struct job *a, int64_t i, int64_t h)
{
    const int64_t begin = a->starts[i], len = a->lens[i], width = padded(len);
    float *kt = a->kt + a->kt_offset[i] + h * a->D * width;
    for (int64_t t = 0; t < len; t++) {
        const float *kr = a->k + (begin + t) * a->kv_row_stride + h * a->D;
        for (int64_t d = 0; d < a->D; d++)
            kt[d * width + t] = kr[d];
    }
    for (int64_t d = 0; d < a->D; d++)
        for (int64_t t = len; t < width; t++)
            kt[d * width + t] = 0.0f;
}

/* Scores of QV query rows (qs, [QV][D], already scaled) against the BK keys of K^T from
 * column k0: s[r][0..BK). */
static inline __attribute__((always_inline)) void
block_scores(const float *restrict qs, const float *restrict kt, int64_t width, int64_t k0,
             int64_t D, float *restrict s)
{
    vec acc[QV][KV];
    for (int r = 0; r < QV; r++)
        for (int j = 0; j < KV; j++)
            acc[r][j] = (vec){0};
    for (int64_t d = 0; d < D; d++) {
        vec kv[KV];
        for (int j = 0; j < KV; j++)
            kv[j] = vload(kt + d * width + k0 + j * VL);
        for (int r = 0; r < QV; r++) {
            const float qd = qs[r * D + d];
            for (int j = 0; j < KV; j++)
                acc[r][j] += qd * kv[j];
        }
    }
    for (int r = 0; r < QV; r++)
        for (int j = 0; j < KV; j++)
            vstore(s + r * BK + j * VL, acc[r][j]);
}

/* Lanes of x in the order given (older GCC has only __builtin_shuffle). */
#ifdef __clang__
#define PERMUTE(x, ...) PERMUTE(x, __VA_ARGS__)
#else
#define PERMUTE(x, ...) __builtin_shuffle(x, (ivec){__VA_ARGS__})
#endif

/* Halves of a vector folded onto each other (log2(VL) steps): its largest lane, its sum. */
#if VL == 16
#define FOLD(x, op)                                                                           \
    x = op(x, PERMUTE(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)); \
    x = op(x, PERMUTE(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)); \
    x = op(x, PERMUTE(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)); \
    x = op(x, PERMUTE(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14))
#else
#define FOLD(x, op)                                                                           \
    x = op(x, PERMUTE(x, 4, 5, 6, 7, 0, 1, 2, 3));                         \
    x = op(x, PERMUTE(x, 2, 3, 0, 1, 6, 7, 4, 5));                         \
    x = op(x, PERMUTE(x, 1, 0, 3, 2, 5, 4, 7, 6))
#endif
static inline vec vmax(vec a, vec b) { return vselect(a > b, a, b); }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline float hmax(vec x)
{
    FOLD(x, vmax);
    return x[0];
}
static inline float hsum(vec x)
{
    FOLD(x, vadd);
    return x[0];
}

/* Online-softmax step of one row over its first n (1..BK) scores of a block: s[0..n) becomes
 * e^(s - m_new), s[n..BK) zero; returns the factor the row's accumulator must be scaled by.
 * Written on whole vectors: the compiler's own vectorisation of these loops used half-width
 * masked ones. Lanes past n are left out of the maximum and zeroed after the exponential. */
static inline float softmax_row(float *restrict s, int64_t n, float *m, float *l)
{
    vec x[KV], lane, mx = (vec){0} - INFINITY;
    ivec keep[KV];
    for (int j = 0; j < VL; j++)
        lane[j] = (float)j;
    for (int j = 0; j < KV; j++) {
        keep[j] = lane < (float)(n - j * VL);
        x[j] = vload(s + j * VL);
        const vec seen = vselect(keep[j], x[j], mx);
        mx = vselect(seen > mx, seen, mx);
    }
    const float tile_max = hmax(mx);
    const float m_new = tile_max > *m ? tile_max : *m;
    /* ~1e-38 rather than 0 on the first block (m = -inf): it scales a zero accumulator. A libm
     * expf here, once per row and block, took ~10% of the kernel. */
    const float alpha = exp_nonpositive(*m - m_new);
    vec sum = (vec){0};
    for (int j = 0; j < KV; j++) {
        const vec e = vselect(keep[j], vexp_nonpositive(x[j] - m_new), (vec){0});
        vstore(s + j * VL, e);
        sum += e;
    }
    *l = *l * alpha + hsum(sum);
    *m = m_new;
    return alpha;
}

/* acc[r] = acc[r] * alpha[r] + sum over keys t < n of p[r][t] * V[k0 + t], for QV rows. */
static inline __attribute__((always_inline)) void
block_values(const struct job *a, const float *vbase, int64_t n, const float *restrict p,
             const float *restrict alpha, float *restrict acc, int64_t D)
{
    for (int64_t d0 = 0; d0 < D; d0 += DV_PASS * VL) {
        const int64_t nv = (D - d0) / VL < DV_PASS ? (D - d0) / VL : DV_PASS;
        vec o[QV][DV_PASS];
        for (int r = 0; r < QV; r++)
            for (int64_t j = 0; j < nv; j++)
                o[r][j] = vload(acc + r * D + d0 + j * VL) * alpha[r];
        for (int64_t t = 0; t < n; t++) {
            const float *vr = vbase + t * a->kv_row_stride + d0;
            vec v[DV_PASS];
            for (int64_t j = 0; j < nv; j++)
                v[j] = vload(vr + j * VL);
            for (int r = 0; r < QV; r++) {
                const float w = p[r * BK + t];
                for (int64_t j = 0; j < nv; j++)
                    o[r][j] += w * v[j];
            }
        }
        for (int r = 0; r < QV; r++)
            for (int64_t j = 0; j < nv; j++)
                vstore(acc + r * D + d0 + j * VL, o[r][j]);
    }
}

/* Item = (sequence i, KV head h, query tokens t0 .. t0 + BQ): the G heads of each of its
 * tokens are its rows (row = token offset * G + head offset), padded with empty rows to a
 * multiple of QV. Blocks of keys are the outer loop, so that a block's K^T and V stay in L1 for
 * every pass of QV rows (with the rows outer they came from L2 at every pass: measured 2x).
 * buf: this thread's scratch (`scratch_floats`). */
static inline __attribute__((always_inline)) void
attend_item_d(const struct job *a, int64_t i, int64_t h, int64_t t0, float *buf, const int64_t D)
{
    const int64_t G = a->G, begin = a->starts[i], len = a->lens[i], width = padded(len);
    const int64_t tokens = len - t0 < BQ ? len - t0 : BQ, rows = tokens * G;
    const int64_t padded_rows = (rows + QV - 1) / QV * QV;
    const float *kt = a->kt + a->kt_offset[i] + h * D * width;
    const float *vseq = a->v + begin * a->kv_row_stride + h * D;
    float *qs = buf, *acc = qs + padded_rows * D, *m = acc + padded_rows * D, *l = m + padded_rows;
    float *s = l + padded_rows;
    for (int64_t r = 0; r < padded_rows; r++) {
        const float *qr = r < rows
            ? a->q + (begin + t0 + r / G) * a->q_row_stride + (h * G + r % G) * D : NULL;
        for (int64_t d = 0; d < D; d++) {
            qs[r * D + d] = qr ? qr[d] * a->scale : 0.0f;
            acc[r * D + d] = 0.0f;
        }
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < t0 + tokens; k0 += BK) {
        for (int64_t r0 = 0; r0 < rows; r0 += QV) {
            const int64_t last_row = r0 + QV - 1 < rows ? r0 + QV - 1 : rows - 1;
            if (t0 + last_row / G < k0)
                continue; /* every key of the block is after every token of the pass */
            block_scores(qs + r0 * D, kt, width, k0, D, s);
            float alpha[QV];
            int64_t n_max = 0;
            for (int r = 0; r < QV; r++) {
                const int64_t row = r0 + r, visible = t0 + row / G - k0 + 1; /* causal */
                const int64_t n = row >= rows ? 0 : (visible < BK ? visible : BK);
                if (n <= 0) { /* no key of this block, or no row: unchanged */
                    alpha[r] = 1.0f;
                    memset(s + r * BK, 0, sizeof(float) * BK);
                    continue;
                }
                alpha[r] = softmax_row(s + r * BK, n, m + row, l + row);
                n_max = n > n_max ? n : n_max;
            }
            block_values(a, vseq + k0 * a->kv_row_stride, n_max, s, alpha, acc + r0 * D, D);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *o = a->out + ((begin + t0 + r / G) * a->H + h * G + r % G) * D;
        for (int64_t d = 0; d < D; d++)
            o[d] = acc[r * D + d] / l[r];
    }
}

static void attend_item(const struct job *a, int64_t i, int64_t h, int64_t t0, float *buf)
{
    switch (a->D) { /* constant trip counts for the common head sizes */
    case 32:
        attend_item_d(a, i, h, t0, buf, 32);
        break;
    case 64:
        attend_item_d(a, i, h, t0, buf, 64);
        break;
    case 128:
        attend_item_d(a, i, h, t0, buf, 128);
        break;
    default:
        attend_item_d(a, i, h, t0, buf, a->D);
    }
}

static size_t scratch_floats(int64_t D, int64_t G)
{
    const int64_t rows = (BQ * G + QV - 1) / QV * QV;
    return (size_t)(2 * rows * D + 2 * rows + QV * BK);
}

/* Returns 0; -1 when D is not a multiple of VL, the heads do not group or a length is
 * negative; -3 out of memory. */
int llmserve_causal_attention_f32(float *out, const float *q, int64_t q_row_stride,
                                  const float *k, const float *v, int64_t kv_row_stride,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  float scale, const int64_t *starts, const int64_t *lens,
                                  int64_t num_seqs)
{
    if (head_dim <= 0 || head_dim % VL || num_kv_heads <= 0 || num_heads % num_kv_heads)
        return -1;
    int64_t *kt_offset = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (kt_offset == NULL)
        return -3;
    int64_t items = 0;
    kt_offset[0] = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = lens[i];
        if (len < 0) {
            free(kt_offset);
            return -1;
        }
        kt_offset[i + 1] = kt_offset[i] + padded(len) * num_kv_heads * head_dim;
        items += (len + BQ - 1) / BQ * num_kv_heads;
    }
    float *kt = malloc(sizeof(float) * (size_t)(kt_offset[num_seqs] > 0 ? kt_offset[num_seqs] : 1));
    int64_t *item = malloc(sizeof(int64_t) * 3 * (size_t)(items > 0 ? items : 1));
    if (kt == NULL || item == NULL) {
        free(kt_offset);
        free(kt);
        free(item);
        return -3;
    }
    /* Later query blocks attend to more keys: listed first, so the dynamic schedule ends on
     * short items. */
    int64_t n = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = lens[i];
        for (int64_t t0 = (len - 1) / BQ * BQ; t0 >= 0 && len > 0; t0 -= BQ)
            for (int64_t h = 0; h < num_kv_heads; h++) {
                item[3 * n] = i;
                item[3 * n + 1] = h;
                item[3 * n + 2] = t0;
                n++;
            }
    }
    const struct job a = {q, k, v, out, kt, q_row_stride, kv_row_stride, num_heads,
                          num_kv_heads, head_dim, num_heads / num_kv_heads, scale, starts, lens,
                          kt_offset};
    int status = 0;
#pragma omp parallel reduction(min : status)
    {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < num_seqs * num_kv_heads; x++)
            transpose_k(&a, x / num_kv_heads, x % num_kv_heads);
        float *buf = malloc(sizeof(float) * scratch_floats(head_dim, a.G));
        if (buf == NULL)
            status = -3;
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < items; x++)
            if (buf != NULL)
                attend_item(&a, item[3 * x], item[3 * x + 1], item[3 * x + 2], buf);
        free(buf);
    }
    free(kt_offset);
    free(kt);
    free(item);
    return status;
}
