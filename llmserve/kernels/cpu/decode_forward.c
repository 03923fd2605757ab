/* A whole decode step of a Llama-family decoder (fp32, CPU) in one call from Python.
 *
 * At decode sizes the per-op cost of driving a layer from Python (a few dozen ctypes and torch
 * calls, each several microseconds, with the interpreter's own data evicted from cache by the
 * weight streams in between) was about as long as the arithmetic: one sequence of the small
 * Qwen3 spent ~0.9 ms of a 1.4 ms forward outside the GEMMs and the attention kernel. This
 * driver walks the layers in C and calls the very same kernels the Python walk calls, in the same
 * order, on the same buffers, so its results are bit-for-bit those of that walk:
 *
 *   - the element-wise ops of fused_ops.c and the attention of paged_decode.c, through function
 *     pointers (each stays in its own library, built and cached as before);
 *   - MKL's GEMMs as torch's F.linear reaches them (`sgemm_`, column-major, the weight
 *     transposed) or, from `min_packed_rows` to `max_packed_rows` rows, MKL's packed copy
 *     (`cblas_sgemm_compute`), as llmserve/kernels/cpu_packed_gemm.py chooses.
 *
 * The same driver runs the row-parallel parts of prefill layers (`llmserve_rows_qkv_f32`,
 * `llmserve_rows_post_attention_f32`, at the end of this file).
 *
 * Returns 0 or a negative status (see `decode_forward.py`); the Python side raises the same errors
 * the per-op walk raises.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*norm_fn)(float *out, int64_t out_stride, float *sum, int64_t sum_stride,
                        const float *x, int64_t x_stride, const float *residual,
                        int64_t res_stride, const float *weight, int64_t rows, int64_t dim,
                        float eps);
typedef int (*rope_fn)(float *qkv, int64_t row_stride, int64_t rows, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, const float *q_weight,
                       const float *k_weight, float eps, const float *cos_sin,
                       int64_t max_position, const int64_t *positions);
typedef void (*silu_fn)(float *out, const float *x, int64_t x_stride, int64_t rows, int64_t d);
typedef int (*store_fn)(float *k_cache, float *v_cache, int64_t num_slots, const float *k,
                        int64_t k_stride, const float *v, int64_t v_stride, int64_t rows,
                        int64_t width, const int64_t *slots);
typedef int (*attend_fn)(float *out, const float *q, int64_t q_row_stride, int64_t q_head_stride,
                         const float *k_cache, const float *v_cache, int64_t num_blocks,
                         int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, float scale, const void *block_tables,
                         int64_t table_elem_size, int64_t table_width, const int64_t *seq_lens,
                         const int64_t *rows, int64_t num_seqs, int64_t window);
/* Fortran BLAS: every argument by reference. */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n,
                         const int *k, const float *alpha, const float *a, const int *lda,
                         const float *b, const int *ldb, const float *beta, float *c,
                         const int *ldc);
typedef void (*sgemm_compute_fn)(int layout, int transa, int transb, int m, int n, int k,
                                 const float *a, int lda, const float *b, int ldb, float beta,
                                 float *c, int ldc);

#define CBLAS_ROW_MAJOR 101
#define CBLAS_NO_TRANS 111
#define CBLAS_PACKED 151

/* One linear layer: y = x W^T (+ bias). `packed` is MKL's packed copy of W, or NULL. */
struct linear {
    const float *weight; /* [n, k] row-major */
    const float *packed;
    const float *bias; /* [n] or NULL */
    int64_t n, k;
};

struct layer {
    const float *in_norm, *post_norm;
    const float *q_norm, *k_norm; /* NULL: no q/k norm (Llama, Mistral, Qwen2) */
    const float *cos_sin;         /* [max_position, head_dim] */
    int64_t max_position;
    float *k_cache, *v_cache; /* [num_blocks, block_size, kv_heads, head_dim] contiguous */
    int64_t window;           /* sliding window, 0 = full attention */
    float scale;
    struct linear qkv, o, gate_up, down;
};

