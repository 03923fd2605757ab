/* Paged decode attention on CPU, fp32: one query row per sequence, K and V read in place from
 * the paged cache through the block table (no gather into padded tensors), online softmax.
 *
 * Layouts are those of llmserve/kernels/ref.py:
 *   q:       row r, head j at q + r * q_row_stride + j * q_head_stride (head_dim contiguous)
 *   caches:  [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   table:   [num_seqs, table_width] int32 or int64 (table_elem_size 4 or 8), contiguous
 *   out:     [*, num_heads, head_dim] contiguous; sequence i writes row rows[i]
 * Query head j uses KV head j / group (as SDPA's enable_gqa), so each KV head's rows are read
 * once for all the query heads of its group.
 *
 * Built by llmserve/kernels/cpu_native.py with -O3 -march=native -ffp-contract=fast
 * -fopenmp (else -fopenmp-simd: one thread) and no -ffast-math: sums are reordered only where written so here (the vector
 * dot products, the `omp simd` reduction), and a * b + c may become one fused multiply-add.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpositive.h"

/* Tokens scored before each softmax update: one max, one expf and one rescale of the
 * accumulators per tile instead of per token. A tile spans several blocks. */
#define TILE 64

/* 8-float vectors (GCC/Clang vector extensions): AVX on x86, two NEON registers on arm64.
 * Written out rather than left to the auto-vectoriser, which reduces a dot product lane by lane
 * and keeps reloading the accumulator; head_dim % 8 leftovers take a scalar tail. 16-float
 * (AVX-512) vectors were tried and ran slower, in this kernel and on the whole decode step. */
#define VL 8
typedef float vec __attribute__((vector_size(VL * sizeof(float))));
#define NACC 8 /* accumulator vectors kept in registers */

static inline vec vload(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t))));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (ivec){__VA_ARGS__})
#endif

/* Lane j of the result is the sum of the VL lanes of p[j]: the VL vectors are transposed and
 * added together in a three-level shuffle tree (unpack, 64-bit unpack, 128-bit halves; written
 * for VL = 8), which costs less than one horizontal sum per row. */
