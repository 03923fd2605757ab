/* Causal self-attention of prefills on CPU, fp32, flash-style (online softmax over blocks of
 * keys), GQA. Fresh prefills (no cached context) attend over their own new keys, read straight
 * from the step's qkv rows (`llmserve_causal_attention_f32`); prefill chunks after cached context
 * (a prompt split over steps, or after a prefix-cache hit) attend over the paged cache
 * (`llmserve_paged_prefill_attention_f32`). It replaces torch's SDPA for these rows (and the
 * padded gather + mask that chunks needed): at head_dim 32 on 2 cores (4 sequences of 800-1,024
 * tokens) it runs at ~160 GFLOP/s, against SDPA's 79-100, whose tiles are small GEMM calls with
 * 32-deep products.
 *
 * Layouts (rows of the step's fused qkv output, see llmserve/kernels/cpu_prefill.py):
 *   q:      token t, head j at q + t * q_row_stride + j * D
 *   k, v:   token t, KV head h at k + t * kv_row_stride + h * D
 *   out:    [tokens, num_heads, D] contiguous
 *   starts, lens: [num_seqs]: sequence i is tokens starts[i] .. starts[i] + lens[i]
 *   paged: k, v caches [blocks][block_size][KVH][D]; tables[i]: sequence i's block ids; its
 *          queries are at positions ctx[i] .. ctx[i] + lens[i] - 1
 * Query head j uses KV head j / G (G = num_heads / num_kv_heads). Position p of a sequence
 * attends to its positions 0..p.
 *
 * How: K of each (sequence, KV head) is first transposed into [D][keys] (and, for paged keys,
 * V copied into [keys][D] rows), so that a block of
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

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

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

#define KV 4          /* key vectors per block (block_scores has a case for each count) */
#define BK (KV * VL)  /* keys per block */
/* Query rows per pass: QV x KV score accumulators in registers. AVX-512's 32 registers hold
 * 6 x 4 of them with the 4 key vectors: 8,192-token calls (head_dim 32, 4 heads per KV head)
 * took ~23.1 against ~25.3 ms with 4 rows (medians of 16, alternated), with the same bits. */
#if VL == 16
#define QV 6
#else
#define QV 4
#endif
#define DV_PASS 4     /* V vectors per row per pass of the weighted sum: QV x DV_PASS of them */
#define BQ 24         /* query tokens per work item: 96 rows at 4 heads per KV head, 16 passes */

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

/* `exp_nonpositive` on a whole vector; also exact for the x <= LAZY_MARGIN of `softmax_row`
 * (the reduction takes any x up to ~88). On AVX-512 the clamp is one max and 2^n one scalef
 * (the same bits as building 2^n from n's bits and multiplying): with the full-block path of
 * `softmax_block`, 8,192-token calls went from ~25 to ~23.5 ms (medians of 12, alternated). */
static inline vec vexp_nonpositive(vec x)
{
    const vec lo = (vec){0} - 87.0f;
#if defined(__AVX512F__) && VL == 16
    x = (vec)_mm512_max_ps((__m512)lo, (__m512)x); /* the second operand when either is NaN */
#else
    x = vselect(x < lo, lo, x);
#endif
    const vec shifted = x * EXP_LOG2E + EXP_ROUND;
    const vec n = shifted - EXP_ROUND;
    const vec r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
#if defined(__AVX512F__) && VL == 16
    return (vec)_mm512_scalef_ps((__m512)EXP_POLY(r), (__m512)n);
#else
    const uvec bits = ((uvec)shifted - 0x4B400000u + 127u) << 23;
    return EXP_POLY(r) * (vec)bits;
#endif
}

