/* Exact greedy tokens from approximate (bfloat16) logits, on CPU.
 *
 * The caller computes approximate logits A = bf16(h) . bf16(W)^T with one bfloat16 GEMM (AMX or
 * AVX512-BF16: several times faster than the float32 LM head). With an error bound
 * e[j] = c * ||h|| * wnorm[j] + slack >= |A[j] - h . w_j| (llmserve/kernels/cpu_greedy.py
 * derives c), the argmax j* of the exact logits satisfies A[j*] + e[j*] >= max_k (A[k] - e[k]).
 * So only the few columns passing that test can win; each of them is scored exactly (float64
 * dot product of the float32 inputs) and the best one is the token.
 *
 * Built like paged_decode.c: -O3 -march=native -ffp-contract=fast -fopenmp (else
 * -fopenmp-simd), no -ffast-math. Rows are independent; large calls split them over torch's
 * OpenMP threads, each row computed exactly as on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Below this many logits a call stays on the calling thread. */
#define PARALLEL_MIN_ELEMENTS 262144
/* Columns tested per block of the portable list scan. */
#define SCAN_BLOCK 16
/* Longest short list of a row (see screen_row); a longer one sends the row to the caller. */
#define LIST_MAX 1024
/* Columns per block whose maximum the first pass keeps (AVX-512 version), and the largest
 * vocabulary the per-thread block array holds (16 KiB of stack). */
#define TOP_BLOCK 256
#define MAX_VOCAB (4096 * TOP_BLOCK)

static inline float bf16_to_f32(uint16_t v)
{
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 16 bfloat16 values as floats (exact: bfloat16 is float32 with the low 16 bits dropped). */
static inline __m512 load16(const uint16_t *p)
{
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m512 load_tail(const uint16_t *p, int64_t n)
{
    const __m256i part = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16));
    return _mm512_mask_blend_ps((__mmask16)((1u << n) - 1u), _mm512_set1_ps(-INFINITY), v);
}

/* max_j a[j] (n >= 1), and into block_top[b] the max of columns [b * TOP_BLOCK, ...). */
static float find_top(const uint16_t *restrict a, int64_t n, float *restrict block_top)
{
    float top = -INFINITY;
    for (int64_t b0 = 0; b0 < n; b0 += TOP_BLOCK) {
        const int64_t end = b0 + TOP_BLOCK < n ? b0 + TOP_BLOCK : n;
        __m512 best0 = _mm512_set1_ps(-INFINITY), best1 = best0; /* two: max has latency */
        int64_t j = b0;
        for (; j + 32 <= end; j += 32) {
            best0 = _mm512_max_ps(best0, load16(a + j));
            best1 = _mm512_max_ps(best1, load16(a + j + 16));
        }
        for (; j < end; j += 16)
            best0 = _mm512_max_ps(best0, j + 16 <= end ? load16(a + j) : load_tail(a + j, end - j));
        const float m = _mm512_reduce_max_ps(_mm512_max_ps(best0, best1));
        block_top[b0 / TOP_BLOCK] = m;
        top = m > top ? m : top;
    }
    return top;
}

/* The columns with a[j] >= cut, in order, into list; -1 when more than LIST_MAX. Only blocks
 * whose top reaches the cut are scanned. */
static int64_t list_above(const uint16_t *restrict a, int64_t n, float cut,
                          const float *restrict block_top, int64_t *restrict list)
{
    const __m512 threshold = _mm512_set1_ps(cut);
    int64_t listed = 0;
    for (int64_t b0 = 0; b0 < n; b0 += TOP_BLOCK) {
        if (!(block_top[b0 / TOP_BLOCK] >= cut))
            continue;
        const int64_t end = b0 + TOP_BLOCK < n ? b0 + TOP_BLOCK : n;
        for (int64_t j = b0; j < end; j += 16) {
            const __m512 v = j + 16 <= end ? load16(a + j) : load_tail(a + j, end - j);
            unsigned mask = _mm512_cmp_ps_mask(v, threshold, _CMP_GE_OQ);
            while (mask) {
                if (listed == LIST_MAX)
                    return -1;
                list[listed++] = j + __builtin_ctz(mask);
                mask &= mask - 1;
            }
        }
    }
    return listed;
}
#else
/* max_j a[j] (n >= 1); block_top is used by the AVX-512 version only. */
static float find_top(const uint16_t *restrict a, int64_t n, float *restrict block_top)
{
    (void)block_top;
    float best = -INFINITY;
#pragma omp simd reduction(max : best)
    for (int64_t j = 0; j < n; j++) {
        const float v = bf16_to_f32(a[j]);
        best = v > best ? v : best;
    }
    return best;
}

/* The columns with a[j] >= cut, in order, into list; -1 when more than LIST_MAX. */
static int64_t list_above(const uint16_t *restrict a, int64_t n, float cut,
                          const float *restrict block_top, int64_t *restrict list)
{
    (void)block_top;
    int64_t listed = 0;
    for (int64_t j0 = 0; j0 < n; j0 += SCAN_BLOCK) {
        const int64_t end = j0 + SCAN_BLOCK < n ? j0 + SCAN_BLOCK : n;
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t j = j0; j < end; j++)
            hit |= bf16_to_f32(a[j]) >= cut;
        if (!hit)
            continue;
        for (int64_t j = j0; j < end; j++)
            if (bf16_to_f32(a[j]) >= cut) {
                if (listed == LIST_MAX)
                    return -1;
                list[listed++] = j;
            }
    }
    return listed;
}
#endif