static inline __attribute__((always_inline)) vec transpose_sum(const vec *p)
{
    vec a[VL / 2], b[VL / 4];
    for (int j = 0; j < VL / 2; j++)
        a[j] = SHUFFLE(p[2 * j], p[2 * j + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
               SHUFFLE(p[2 * j], p[2 * j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    for (int j = 0; j < VL / 4; j++)
        b[j] = SHUFFLE(a[2 * j], a[2 * j + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               SHUFFLE(a[2 * j], a[2 * j + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Dot products of a query with `rows` (at most VL) consecutive K rows, lane j for row j: each
 * row's products are summed in a vector, then the vectors are reduced by `transpose_sum`. */
static inline __attribute__((always_inline)) vec
dot_rows(const float *q, const float *k, int64_t stride, int64_t rows, int64_t D, int64_t DV)
{
    vec p[VL];
    float tail[VL] = {0};
    for (int64_t j = 0; j < VL; j++) {
        p[j] = (vec){0};
        if (j >= rows)
            continue; /* past the tile: never read, it may be past the cache */
        const float *kr = k + j * stride;
        for (int64_t d = 0; d < DV; d += VL)
            p[j] += vload(q + d) * vload(kr + d);
        for (int64_t d = DV; d < D; d++)
            tail[j] += q[d] * kr[d];
    }
    return transpose_sum(p) + vload(tail);
}

static inline int64_t table_entry(const void *table, int64_t elem_size, int64_t i)
{
    return elem_size == 8 ? ((const int64_t *)table)[i] : (int64_t)((const int32_t *)table)[i];
}

/* One sequence's paged context, seen from one KV head. */
struct context {
    const float *k_cache, *v_cache;
    int64_t num_blocks, block_size, num_kv_heads, kv_head;
    const void *table;
    int64_t table_elem_size, len;
    int64_t begin; /* first position attended: len - window under a sliding window, else 0 */
};

/* The tile of positions from `start` (at most TILE, up to the context's end) as runs of
 * consecutive rows within a block: seg_base[i] is the first float of run i (this KV head's row)
 * and seg_len[i] its length. Returns the tile's length, or -2 for a block id out of range. */
static inline int64_t tile_segments(const struct context *c, int64_t start, int64_t D,
                                    int64_t *seg_base, int64_t *seg_len, int64_t *nseg)
{
    int64_t n = 0;
    for (*nseg = 0; n < TILE && start + n < c->len; n += seg_len[(*nseg)++]) {
        const int64_t pos = start + n, offset = pos % c->block_size;
        const int64_t block = table_entry(c->table, c->table_elem_size, pos / c->block_size);
        if (block < 0 || block >= c->num_blocks)
            return -2;
        int64_t run = c->block_size - offset;
        run = run < TILE - n ? run : TILE - n;
        seg_len[*nseg] = run < c->len - pos ? run : c->len - pos;
        seg_base[*nseg] = ((block * c->block_size + offset) * c->num_kv_heads + c->kv_head) * D;
    }
    return n;
}

/* A tile's runs of consecutive rows (see `tile_segments`) and its length. */
struct tile {
    int64_t base[TILE], len[TILE], nseg, n;
};

/* Fills `t` with the tile from `start` and asks for its K and V rows ahead of use. A block is
 * its own run of rows (4 KB, one page, for 16 tokens of two KV heads at head_dim 32), where the
 * hardware prefetcher stops, so without this each block begins with a wait on memory. Callers
 * load the next tile before computing the current one. Measured on 2 threads, 64 sequences of
 * ~260 positions, 4 layers, caches cold: 3.9 -> 3.0 ms; whole decode steps of the small Qwen3
 * at 64 sequences, kernels alternated step by step in one run: 14.4 -> 13.6 ms. (Non-temporal
 * requests were slower, 17.1 ms: the next step reads the same context again.) Returns the
 * tile's length, or -2 for a block id out of range. */
static inline int64_t load_tile(const struct context *c, int64_t start, int64_t D, struct tile *t)
{
    t->n = tile_segments(c, start, D, t->base, t->len, &t->nseg);
    const int64_t tok_stride = c->num_kv_heads * D;
    for (int64_t i = 0; t->n > 0 && i < t->nseg; i++)
        for (int64_t j = 0; j < t->len[i]; j++)
            for (int64_t d = 0; d < D; d += 16) { /* one request per 64-byte line */
                __builtin_prefetch(c->k_cache + t->base[i] + j * tok_stride + d, 0, 3);
                __builtin_prefetch(c->v_cache + t->base[i] + j * tok_stride + d, 0, 3);
            }
    return t->n;
}

/* Online-softmax step of one query head over a tile's n scores: s[0..n) becomes
 * e^(s - m_new); the running maximum m and denominator l are updated. Returns the factor the
 * head's accumulator must be scaled by (0 on the first tile, where m = -inf). */
static inline float softmax_tile(float *restrict s, int64_t n, float *m, float *l)
{
    float tile_max = -INFINITY;
#pragma omp simd reduction(max : tile_max)
    for (int64_t t = 0; t < n; t++) /* fmaxf would be a libm call */
        tile_max = s[t] > tile_max ? s[t] : tile_max;
    const float m_new = tile_max > *m ? tile_max : *m;
    const float alpha = expf(*m - m_new);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        const float e = exp_nonpositive(s[t] - m_new);
        s[t] = e;
        sum += e;
    }
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

/* Softmax-weighted sum of the sequence's V rows for one KV head and its G query heads.
 * qs: [G, D] queries already multiplied by the scale; acc: [G, D] result (unnormalised);
 * l, m: [G] softmax denominators and running maxima; s: [G, TILE + VL] scratch. Returns 0, or
 * -2 when a block id is out of range. Inlined into one copy per common head_dim, so that loops
 * over D have constant trip counts: they unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) int
attend_kv_head(const struct context *c, const int64_t D, int64_t G, const float *restrict qs,
               float *restrict acc, float *restrict l, float *restrict m, float *restrict s)
{
    const int64_t tok_stride = c->num_kv_heads * D; /* between consecutive tokens of a block */
    const int64_t DV = D - D % VL;                   /* the part of a row in whole vectors */
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t d = 0; d < D; d++)
            acc[g * D + d] = 0.0f;
    }
    struct tile tiles[2]; /* the current tile and the next, loaded ahead */
    if (c->begin < c->len && load_tile(c, c->begin, D, &tiles[0]) < 0)
        return -2;
    for (int64_t start = c->begin, cur = 0; start < c->len; start += tiles[cur].n, cur ^= 1) {
        const int64_t *seg_base = tiles[cur].base, *seg_len = tiles[cur].len;
        const int64_t nseg = tiles[cur].nseg, n = tiles[cur].n;
        if (start + n < c->len && load_tile(c, start + n, D, &tiles[cur ^ 1]) < 0)
            return -2;
        /* Query heads one after another over the same tile, which stays in L1. */
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qs + g * D;
            float *sg = s + g * (TILE + VL), *ag = acc + g * D;
            for (int64_t i = 0, t = 0; i < nseg; t += seg_len[i++])
                for (int64_t j = 0; j < seg_len[i]; j += VL) /* may write VL - 1 past the run */
                    vstore(sg + t + j, dot_rows(qg, c->k_cache + seg_base[i] + j * tok_stride,
                                                tok_stride, seg_len[i] - j, D, DV));
            const float alpha = softmax_tile(sg, n, m + g, l + g);
            /* Up to NACC accumulator vectors stay in registers over the tile; wider rows take
             * several passes, and head_dim % VL leftovers a scalar one. */
            for (int64_t d0 = 0; d0 < DV; d0 += NACC * VL) {
                const int64_t nv = (DV - d0) / VL < NACC ? (DV - d0) / VL : NACC;
                vec a[NACC];
                for (int64_t k = 0; k < nv; k++)
                    a[k] = vload(ag + d0 + k * VL) * alpha;
                for (int64_t i = 0, t = 0; i < nseg; t += seg_len[i++]) {
                    const float *vr = c->v_cache + seg_base[i] + d0;
                    for (int64_t j = 0; j < seg_len[i]; j++)
                        for (int64_t k = 0; k < nv; k++)
                            a[k] += sg[t + j] * vload(vr + j * tok_stride + k * VL);
                }
                for (int64_t k = 0; k < nv; k++)
                    vstore(ag + d0 + k * VL, a[k]);
            }
            for (int64_t d = DV; d < D; d++) {
                float a = ag[d] * alpha;
                for (int64_t i = 0, t = 0; i < nseg; t += seg_len[i++])
                    for (int64_t j = 0; j < seg_len[i]; j++)
                        a += sg[t + j] * c->v_cache[seg_base[i] + j * tok_stride + d];
                ag[d] = a;
            }
        }
    }
    return 0;
}

/* Dot products of a query with VL consecutive K rows: `dot_rows` without its partial-vector
 * cases, so that the VL sums stay in registers (the general one spills them). D % VL == 0. */
static inline __attribute__((always_inline)) vec
dot_full_rows(const float *q, const float *k, int64_t stride, int64_t D)
{
    vec p[VL];
    for (int64_t j = 0; j < VL; j++) {
        vec sum = vload(q) * vload(k + j * stride);
        for (int64_t d = VL; d < D; d += VL)
            sum += vload(q + d) * vload(k + j * stride + d);
        p[j] = sum;
    }
    return transpose_sum(p);
}

/* Most accumulator vectors `attend_grouped` keeps in registers: G * D / VL of them. */
#define GROUP_ACC 16

/* `attend_kv_head` for D % VL == 0 and G * D / VL <= GROUP_ACC, with D and G compile-time
 * constants: the softmax weights of the tile are computed for every query head first, then one
 * pass over the tile's V rows updates all G heads, each V row loaded once instead of G times,
 * with G * D / VL independent multiply-add chains (the per-head pass has D / VL). Measured on
 * one thread at head_dim 32 and 4 query heads per KV head, 264 positions: 19 -> 12 ns per
 * (sequence, KV head, position) with the context in cache, 28 -> 21 ns with 64 sequences' (from
 * memory). Same arithmetic per head as `attend_kv_head` apart from the order of the sums. */
static inline __attribute__((always_inline)) int
attend_grouped(const struct context *c, const int64_t D, const int64_t G, const float *restrict qs,
               float *restrict out, float *restrict l, float *restrict m, float *restrict s)
{
    const int64_t tok_stride = c->num_kv_heads * D, NV = D / VL;
    vec acc[GROUP_ACC];
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t k = 0; k < NV; k++)
            acc[g * NV + k] = (vec){0};
    }
    struct tile tiles[2]; /* the current tile and the next, loaded ahead */
    if (c->begin < c->len && load_tile(c, c->begin, D, &tiles[0]) < 0)
        return -2;
    for (int64_t start = c->begin, cur = 0; start < c->len; start += tiles[cur].n, cur ^= 1) {
        const int64_t *seg_base = tiles[cur].base, *seg_len = tiles[cur].len;
        const int64_t nseg = tiles[cur].nseg, n = tiles[cur].n;
        if (start + n < c->len && load_tile(c, start + n, D, &tiles[cur ^ 1]) < 0)
            return -2;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qs + g * D;
            float *sg = s + g * (TILE + VL);
            for (int64_t i = 0, t = 0; i < nseg; t += seg_len[i++]) {
                const float *kr = c->k_cache + seg_base[i];
                int64_t j = 0;
                for (; j + VL <= seg_len[i]; j += VL)
                    vstore(sg + t + j, dot_full_rows(qg, kr + j * tok_stride, tok_stride, D));
                if (j < seg_len[i]) /* may write VL - 1 past the run */
                    vstore(sg + t + j, dot_rows(qg, kr + j * tok_stride, tok_stride,
                                                seg_len[i] - j, D, D));
            }
            const float alpha = softmax_tile(sg, n, m + g, l + g);
            for (int64_t k = 0; k < NV; k++)
                acc[g * NV + k] *= alpha;
        }
        for (int64_t i = 0, t = 0; i < nseg; t += seg_len[i++]) {
            const float *vr = c->v_cache + seg_base[i];
            for (int64_t j = 0; j < seg_len[i]; j++) {
                vec v[GROUP_ACC];
                for (int64_t k = 0; k < NV; k++)
                    v[k] = vload(vr + j * tok_stride + k * VL);
                for (int64_t g = 0; g < G; g++) {
                    const float p = s[g * (TILE + VL) + t + j];
                    for (int64_t k = 0; k < NV; k++)
                        acc[g * NV + k] += p * v[k];
                }
            }
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t k = 0; k < NV; k++)
            vstore(out + g * D + k * VL, acc[g * NV + k]);
    return 0;
}

/* One copy per (head_dim, query heads per KV head) pair that `attend_grouped` takes. */
#define ATTEND_GROUPED(DIM, GROUP)                                                            \
    static int attend_d##DIM##_g##GROUP(const struct context *c, const float *qs, float *acc, \
                                        float *l, float *m, float *s)                         \
    {                                                                                         \
        return attend_grouped(c, DIM, GROUP, qs, acc, l, m, s);                               \
    }
ATTEND_GROUPED(32, 1)
ATTEND_GROUPED(32, 2)
ATTEND_GROUPED(32, 4)
ATTEND_GROUPED(64, 1)
ATTEND_GROUPED(64, 2)
ATTEND_GROUPED(128, 1)

/* The `attend_grouped` copy for (D, G), or NULL. */
static int (*grouped_for(int64_t D, int64_t G))(const struct context *, const float *, float *,
                                                 float *, float *, float *)
{
#define PICK(DIM, GROUP)                                                                      \
    if (D == DIM && G == GROUP)                                                               \
        return attend_d##DIM##_g##GROUP;
    PICK(32, 1) PICK(32, 2) PICK(32, 4) PICK(64, 1) PICK(64, 2) PICK(128, 1)
#undef PICK
    return NULL;
}

#define ATTEND_FIXED_D(DIM)                                                                   \
    static int attend_d##DIM(const struct context *c, int64_t G, const float *qs, float *acc, \
                             float *l, float *m, float *s)                                    \
    {                                                                                         \
        return attend_kv_head(c, DIM, G, qs, acc, l, m, s);                                   \
    }
ATTEND_FIXED_D(32)
ATTEND_FIXED_D(64)
ATTEND_FIXED_D(128)

static int attend_any_d(const struct context *c, int64_t D, int64_t G, const float *qs,
                        float *acc, float *l, float *m, float *s)
{
    int (*grouped)(const struct context *, const float *, float *, float *, float *, float *) =
        grouped_for(D, G);
    if (grouped)
        return grouped(c, qs, acc, l, m, s);
    switch (D) {
    case 32:
        return attend_d32(c, G, qs, acc, l, m, s);
    case 64:
        return attend_d64(c, G, qs, acc, l, m, s);
    case 128:
        return attend_d128(c, G, qs, acc, l, m, s);
    default:
        return attend_kv_head(c, D, G, qs, acc, l, m, s);
    }
}

/* Everything one (sequence, KV head) item needs besides its scratch. */
struct decode_args {
    float *out;
    const float *q, *k_cache, *v_cache;
    int64_t q_row_stride, q_head_stride, num_blocks, block_size, num_heads, num_kv_heads, D, G;
    float scale;
    const void *block_tables;
    int64_t table_elem_size, table_width, window;
    const int64_t *seq_lens, *rows;
};

/* Attend item `item` = sequence item / num_kv_heads, KV head item % num_kv_heads, and write its
 * G output heads. buf: this thread's scratch of G * (2D + TILE + VL + 2) floats. */
static int decode_item(const struct decode_args *a, int64_t item, float *buf)
{
    const int64_t G = a->G, D = a->D, i = item / a->num_kv_heads;
    float *qs = buf, *acc = qs + G * D, *l = acc + G * D, *m = l + G, *s = m + G;
    struct context c = {a->k_cache, a->v_cache, a->num_blocks, a->block_size, a->num_kv_heads,
                        item % a->num_kv_heads,
                        (const char *)a->block_tables + i * a->table_width * a->table_elem_size,
                        a->table_elem_size, a->seq_lens[i], 0};
    if (a->window > 0 && c.len > a->window)
        c.begin = c.len - a->window;
    const float *qr = a->q + a->rows[i] * a->q_row_stride + c.kv_head * G * a->q_head_stride;
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++)
            qs[g * D + d] = qr[g * a->q_head_stride + d] * a->scale;
    const int status = attend_any_d(&c, D, G, qs, acc, l, m, s);
    float *o = a->out + (a->rows[i] * a->num_heads + c.kv_head * G) * D;
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++)
            o[g * D + d] = acc[g * D + d] / l[g];
    return status;
}