struct job {
    const float *q, *k, *v;
    float *out, *kt;
    int64_t q_row_stride, kv_row_stride, H, KVH, D, G;
    float scale;
    const int64_t *starts, *lens;
    /* kt_offset[i]: first float of i's K^T; also of its V copy (paged keys only). */
    const int64_t *kt_offset;
    /* Paged keys (NULL for fresh prefills): sequence i's queries come after ctx[i] cached
     * positions, and every key (cached and new) is read from the paged cache k/v
     * ([blocks][block_size][KVH][D]) through tables[i * table_stride ..]. */
    const int64_t *ctx, *tables;
    int64_t table_stride, block_size;
    float *vcopy; /* V of each (sequence, KV head), [keys][D], for paged keys */
};

static inline int64_t padded(int64_t n) { return (n + BK - 1) / BK * BK; }

/* Cached positions before sequence i's queries (0 for fresh prefills). */
static inline int64_t context(const struct job *a, int64_t i) { return a->ctx ? a->ctx[i] : 0; }

/* Row of key position t of sequence i, KV head h, in k (or v: same layout). */
static inline const float *key_row(const struct job *a, const float *base, int64_t i, int64_t t,
                                   int64_t h)
{
    if (a->ctx == NULL)
        return base + (a->starts[i] + t) * a->kv_row_stride + h * a->D;
    const int64_t block = a->tables[i * a->table_stride + t / a->block_size];
    return base + ((block * a->block_size + t % a->block_size) * a->KVH + h) * a->D;
}

/* K^T of sequence i, KV head h: [D][padded(keys)], the padding zero; for paged keys also V
 * as [keys][D] rows (so the weighted sum reads it like a fresh prefill's rows). */
static void transpose_k(const struct job *a, int64_t i, int64_t h)
{
    const int64_t keys = context(a, i) + a->lens[i], width = padded(keys);
    float *kt = a->kt + a->kt_offset[i] + h * a->D * width;
    float *vc = a->ctx ? a->vcopy + a->kt_offset[i] + h * a->D * width : NULL;
    for (int64_t t = 0; t < keys; t++) {
        const float *kr = key_row(a, a->k, i, t, h);
        for (int64_t d = 0; d < a->D; d++)
            kt[d * width + t] = kr[d];
        if (vc)
            memcpy(vc + t * a->D, key_row(a, a->v, i, t, h), sizeof(float) * (size_t)a->D);
    }
    for (int64_t d = 0; d < a->D; d++)
        for (int64_t t = keys; t < width; t++)
            kt[d * width + t] = 0.0f;
}

/* Scores of QV query rows (qs, [QV][D], already scaled) against the first nk * VL keys of K^T
 * from column k0: s[r][0..nk * VL). */
static inline __attribute__((always_inline)) void
block_scores_n(const float *restrict qs, const float *restrict kt, int64_t width, int64_t k0,
               int64_t D, float *restrict s, const int nk)
{
    vec acc[QV][KV];
    for (int r = 0; r < QV; r++)
        for (int j = 0; j < nk; j++)
            acc[r][j] = (vec){0};
    for (int64_t d = 0; d < D; d++) {
        vec kv[KV];
        for (int j = 0; j < nk; j++)
            kv[j] = vload(kt + d * width + k0 + j * VL);
        for (int r = 0; r < QV; r++) {
            const float qd = qs[r * D + d];
            for (int j = 0; j < nk; j++)
                acc[r][j] += qd * kv[j];
        }
    }
    for (int r = 0; r < QV; r++)
        for (int j = 0; j < nk; j++)
            vstore(s + r * BK + j * VL, acc[r][j]);
}

/* `block_scores_n` over the key vectors that hold any of the first `visible` keys: on the
 * diagonal block the pass's last row sees only some of them, and the lanes past what a row sees
 * are masked by `softmax_row` and skipped by the weighted sum, whatever s holds there.
 * 8,192-token calls ~26.9 -> ~24.9 ms (medians of 14, alternated; a slow hour), same bits. */