struct model {
    norm_fn norm;
    rope_fn rope;
    silu_fn silu_and_mul;
    store_fn store;
    attend_fn attend;
    sgemm_fn sgemm;
    sgemm_compute_fn sgemm_compute; /* NULL when nothing is packed */
    const float *embed;              /* [vocab, hidden] */
    const float *final_norm;
    const struct layer *layers;
    int64_t num_layers, vocab, hidden, heads, kv_heads, head_dim;
    int64_t num_blocks, block_size;
    int64_t min_packed_rows, max_packed_rows;
    float eps;
};

/* This step: `rows` decode rows, row i of sequence i. */
struct step {
    int64_t rows;
    const int64_t *input_ids, *positions, *slots; /* [rows] */
    const void *block_tables;                      /* [rows, table_width] int32 or int64 */
    int64_t table_elem_size, table_width;
    const int64_t *seq_lens, *row_index; /* [rows]; row_index[i] = i */
    float *scratch;                      /* see `scratch_floats` in decode_forward.py */
    float *out;                          /* [rows, hidden]: the final normed hidden states */
    /* > 0: the parts of each layer around attention run as the prefill rows calls do, each
     * thread taking chunks of this many rows through them (the same bits); 0: op by op. */
    int64_t chunk;
};

enum {
    BAD_TOKEN = -10,   /* an input id outside the embedding */
    BAD_POSITION = -11 /* a position outside the rotary cache */,
    BAD_SLOT = -12,    /* a slot outside the KV cache */
    NO_MEMORY = -13,   /* scratch could not be allocated */
    /* the attention kernel's own statuses (-1..-3) pass through unchanged */
};

/* y = x W^T (+ bias) through MKL's packed copy when `packed` (and there is one), else as
 * F.linear calls MKL. */
static void linear_as(const struct model *m, const struct linear *l, const float *x, int64_t ldx,
                      int64_t rows, float *y, int packed)
{
    float beta = 0.0f;
    if (l->bias) { /* y = bias + x W^T, y starting as the bias, as torch's addmm does */
        for (int64_t r = 0; r < rows; r++)
            memcpy(y + r * l->n, l->bias, sizeof(float) * (size_t)l->n);
        beta = 1.0f;
    }
    if (packed && l->packed && m->sgemm_compute) {
        m->sgemm_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, (int)rows, (int)l->n,
                         (int)l->k, x, (int)ldx, l->packed, (int)l->n, beta, y, (int)l->n);
        return;
    }
    /* Row-major y[rows, n] = x W^T is column-major y^T = W x^T: W (k x n, column-major) is
     * transposed, x (k x rows) is not; the call torch makes for F.linear. */
    const int n = (int)l->n, r = (int)rows, k = (int)l->k, lda = (int)l->k, ldb = (int)ldx;
    const float one = 1.0f;
    m->sgemm("T", "N", &n, &r, &k, &one, l->weight, &lda, x, &ldb, &beta, y, &n);
}

/* The GEMM `cpu_packed_gemm.linear` chooses for `rows` rows. */
static void linear(const struct model *m, const struct linear *l, const float *x, int64_t ldx,
                   int64_t rows, float *y)
{
    linear_as(m, l, x, ldx, rows, y, rows >= m->min_packed_rows && rows <= m->max_packed_rows);
}

/* The widest fused gate/up output of the model's layers. */
static int64_t max_inter(const struct model *m)
{
    int64_t inter = 0;
    for (int64_t i = 0; i < m->num_layers; i++)
        inter = m->layers[i].gate_up.n > inter ? m->layers[i].gate_up.n : inter;
    return inter;
}

int llmserve_rows_qkv_f32(const struct model *m, int64_t li, const float *hidden, float *residual,
                          const int64_t *positions, int64_t rows, int64_t chunk, float *qkv);