/* Below this many attended (position, KV head) pairs a step runs on the calling thread: waking
 * the other threads costs more than they save (one item is a few microseconds at most). */
#define PARALLEL_MIN_WORK 16384

/* Items run on the caller's OpenMP threads when the library is built with -fopenmp: it then
 * links the libgomp that torch has already loaded, so they are torch's own intra-op threads
 * (the count follows torch.set_num_threads) and never a second pool competing for the cores.
 * Each item is computed by one thread exactly as in the serial loop: results do not depend on
 * the thread count. */
static int decode_items(const struct decode_args *a, int64_t items, int64_t work)
{
    const size_t scratch = sizeof(float) * (size_t)(a->G * (2 * a->D + TILE + VL + 2));
    int status = 0;
#pragma omp parallel if (work >= PARALLEL_MIN_WORK) reduction(min : status)
    {
        float *buf = malloc(scratch);
        if (buf == NULL)
            status = -3;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (buf == NULL)
                continue;
            const int st = decode_item(a, item, buf);
            status = st < status ? st : status;
        }
        free(buf);
    }
    return status;
}

/* Returns 0, -1 (a seq_len below 1 or beyond its table row), -2 (a block id out of range) or
 * -3 (out of memory); when several occur, the lowest. window > 0 limits each row to its last
 * `window` positions (a sliding window): table entries before them are never read, so they may
 * be released (-1). */
int llmserve_paged_decode_f32(float *out, const float *q, int64_t q_row_stride,
                              int64_t q_head_stride, const float *k_cache, const float *v_cache,
                              int64_t num_blocks, int64_t block_size, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, float scale,
                              const void *block_tables, int64_t table_elem_size,
                              int64_t table_width, const int64_t *seq_lens, const int64_t *rows,
                              int64_t num_seqs, int64_t window)
{
    int64_t work = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = seq_lens[i];
        if (len < 1 || (len + block_size - 1) / block_size > table_width)
            return -1;
        work += window > 0 && len > window ? window : len;
    }
    const struct decode_args a = {out, q, k_cache, v_cache, q_row_stride, q_head_stride,
                                  num_blocks, block_size, num_heads, num_kv_heads, head_dim,
                                  num_heads / num_kv_heads, scale, block_tables, table_elem_size,
                                  table_width, window, seq_lens, rows};
    return decode_items(&a, num_seqs * num_kv_heads, work * num_kv_heads);
}