static inline __attribute__((always_inline)) void
block_scores(const float *restrict qs, const float *restrict kt, int64_t width, int64_t k0,
             int64_t D, float *restrict s, int64_t visible)
{
    _Static_assert(KV == 4, "one case per key-vector count");
    const int64_t nk = visible >= BK ? KV : (visible + VL - 1) / VL;
    switch (nk) {
    case 1: block_scores_n(qs, kt, width, k0, D, s, 1); break;
    case 2: block_scores_n(qs, kt, width, k0, D, s, 2); break;
    case 3: block_scores_n(qs, kt, width, k0, D, s, 3); break;
    default: block_scores_n(qs, kt, width, k0, D, s, KV);
    }
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

/* Whether a lane of x is above t (false for NaN lanes): one mask test on AVX-512 and AVX, where
 * the fold of `hmax` is several shuffles. */
static inline int any_above(vec x, float t)
{
#if defined(__AVX512F__) && VL == 16
    return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
#elif defined(__AVX__) && VL == 8
    return _mm256_movemask_ps(_mm256_cmp_ps((__m256)x, _mm256_set1_ps(t), _CMP_GT_OQ)) != 0;
#else
    return hmax(x) > t;
#endif
}

/* A row's running maximum m is raised only when a block holds a score above m + LAZY_MARGIN.
 * Below that, the block's weights e^(s - m) are at most e^8 (~3e3): no overflow in float sums,
 * and the quotient acc / l is the softmax whichever m was subtracted. Most blocks then need no
 * horizontal maximum, no rescale of the row and no scalar exponential (the folds and the scalar
 * exponential were ~20% of the kernel's time with m raised at every block). */
#define LAZY_MARGIN 8.0f

/* Online-softmax step of one row over its first n (1..BK) scores of a block: s[0..n) becomes
 * e^(s - m), s[n..BK) zero, and the weights are added to the row's sum, kept as a vector l (one
 * horizontal sum at the end); returns the factor the row's accumulator must be scaled by (1 when
 * m stays). Written on whole vectors: the compiler's own vectorisation of these loops used
 * half-width masked ones. Lanes past n are left out of the maximum and zeroed after the
 * exponential; `full` (n == BK, every block but a row's last) compiles without those masks. */
static inline __attribute__((always_inline)) float
softmax_block(float *restrict s, int64_t n, float *m, float *l, const int full)
{
    vec x[KV], lane, mx = (vec){0} - INFINITY;
    ivec keep[KV];
    for (int j = 0; j < VL; j++)
        lane[j] = (float)j;
    for (int j = 0; j < KV; j++) {
        x[j] = vload(s + j * VL);
        if (full) {
            mx = vmax(x[j], mx);
        } else {
            keep[j] = lane < (float)(n - j * VL);
            mx = vmax(vselect(keep[j], x[j], mx), mx);
        }
    }
    float alpha = 1.0f;
    vec sum = vload(l);
    if (any_above(mx, *m + LAZY_MARGIN)) { /* always on a row's first block (m = -inf) */
        const float m_new = hmax(mx);
        /* ~1e-38 rather than 0 on the first block (m = -inf): it scales a zero accumulator. A
         * libm expf here took ~10% of the kernel. */
        alpha = exp_nonpositive(*m - m_new);
        sum *= alpha;
        *m = m_new;
    }
    for (int j = 0; j < KV; j++) {
        vec e = vexp_nonpositive(x[j] - *m);
        if (!full)
            e = vselect(keep[j], e, (vec){0});
        vstore(s + j * VL, e);
        sum += e;
    }
    vstore(l, sum);
    return alpha;
}

static inline float softmax_row(float *restrict s, int64_t n, float *m, float *l)
{
    return n == BK ? softmax_block(s, BK, m, l, 1) : softmax_block(s, n, m, l, 0);
}

/* acc[r] = acc[r] * alpha[r] + sum over keys t < n of p[r][t] * V[k0 + t], for QV rows. */
static inline __attribute__((always_inline)) void
block_values(const float *vbase, int64_t v_stride, int64_t n, const float *restrict p,
             const float *restrict alpha, float *restrict acc, int64_t D)
{
    for (int64_t d0 = 0; d0 < D; d0 += DV_PASS * VL) {
        const int64_t nv = (D - d0) / VL < DV_PASS ? (D - d0) / VL : DV_PASS;
        vec o[QV][DV_PASS];
        for (int r = 0; r < QV; r++)
            for (int64_t j = 0; j < nv; j++)
                o[r][j] = vload(acc + r * D + d0 + j * VL) * alpha[r];
        for (int64_t t = 0; t < n; t++) {
            const float *vr = vbase + t * v_stride + d0;
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
    const int64_t G = a->G, begin = a->starts[i], len = a->lens[i], ctx = context(a, i);
    const int64_t width = padded(ctx + len);
    const int64_t tokens = len - t0 < BQ ? len - t0 : BQ, rows = tokens * G;
    const int64_t padded_rows = (rows + QV - 1) / QV * QV;
    const float *kt = a->kt + a->kt_offset[i] + h * D * width;
    const float *vseq = a->ctx ? a->vcopy + a->kt_offset[i] + h * D * width
                               : a->v + begin * a->kv_row_stride + h * D;
    const int64_t v_stride = a->ctx ? D : a->kv_row_stride;
    float *qs = buf, *acc = qs + padded_rows * D, *m = acc + padded_rows * D, *l = m + padded_rows;
    float *s = l + padded_rows * VL;
    for (int64_t r = 0; r < padded_rows; r++) {
        const float *qr = r < rows
            ? a->q + (begin + t0 + r / G) * a->q_row_stride + (h * G + r % G) * D : NULL;
        for (int64_t d = 0; d < D; d++) {
            qs[r * D + d] = qr ? qr[d] * a->scale : 0.0f;
            acc[r * D + d] = 0.0f;
        }
        m[r] = -INFINITY;
        vstore(l + r * VL, (vec){0});
    }
    for (int64_t k0 = 0; k0 < ctx + t0 + tokens; k0 += BK) {
        for (int64_t r0 = 0; r0 < rows; r0 += QV) {
            const int64_t last_row = r0 + QV - 1 < rows ? r0 + QV - 1 : rows - 1;
            if (ctx + t0 + last_row / G < k0)
                continue; /* every key of the block is after every token of the pass */
            block_scores(qs + r0 * D, kt, width, k0, D, s, ctx + t0 + last_row / G - k0 + 1);
            float alpha[QV];
            int64_t n_max = 0;
            for (int r = 0; r < QV; r++) {
                const int64_t row = r0 + r, visible = ctx + t0 + row / G - k0 + 1; /* causal */
                const int64_t n = row >= rows ? 0 : (visible < BK ? visible : BK);
                if (n <= 0) { /* no key of this block, or no row: unchanged */
                    alpha[r] = 1.0f;
                    memset(s + r * BK, 0, sizeof(float) * BK);
                    continue;
                }
                alpha[r] = softmax_row(s + r * BK, n, m + row, l + row * VL);
                n_max = n > n_max ? n : n_max;
            }
            block_values(vseq + k0 * v_stride, v_stride, n_max, s, alpha, acc + r0 * D, D);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *o = a->out + ((begin + t0 + r / G) * a->H + h * G + r % G) * D;
        const float sum = hsum(vload(l + r * VL));
        for (int64_t d = 0; d < D; d++)
            o[d] = acc[r * D + d] / sum;
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
    return (size_t)(2 * rows * D + rows + rows * VL + QV * BK); /* qs, acc, m, l, s */
}

/* Runs a job whose pointers, sizes, scale, starts, lens and (paged) ctx/tables are set. Returns
 * 0; -1 when D is not a multiple of VL, the heads do not group or a length is negative; -3 out
 * of memory. */
static int run(struct job a, int64_t num_seqs)
{
    const int64_t head_dim = a.D, num_kv_heads = a.KVH;
    if (head_dim <= 0 || head_dim % VL || num_kv_heads <= 0 || a.H % num_kv_heads)
        return -1;
    a.G = a.H / num_kv_heads;
    int64_t *kt_offset = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (kt_offset == NULL)
        return -3;
    int64_t items = 0;
    kt_offset[0] = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = a.lens[i];
        if (len < 0 || context(&a, i) < 0) {
            free(kt_offset);
            return -1;
        }
        kt_offset[i + 1] = kt_offset[i] + padded(len + context(&a, i)) * num_kv_heads * head_dim;
        items += (len + BQ - 1) / BQ * num_kv_heads;
    }
    const size_t kt_floats = (size_t)(kt_offset[num_seqs] > 0 ? kt_offset[num_seqs] : 1);
    float *kt = malloc(sizeof(float) * kt_floats);
    float *vcopy = a.ctx ? malloc(sizeof(float) * kt_floats) : NULL;
    int64_t *item = malloc(sizeof(int64_t) * 3 * (size_t)(items > 0 ? items : 1));
    if (kt == NULL || item == NULL || (a.ctx && vcopy == NULL)) {
        free(kt_offset);
        free(kt);
        free(vcopy);
        free(item);
        return -3;
    }
    /* Later query blocks attend to more keys: listed first, so the dynamic schedule ends on
     * short items. */
    int64_t n = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = a.lens[i];
        for (int64_t t0 = (len - 1) / BQ * BQ; t0 >= 0 && len > 0; t0 -= BQ)
            for (int64_t h = 0; h < num_kv_heads; h++) {
                item[3 * n] = i;
                item[3 * n + 1] = h;
                item[3 * n + 2] = t0;
                n++;
            }
    }
    a.kt = kt;
    a.vcopy = vcopy;
    a.kt_offset = kt_offset;
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
    free(vcopy);
    free(item);
    return status;
}

/* Fresh prefills: sequence i is rows starts[i] .. + lens[i] of q, k and v. See `run`. */
int llmserve_causal_attention_f32(float *out, const float *q, int64_t q_row_stride,
                                  const float *k, const float *v, int64_t kv_row_stride,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  float scale, const int64_t *starts, const int64_t *lens,
                                  int64_t num_seqs)
{
    const struct job a = {.q = q, .k = k, .v = v, .out = out, .q_row_stride = q_row_stride,
                          .kv_row_stride = kv_row_stride, .H = num_heads, .KVH = num_kv_heads,
                          .D = head_dim, .scale = scale, .starts = starts, .lens = lens};
    return run(a, num_seqs);
}

/* Prefill chunks over cached context: sequence i's queries are rows starts[i] .. + lens[i] of
 * q, at positions ctx[i] .. ctx[i] + lens[i] - 1, and its keys and values (the chunk's own
 * already stored) are read from the paged caches through its row of `tables` (int64, one row
 * of table_stride entries per sequence). See `run`; also -1 for a negative ctx. */
int llmserve_paged_prefill_attention_f32(float *out, const float *q, int64_t q_row_stride,
                                         const float *k_cache, const float *v_cache,
                                         int64_t block_size, const int64_t *tables,
                                         int64_t table_stride, int64_t num_heads,
                                         int64_t num_kv_heads, int64_t head_dim, float scale,
                                         const int64_t *starts, const int64_t *lens,
                                         const int64_t *ctx, int64_t num_seqs)
{
    if (block_size <= 0)
        return -1;
    const struct job a = {.q = q, .k = k_cache, .v = v_cache, .out = out,
                          .q_row_stride = q_row_stride, .H = num_heads, .KVH = num_kv_heads,
                          .D = head_dim, .scale = scale, .starts = starts, .lens = lens,
                          .ctx = ctx, .tables = tables, .table_stride = table_stride,
                          .block_size = block_size};
    return run(a, num_seqs);
}