int llmserve_rows_post_attention_f32(const struct model *m, int64_t li, const float *attn,
                                     float *residual, int64_t rows, int64_t chunk, float *out);

int llmserve_decode_forward_f32(const struct model *m, const struct step *s)
{
    const int64_t R = s->rows, H = m->hidden, D = m->head_dim;
    const int64_t q_size = m->heads * D, kv_size = m->kv_heads * D;
    const int64_t qkv_width = q_size + 2 * kv_size, inter = max_inter(m);
    /* Scratch: residual, h, qkv, attention output, the layer's MLP output, gate/up, act. */
    float *residual = s->scratch, *h = residual + R * H, *qkv = h + R * H;
    float *attn = qkv + R * qkv_width, *hidden = attn + R * q_size, *gate_up = hidden + R * H;
    float *act = gate_up + R * inter;

    for (int64_t r = 0; r < R; r++) {
        const int64_t id = s->input_ids[r];
        if (id < 0 || id >= m->vocab)
            return BAD_TOKEN;
        memcpy(residual + r * H, m->embed + id * H, sizeof(float) * (size_t)H);
    }
    const int64_t num_slots = m->num_blocks * m->block_size;
    for (int64_t r = 0; r < R; r++)
        if (s->slots[r] < 0 || s->slots[r] >= num_slots)
            return BAD_SLOT;

    for (int64_t i = 0; i < m->num_layers; i++) {
        const struct layer *L = &m->layers[i];
        if (s->chunk > 0) {
            const int status = llmserve_rows_qkv_f32(m, i, i == 0 ? NULL : hidden, residual,
                                                     s->positions, R, s->chunk, qkv);
            if (status)
                return status;
        } else {
            if (i == 0)
                m->norm(h, H, NULL, 0, residual, H, NULL, 0, L->in_norm, R, H, m->eps);
            else
                m->norm(h, H, residual, H, hidden, H, residual, H, L->in_norm, R, H, m->eps);
            linear(m, &L->qkv, h, H, R, qkv);
            if (m->rope(qkv, qkv_width, R, m->heads, m->kv_heads, D, L->q_norm, L->k_norm,
                        m->eps, L->cos_sin, L->max_position, s->positions))
                return BAD_POSITION;
        }
        if (m->store(L->k_cache, L->v_cache, num_slots, qkv + q_size, qkv_width,
                     qkv + q_size + kv_size, qkv_width, R, kv_size, s->slots))
            return BAD_SLOT;
        const int status = m->attend(attn, qkv, qkv_width, D, L->k_cache, L->v_cache, m->num_blocks,
                                     m->block_size, m->heads, m->kv_heads, D, L->scale,
                                     s->block_tables, s->table_elem_size, s->table_width,
                                     s->seq_lens, s->row_index, R, L->window);
        if (status)
            return status;
        if (s->chunk > 0) {
            const int rows_status = llmserve_rows_post_attention_f32(m, i, attn, residual, R,
                                                                     s->chunk, hidden);
            if (rows_status)
                return rows_status;
            continue;
        }
        linear(m, &L->o, attn, q_size, R, hidden);
        m->norm(h, H, residual, H, hidden, H, residual, H, L->post_norm, R, H, m->eps);
        linear(m, &L->gate_up, h, H, R, gate_up);
        const int64_t half = L->gate_up.n / 2;
        m->silu_and_mul(act, gate_up, L->gate_up.n, R, half);
        linear(m, &L->down, act, half, R, hidden);
    }
    m->norm(s->out, H, residual, H, hidden, H, residual, H, m->final_norm, R, H, m->eps);
    return 0;
}

