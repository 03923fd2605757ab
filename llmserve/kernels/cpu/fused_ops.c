/* Fused element-wise ops of a decoder layer on CPU, fp32: the small ops between the matmuls.
 *
 * In eager PyTorch each of these is several ops (an RMSNorm alone is six), and at decode sizes
 * every op costs more in framework dispatch than in arithmetic. Here each is one pass over the
 * rows, called once per layer through ctypes by llmserve/kernels/cpu_fused.py.
 *
 * Built like paged_decode.c: -O3 -march=native -ffp-contract=fast -fopenmp (else -fopenmp-simd),
 * no -ffast-math, so sums are reordered only where the source says so (the `omp simd`
 * reductions) and a * b + c may become one fused multiply-add. Results match the torch ops to
 * float rounding. Rows are independent: large calls (prefill) split them over torch's OpenMP
 * threads, each row computed exactly as on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpositive.h"

/* Below this many elements a call stays on the calling thread (decode sizes): waking the other
 * threads costs microseconds, more than they would save. */
#define PARALLEL_MIN_ELEMENTS 65536

/* h = x + residual (stored into `sum`, which may alias either input) when residual is not NULL,
 * else h = x; out = h * rsqrt(mean(h^2) + eps) * weight. Row strides in floats; `dim` contiguous.
 * The mean is taken in float32, as torch's and Hugging Face's RMSNorm do for float32 inputs. */
void llmserve_add_rms_norm_f32(float *out, int64_t out_stride, float *sum, int64_t sum_stride,
                               const float *x, int64_t x_stride, const float *residual,
                               int64_t res_stride, const float *weight, int64_t rows, int64_t dim,
                               float eps)
{
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        const float *h = xr;
        if (residual) {
            float *sr = sum + r * sum_stride;
            const float *rr = residual + r * res_stride;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++)
                sr[i] = xr[i] + rr[i];
            h = sr;
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++)
            ss += h[i] * h[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        float *o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++)
            o[i] = weight[i] * (h[i] * inv);
    }
}

/* One head in place: optional per-head RMSNorm (weight not NULL), then neox rotary with the
 * cos (first half) and sin (second half) of this token's cache row. */
static inline void norm_rope_head(float *restrict x, const float *restrict weight, float eps,
                                  const float *restrict cs, int64_t D)
{
    if (weight) {
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; i++)
            ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int64_t i = 0; i < D; i++)
            x[i] = weight[i] * (x[i] * inv);
    }
    const int64_t half = D / 2;
    const float *cos = cs, *sin = cs + half;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/* q/k norm (when the weights are given) and rotary of the q and k heads of a fused qkv output,
 * in place. Row t holds num_heads q heads then num_kv_heads k heads, each head_dim wide, from
 * qkv + t * row_stride. cos_sin: [max_position, head_dim] (cos | sin halves). Returns 0, or -1
 * when a position is outside the cache (then nothing is written). */
int llmserve_qk_norm_rope_f32(float *qkv, int64_t row_stride, int64_t rows, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, const float *q_weight,
                              const float *k_weight, float eps, const float *cos_sin,
                              int64_t max_position, const int64_t *positions)
{
    for (int64_t t = 0; t < rows; t++)
        if (positions[t] < 0 || positions[t] >= max_position)
            return -1;
    const int64_t elements = rows * (num_heads + num_kv_heads) * head_dim;
#pragma omp parallel for schedule(static) if (elements >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *cs = cos_sin + positions[t] * head_dim;
        float *row = qkv + t * row_stride;
        for (int64_t h = 0; h < num_heads; h++)
            norm_rope_head(row + h * head_dim, q_weight, eps, cs, head_dim);
        for (int64_t h = 0; h < num_kv_heads; h++)
            norm_rope_head(row + (num_heads + h) * head_dim, k_weight, eps, cs, head_dim);
    }
    return 0;
}

/* e^x over the whole float range, vectorisable: Cody-Waite reduction x = n ln2 + r and the
 * Cephes expf polynomial (within 2 ulp of expf). x is clamped to [-87.3, 88.7]: e^x then stays
 * a normal float (underflow gives ~1e-38, not 0; overflow saturates at ~3.3e38, not inf). The
 * two ends only matter to SiLU as g / (1 + e^-g), which is then -0-ish or g, as it should be. */
