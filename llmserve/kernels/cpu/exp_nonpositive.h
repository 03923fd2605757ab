/* Shared by the attention kernels (paged_decode.c, prefill_attention.c) and, for its
 * constants and polynomial, the SiLU of fused_ops.c. cpu_native.py puts
 * every header of this folder into a library's cache key, so editing one rebuilds them. */
#ifndef LLMSERVE_EXP_NONPOSITIVE_H
#define LLMSERVE_EXP_NONPOSITIVE_H

#include <stdint.h>
#include <string.h>

/* Cody-Waite constants and the Cephes polynomial, as macros so that the vector versions in the
 * kernels (GCC vector extensions take the same expressions) share them. */
#define EXP_ROUND 12582912.0f /* 1.5 * 2^23: adding it rounds x / ln2 to an integer */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_POLY(r)                                                                           \
    ((((((1.9875691500e-4f * (r) + 1.3981999507e-3f) * (r) + 8.3334519073e-3f) * (r) +         \
        4.1665795894e-2f) * (r) + 1.6666665459e-1f) * (r) + 5.0000001201e-1f) * (r) * (r) +  \
     (r) + 1.0f)

/* exp(x) for the x <= 0 of softmax (a score minus the running max), inlined so the loop over a
 * tile vectorises (the libm call was ~40% of the time). Cody-Waite reduction x = n ln2 + r with
 * |r| <= ln2/2 and the Cephes expf polynomial: within 2 ulp of expf; x below -87 is taken as -87
 * (e^-87 ~ 1.6e-38, nothing next to the tile's own maximum term of 1); NaN stays NaN. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    /* The rounded n lands in the low mantissa bits of `shifted`. */
    const float shifted = x * EXP_LOG2E + EXP_ROUND;
    const float n = shifted - EXP_ROUND;
    const float r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    const float p = EXP_POLY(r);
    uint32_t bits; /* 2^n, built from n's bits: n is in [-126, 0], or garbage for a NaN x */
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