/* ---- Row-parallel parts of a prefill layer ----
 *
 * A prefill step's layer is, apart from attention, a chain of ops over independent rows: the
 * input norm, the qkv GEMM and q/k norm + rotary before attention; o_proj, the post-attention
 * norm, gate/up, SiLU and down after it. Called op by op (each op split over the threads, MKL
 * threading each GEMM), every op ends in a barrier and passes its output to the next through
 * memory shared by both cores. Here each thread takes chunks of `chunk` rows and runs the whole
 * chain on a chunk alone (MKL runs sequentially inside the parallel region, and the fused ops'
 * own parallel loops stay on the calling thread), so a chunk's intermediates stay in that core's
 * cache and the threads meet once per call. Each row goes through the same ops as in the
 * op-by-op walk, on rows of the same width; the GEMMs take MKL's packed copy for every chunk
 * (whatever its rows) when the call has `min_packed_rows` or more, as the walk's slices do, so
 * a row's bits do not depend on the chunk it falls in. */

/* qkv[rows, qkv width] of layer `li`: q/k norm and rotary applied to the qkv projection of
 * norm(hidden + residual) (the sum stored into residual), or of norm(residual) when hidden is
 * NULL (the first layer). Row-major contiguous rows; positions int64 [rows]. */
int llmserve_rows_qkv_f32(const struct model *m, int64_t li, const float *hidden, float *residual,
                          const int64_t *positions, int64_t rows, int64_t chunk, float *qkv)
{
    const struct layer *L = &m->layers[li];
    const int64_t H = m->hidden, D = m->head_dim, width = L->qkv.n;
    const int packed = rows >= m->min_packed_rows;
    int status = 0;
#pragma omp parallel reduction(min : status)
    {
        float *h = malloc(sizeof(float) * (size_t)(chunk * H));
        if (h == NULL)
            status = NO_MEMORY;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < rows; c += chunk) {
            const int64_t n = rows - c < chunk ? rows - c : chunk;
            if (h == NULL)
                continue;
            float *res = residual + c * H, *y = qkv + c * width;
            if (hidden == NULL)
                m->norm(h, H, NULL, 0, res, H, NULL, 0, L->in_norm, n, H, m->eps);
            else
                m->norm(h, H, res, H, hidden + c * H, H, res, H, L->in_norm, n, H, m->eps);
            linear_as(m, &L->qkv, h, H, n, y, packed);
            if (m->rope(y, width, n, m->heads, m->kv_heads, D, L->q_norm, L->k_norm, m->eps,
                        L->cos_sin, L->max_position, positions + c))
                status = BAD_POSITION;
        }
        free(h);
    }
    return status;
}

/* out[rows, hidden] = down(SiLU(gate) * up) of norm(o_proj(attn) + residual) for layer `li`,
 * the sum stored into residual; attn is [rows, heads * head_dim]. Contiguous rows. */
int llmserve_rows_post_attention_f32(const struct model *m, int64_t li, const float *attn,
                                     float *residual, int64_t rows, int64_t chunk, float *out)
{
    const struct layer *L = &m->layers[li];
    const int64_t H = m->hidden, q_size = m->heads * m->head_dim, inter = max_inter(m);
    const int packed = rows >= m->min_packed_rows;
    int status = 0;
#pragma omp parallel reduction(min : status)
    {
        float *h = malloc(sizeof(float) * (size_t)(chunk * (H + inter + inter / 2)));
        if (h == NULL)
            status = NO_MEMORY;
        float *gate_up = h + chunk * H, *act = gate_up + chunk * inter;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < rows; c += chunk) {
            const int64_t n = rows - c < chunk ? rows - c : chunk;
            if (h == NULL)
                continue;
            float *res = residual + c * H, *y = out + c * H;
            linear_as(m, &L->o, attn + c * q_size, q_size, n, y, packed);
            m->norm(h, H, res, H, y, H, res, H, L->post_norm, n, H, m->eps);
            linear_as(m, &L->gate_up, h, H, n, gate_up, packed);
            const int64_t half = L->gate_up.n / 2;
            m->silu_and_mul(act, gate_up, L->gate_up.n, n, half);
            linear_as(m, &L->down, act, half, n, y, packed);
        }
        free(h);
    }
    return status;
}