static inline float exp_clamped(float x)
{
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    /* The rounded n lands in the low mantissa bits of `shifted`. */
    const float shifted = x * EXP_LOG2E + EXP_ROUND;
    const float n = shifted - EXP_ROUND;
    const float r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    const float p = EXP_POLY(r);
    /* 2^n in two factors, so that n = 128 (x near 88.7) does not overflow the exponent field. */
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    const int32_t ni = (int32_t)(bits - 0x4B400000u);
    uint32_t b1 = (uint32_t)(ni / 2 + 127) << 23, b2 = (uint32_t)(ni - ni / 2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* out[r] = silu(x[r, :d]) * x[r, d:2d]: SiLU of the gate half times the up half of a fused
 * gate/up projection. x row stride in floats; out is [rows, d] contiguous. */
void llmserve_silu_and_mul_f32(float *out, const float *x, int64_t x_stride, int64_t rows,
                               int64_t d)
{
#pragma omp parallel for schedule(static) if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * x_stride, *up = gate + d;
        float *o = out + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++)
            o[i] = gate[i] / (1.0f + exp_clamped(-gate[i])) * up[i];
    }
}

/* Lanes of the argmax scan: one AVX-512 register of floats, two of AVX2. */
#define ARGMAX_LANES 16

/* First index of the largest value of x[0..n), n >= 1, as torch.max(dim) finds it: among equal
 * maxima the first, and a NaN counts as larger than everything (the first NaN wins). */
static int64_t argmax_row(const float *restrict x, int64_t n)
{
    float best[ARGMAX_LANES];
    int32_t at[ARGMAX_LANES];
    int nan = 0;
    int64_t i = 0;
    if (n >= ARGMAX_LANES) {
        for (int j = 0; j < ARGMAX_LANES; j++) {
            best[j] = x[j];
            at[j] = j;
            nan |= x[j] != x[j];
        }
        /* Each lane keeps the first index of its own maximum (a strict > never moves it to a
         * later equal value); lanes are merged below. */
        for (i = ARGMAX_LANES; i + ARGMAX_LANES <= n; i += ARGMAX_LANES) {
#pragma omp simd reduction(| : nan)
            for (int j = 0; j < ARGMAX_LANES; j++) {
                const float v = x[i + j];
                const int gt = v > best[j];
                best[j] = gt ? v : best[j];
                at[j] = gt ? (int32_t)(i + j) : at[j];
                nan |= v != v;
            }
        }
    }
    float m = 0.0f;
    int64_t arg = -1;
    if (i > 0)
        for (int j = 0; j < ARGMAX_LANES; j++)
            if (arg < 0 || best[j] > m || (best[j] == m && at[j] < arg)) {
                m = best[j];
                arg = at[j];
            }
    for (; i < n; i++) { /* the tail, in order: a later equal value never wins */
        nan |= x[i] != x[i];
        if (arg < 0 || x[i] > m) {
            m = x[i];
            arg = i;
        }
    }
    if (nan)
        for (int64_t k = 0; k < n; k++)
            if (x[k] != x[k])
                return k;
    return arg;
}

/* out[r] = argmax of row r of x ([rows, n], row stride in floats), int64 as torch returns it.
 * n must be below 2^31. Large calls split the rows over torch's OpenMP threads. */
void llmserve_argmax_rows_f32(int64_t *out, const float *x, int64_t x_stride, int64_t rows,
                              int64_t n)
{
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        out[r] = argmax_row(x + r * x_stride, n);
}

/* This step's keys and values into the paged cache: row r of k and v (each `width` floats =
 * kv_heads * head_dim, row strides in floats) goes to slot slots[r] of k_cache and v_cache
 * ([num_slots, width] contiguous). Returns 0, or -1 when a slot is outside the cache (then
 * nothing is written). One call for what torch does in two index_copy_ calls per layer. */
int llmserve_store_kv_f32(float *k_cache, float *v_cache, int64_t num_slots, const float *k,
                          int64_t k_stride, const float *v, int64_t v_stride, int64_t rows,
                          int64_t width, const int64_t *slots)
{
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots)
            return -1;
    for (int64_t r = 0; r < rows; r++) {
        memcpy(k_cache + slots[r] * width, k + r * k_stride, sizeof(float) * (size_t)width);
        memcpy(v_cache + slots[r] * width, v + r * v_stride, sizeof(float) * (size_t)width);
    }
    return 0;
}