static double exact_logit(const float *restrict h, const float *restrict w, int64_t dim)
{
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < dim; i++)
        acc += (double)h[i] * (double)w[i];
    return acc;
}

/* The exact argmax of row h over the columns that can win, or -1 when the screen cannot decide
 * the row cheaply: a non-finite input or approximate logit, logits near float32's overflow, or
 * more than max_candidates candidates. The bound of column j is e[j] = c ||h|| wnorm[j] + slack.
 *
 * Two cheap passes first: the largest approximate logit m, then the columns with
 * a[j] >= m - 2E, E = c ||h|| max_wnorm + slack >= every e[j]. That short list holds every column
 * that matters: the one reaching floor = max_j (a[j] - e[j]) (it has a[j] >= m - E), and every
 * candidate (a[j] + e[j] >= floor >= m - E). Only the list is scored with the exact bounds.
 * The float32 rounding of this arithmetic (relative 2^-24 of values at most ~100x a bound) stays
 * far inside the 2^-10 margin that c carries. */
static int64_t screen_row(const uint16_t *restrict a, const float *restrict h,
                          const float *restrict weight, const float *restrict wnorm, double c,
                          float max_wnorm, float slack, int64_t vocab, int64_t dim,
                          int64_t max_candidates, int64_t *restrict list,
                          float *restrict block_top)
{
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < dim; i++)
        sq += (double)h[i] * (double)h[i];
    const double norm = sqrt(sq);
    /* |logit| <= ||h|| * ||w||: keep clear of float32 overflow, where the float32 logits the
     * fallback computes would be infinite and this path's float64 ones would not. */
    if (!(norm * (double)max_wnorm < 1e36))
        return -1;
    const float scale = nextafterf((float)(c * norm), INFINITY); /* rounded up */
    const float widest = nextafterf(scale * max_wnorm + slack, INFINITY);

    /* With finite inputs and |logits| < 1e36 (checked above) no approximate logit is inf or
     * NaN; the check below is a guard, not a case that arises. */
    const float top = find_top(a, vocab, block_top);
    if (!(top - top == 0.0f))
        return -1;
    const float cut = top - 2.0f * widest;
    const int64_t listed = list_above(a, vocab, cut, block_top, list);
    if (listed < 0)
        return -1;
    float floor_best = -INFINITY; /* max over columns of the lowest value each can have */
    for (int64_t i = 0; i < listed; i++) {
        const int64_t j = list[i];
        const float lowest = bf16_to_f32(a[j]) - (scale * wnorm[j] + slack);
        floor_best = lowest > floor_best ? lowest : floor_best;
    }
    int64_t best = -1, seen = 0;
    double best_value = 0.0;
    for (int64_t i = 0; i < listed; i++) { /* in column order: ties keep the first */
        const int64_t j = list[i];
        if (!(bf16_to_f32(a[j]) + (scale * wnorm[j] + slack) >= floor_best))
            continue;
        if (++seen > max_candidates)
            return -1;
        const double value = exact_logit(h, weight + j * dim, dim);
        if (best < 0 || value > best_value) { /* strict: the first of equal maxima */
            best = j;
            best_value = value;
        }
    }
    return best;
}

/* out[r] = the exact greedy token of row r, or -1 where the caller must score the full row;
 * returns the number of such rows.
 * approx: [rows, >= vocab] bfloat16 bits (row stride in elements); hidden: [rows, dim] float32
 * (row stride in floats); weight: [vocab, dim] float32 contiguous; wnorm[j] >= ||w_j||_2 and
 * max_wnorm >= every wnorm[j]; c * ||h_r|| * wnorm[j] + slack bounds |approx - exact| for row r,
 * column j. */
int64_t llmserve_screen_argmax_bf16(int64_t *out, const uint16_t *approx, int64_t a_stride,
                                    const float *hidden, int64_t h_stride,
                                    const float *weight, const float *wnorm, float max_wnorm,
                                    double c, float slack, int64_t rows, int64_t vocab,
                                    int64_t dim, int64_t max_candidates)
{
    if (vocab > MAX_VOCAB) { /* the caller scores every row */
        for (int64_t r = 0; r < rows; r++)
            out[r] = -1;
        return rows;
    }
    int64_t undecided = 0;
#pragma omp parallel for schedule(static) reduction(+ : undecided) \
    if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        int64_t list[LIST_MAX];
        float block_top[MAX_VOCAB / TOP_BLOCK];
        out[r] = screen_row(approx + r * a_stride, hidden + r * h_stride, weight, wnorm, c,
                            max_wnorm, slack, vocab, dim, max_candidates, list, block_top);
        undecided += out[r] < 0;
    }
    return undecided;
}
