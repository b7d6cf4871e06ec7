/* The small per-layer kernels of a bf16 decoder step, fused: see pipeline/engines/fused.py.
 *
 * bf16 values travel as uint16_t; every kernel computes in fp32 and rounds to bf16 (round to nearest even) exactly
 * where transformers' eager Llama code rounds, and RMSNorm sums its squares in the order torch's sum kernel does, so
 * all three give its bits. Plain C (no torch headers: builds in about a second), single-threaded, rows independent
 * of each other. Built with -ffp-contract=off so that no multiply-add is fused behind the code's back.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf2f(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u; /* NaN stays NaN */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* sum(x^2) over a row, in the order torch's CPU sum kernel adds (aten/src/ATen/native/cpu/SumKernel.cpp,
 * vectorized_inner_sum -> row_sum -> multi_row_sum), so the norm's variance has torch's bits: L-lane vectors (L = 8
 * in torch 2.13 on x86-64, AVX-512 CPUs included; fused.py checks which at load time), four interleaved vector accumulators cascaded in levels, the accumulators added in
 * order, then the lanes after the scalar tail. */
#define SUM_SQUARES(L)                                                                                           \
    static float sum_squares_##L(const uint16_t *x, int64_t dim) {                                               \
        const int64_t vecs = dim / L, ilp = vecs / 4;                                                            \
        int64_t power = 0;                                                                                       \
        while ((1LL << power) < ilp) ++power; /* ceil(log2(ilp)) */                                              \
        power = power / 4 > 4 ? power / 4 : 4;                                                                   \
        const int64_t step = 1LL << power, mask = step - 1;                                                      \
        float acc[4][4][L];                                                                                      \
        memset(acc, 0, sizeof acc);                                                                              \
        int64_t i = 0;                                                                                           \
        while (i + step <= ilp) {                                                                                \
            for (int64_t j = 0; j < step; ++j, ++i)                                                              \
                for (int k = 0; k < 4; ++k)                                                                      \
                    for (int l = 0; l < L; ++l) {                                                                \
                        float h = bf2f(x[(i * 4 + k) * L + l]);                                                  \
                        acc[0][k][l] += h * h;                                                                   \
                    }                                                                                            \
            for (int lv = 1; lv < 4; ++lv) {                                                                     \
                for (int k = 0; k < 4; ++k)                                                                      \
                    for (int l = 0; l < L; ++l) {                                                                \
                        acc[lv][k][l] += acc[lv - 1][k][l];                                                      \
                        acc[lv - 1][k][l] = 0.0f;                                                                \
                    }                                                                                            \
                if ((i & (mask << (lv * power))) != 0) break;                                                    \
            }                                                                                                    \
        }                                                                                                        \
        for (; i < ilp; ++i)                                                                                     \
            for (int k = 0; k < 4; ++k)                                                                          \
                for (int l = 0; l < L; ++l) {                                                                    \
                    float h = bf2f(x[(i * 4 + k) * L + l]);                                                      \
                    acc[0][k][l] += h * h;                                                                       \
                }                                                                                                \
        for (int lv = 1; lv < 4; ++lv)                                                                           \
            for (int k = 0; k < 4; ++k)                                                                          \
                for (int l = 0; l < L; ++l) acc[0][k][l] += acc[lv][k][l];                                       \
        for (int64_t v = ilp * 4; v < vecs; ++v)                                                                 \
            for (int l = 0; l < L; ++l) {                                                                        \
                float h = bf2f(x[v * L + l]);                                                                    \
                acc[0][0][l] += h * h;                                                                           \
            }                                                                                                    \
        for (int k = 1; k < 4; ++k)                                                                              \
            for (int l = 0; l < L; ++l) acc[0][0][l] += acc[0][k][l];                                            \
        float total = 0.0f;                                                                                      \
        for (int64_t j = vecs * L; j < dim; ++j) {                                                               \
            float h = bf2f(x[j]);                                                                                \
            total += h * h;                                                                                      \
        }                                                                                                        \
        for (int l = 0; l < L; ++l) total += acc[0][0][l];                                                       \
        return total;                                                                                            \
    }
SUM_SQUARES(16)
SUM_SQUARES(8)

static float sum_squares(const uint16_t *x, int64_t dim, int64_t lanes) {
    return lanes == 8 ? sum_squares_8(x, dim) : sum_squares_16(x, dim);
}

static void norm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t dim, float eps, int64_t lanes) {
    float inv = 1.0f / sqrtf(sum_squares(x, dim, lanes) / (float)dim + eps);
    for (int64_t j = 0; j < dim; ++j) out[j] = f2bf(bf2f(w[j]) * bf2f(f2bf(bf2f(x[j]) * inv)));
}

/* out = LlamaRMSNorm(x): w * bf16(x * rsqrt(mean(x^2) + eps)); x, out [rows, dim]. */
void rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
              int64_t lanes) {
    for (int64_t r = 0; r < rows; ++r) norm_row(x + r * dim, w, out + r * dim, dim, eps, lanes);
}

/* sum = bf16(a + b), out = LlamaRMSNorm(sum): a decoder layer's residual add and the norm after it. */
void add_rms_norm(const uint16_t *a, const uint16_t *b, uint16_t *sum, const uint16_t *w, uint16_t *out,
                  int64_t rows, int64_t dim, float eps, int64_t lanes) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *ar = a + r * dim, *br = b + r * dim;
        uint16_t *sr = sum + r * dim;
        for (int64_t j = 0; j < dim; ++j) sr[j] = f2bf(bf2f(ar[j]) + bf2f(br[j]));
        norm_row(sr, w, out + r * dim, dim, eps, lanes);
    }
}

static void rope_heads(const uint16_t *restrict x, const uint16_t *restrict c, const uint16_t *restrict s,
                       uint16_t *restrict out, int64_t heads, int64_t d) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < heads; ++h) {
        const uint16_t *restrict x1 = x + h * d, *restrict x2 = x1 + half;
        uint16_t *restrict o1 = out + h * d, *restrict o2 = o1 + half;
        for (int64_t j = 0; j < half; ++j)
            o1[j] = f2bf(bf2f(f2bf(bf2f(x1[j]) * bf2f(c[j]))) + bf2f(f2bf(-bf2f(x2[j]) * bf2f(s[j]))));
        for (int64_t j = 0; j < half; ++j)
            o2[j] = f2bf(bf2f(f2bf(bf2f(x2[j]) * bf2f(c[j + half]))) + bf2f(f2bf(bf2f(x1[j]) * bf2f(s[j + half]))));
    }
}

/* transformers' apply_rotary_pos_emb in bf16: x * cos + rotate_half(x) * sin, each product rounded. q [tokens,
 * q_heads * d], k [tokens, k_heads * d], cos/sin [cos_rows, d], token t taking row t % cos_rows (one table for
 * all rows of a batch: cos_rows = the sequence length); outputs laid out as the inputs. */
void rope(const uint16_t *q, const uint16_t *k, const uint16_t *cos, const uint16_t *sin, uint16_t *q_out,
          uint16_t *k_out, int64_t tokens, int64_t cos_rows, int64_t q_heads, int64_t k_heads, int64_t d) {
    for (int64_t t = 0; t < tokens; ++t) {
        const uint16_t *c = cos + (t % cos_rows) * d, *s = sin + (t % cos_rows) * d;
        rope_heads(q + t * q_heads * d, c, s, q_out + t * q_heads * d, q_heads, d);
        rope_heads(k + t * k_heads * d, c, s, k_out + t * k_heads * d, k_heads, d);
    }
}
