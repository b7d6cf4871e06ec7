/* The small per-layer kernels of a bf16 decoder step, fused: see pipeline/engines/fused.py.
 *
 * bf16 values travel as uint16_t; every kernel computes in fp32 and rounds to bf16 (round to nearest even) exactly
 * where transformers' eager Llama code rounds, and RMSNorm sums its squares in the order torch's sum kernel does, so
 * all three give its bits. Plain C (no torch headers: builds in about a second), single-threaded, rows independent
 * of each other. Built with -ffp-contract=off so that no multiply-add is fused behind the code's back.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* e^x (x <= 88) within ~2 ulp, 0 below -87 (Cephes' expf polynomial), written so that the compiler vectorizes it. */
static inline float exp_approx(float x) {
    float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = c - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : y * scale;
}

#define GMAX 8 /* query heads per kv head */

#ifdef __AVX512BF16__
/* One row's query heads of one kv head (G x 64) against that row's cache (S x 64 keys and values): scores by
 * bf16 dot products accumulated in fp32 (AVX-512 BF16), softmax in fp32, the values' weighted sum in fp32. Masked
 * columns (-inf: a row's left padding) are skipped, not read. out [G, 64] fp32, lse [G]: log-sum-exp of the
 * scaled, masked scores (flash attention's second output). sc: scratch of G * S floats. */
static void attend(const uint16_t *qp, const uint16_t *kp, const uint16_t *vp, const uint16_t *mp, int64_t G,
                   int64_t S, float scale, float *sc, float *out, float *lse) {
    __m512bh qv[GMAX][2];
    for (int64_t g = 0; g < G; ++g) {
        qv[g][0] = (__m512bh)_mm512_loadu_si512(qp + g * 64);
        qv[g][1] = (__m512bh)_mm512_loadu_si512(qp + g * 64 + 32);
    }
    for (int64_t s = 0; s < S; ++s) {
        float mk = mp ? bf2f(mp[s]) : 0.0f;
        if (mk == -INFINITY) {
            for (int64_t g = 0; g < G; ++g) sc[g * S + s] = -INFINITY;
            continue;
        }
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + s * 64);
        __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + s * 64 + 32);
        for (int64_t g = 0; g < G; ++g) {
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], k0);
            acc = _mm512_dpbf16_ps(acc, qv[g][1], k1);
            sc[g * S + s] = _mm512_reduce_add_ps(acc) * scale + mk;
        }
    }
    float m[GMAX], sum[GMAX];
    for (int64_t g = 0; g < G; ++g) {
        float *row = sc + g * S, mx = -INFINITY, tot = 0.0f;
        for (int64_t s = 0; s < S; ++s) mx = row[s] > mx ? row[s] : mx;
        if (mx == -INFINITY) {
            for (int64_t s = 0; s < S; ++s) row[s] = 0.0f;
        } else {
            for (int64_t s = 0; s < S; ++s) row[s] = exp_approx(row[s] - mx);
            for (int64_t s = 0; s < S; ++s) tot += row[s];
        }
        m[g] = mx;
        sum[g] = tot;
    }
    __m512 acc[GMAX][4];
    for (int64_t g = 0; g < G; ++g)
        for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
        if (mp && bf2f(mp[s]) == -INFINITY) continue;
        const uint16_t *vr = vp + s * 64;
        __m512 vf[4];
        for (int i = 0; i < 4; ++i) /* bf16 -> fp32: the 16 bits become the high half */
            vf[i] = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vr + 16 * i))), 16));
        for (int64_t g = 0; g < G; ++g) {
            __m512 p = _mm512_set1_ps(sc[g * S + s]);
            for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(p, vf[i], acc[g][i]);
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        __m512 inv = _mm512_set1_ps(sum[g] > 0.0f ? 1.0f / sum[g] : 0.0f);
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + g * 64 + 16 * i, _mm512_mul_ps(acc[g][i], inv));
        lse[g] = sum[g] > 0.0f ? m[g] + logf(sum[g]) : -INFINITY;
    }
}
#endif

/* The B x KVH (row, kv head) tasks of a decode step's attention, shared among the OpenMP threads (torch's own team:
 * the library links libgomp.so.1, which the loader resolves to the copy torch has loaded). Without o0 each task's
 * output goes to out / lse (fp32); with it, merged with the shared prefix's part into merged (bf16). */
static int decode_tasks(const uint16_t *q, int64_t q_sb, int64_t q_sh, const uint16_t *k, const uint16_t *v,
                        int64_t kv_sb, int64_t kv_sh, const uint16_t *mask, int64_t m_sb, const uint16_t *o0,
                        int64_t o0_sh, int64_t o0_sl, const float *l0, int64_t l0_sh, int64_t l0_sl, uint16_t *merged,
                        float *out, float *lse, int64_t B, int64_t KVH, int64_t G, int64_t S, float scale) {
#ifdef __AVX512BF16__
    if (G > GMAX) return -1;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)(G * S + 16));
        failed = sc == NULL;
        float o1[GMAX * 64], l1[GMAX];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < B * KVH; ++t) {
            if (sc == NULL) continue;
            int64_t b = t / KVH, h = t % KVH;
            attend(q + b * q_sb + h * q_sh, k + b * kv_sb + h * kv_sh, v + b * kv_sb + h * kv_sh,
                   mask ? mask + b * m_sb : NULL, G, S, scale, sc, o0 ? o1 : out + t * G * 64, o0 ? l1 : lse + t * G);
            if (o0 == NULL) continue;
            for (int64_t g = 0; g < G; ++g) {
                int64_t p = b * G + g;
                float w = 1.0f / (1.0f + exp_approx(l1[g] - l0[h * l0_sh + p * l0_sl])); /* the prefix's share */
                const uint16_t *pre = o0 + h * o0_sh + p * o0_sl;
                const float *own = o1 + g * 64;
                uint16_t *dst = merged + b * KVH * G * 64 + (h * G + g) * 64;
                for (int j = 0; j < 64; ++j) dst[j] = f2bf(own[j] + (bf2f(pre[j]) - own[j]) * w);
            }
        }
        free(sc);
    }
    return failed ? -2 : 0;
#else
    (void)q, (void)q_sb, (void)q_sh, (void)k, (void)v, (void)kv_sb, (void)kv_sh, (void)mask, (void)m_sb, (void)o0;
    (void)o0_sh, (void)o0_sl, (void)l0, (void)l0_sh, (void)l0_sl, (void)merged, (void)out, (void)lse, (void)B;
    (void)KVH, (void)G, (void)S, (void)scale;
    return -3;
#endif
}

/* Decode attention, one query per row (GQA: G query heads per kv head, head_dim 64): q [B, KVH, G, 64] bf16
 * (strides q_sb, q_sh; heads 64 apart), k and v [B, KVH, S, 64] bf16 (strides kv_sb, kv_sh; columns 64 apart), mask
 * [B, S] bf16 additive (row stride m_sb; 0 or -inf) or NULL; out [B, KVH, G, 64] fp32, lse [B, KVH, G] fp32.
 * Returns 0; -1 for G > GMAX, -2 when scratch memory is short, -3 when built without AVX-512 BF16. */
int decode_attention(const uint16_t *q, int64_t q_sb, int64_t q_sh, const uint16_t *k, const uint16_t *v,
                     int64_t kv_sb, int64_t kv_sh, const uint16_t *mask, int64_t m_sb, float *out, float *lse,
                     int64_t B, int64_t KVH, int64_t G, int64_t S, float scale) {
    return decode_tasks(q, q_sb, q_sh, k, v, kv_sb, kv_sh, mask, m_sb, NULL, 0, 0, NULL, 0, 0, NULL, out, lse, B, KVH,
                        G, S, scale);
}

/* decode_attention with the shared prefix's part merged in, as cascade attention merges it: o0 [KVH, B * G, 64]
 * bf16 (strides o0_sh, o0_sl; head_dim contiguous) and l0 [KVH, B * G] fp32 (strides l0_sh, l0_sl) are the prefix's
 * flash output and log-sum-exp for every row's queries (row b's head g at b * G + g). With the row's own part (o1,
 * l1) the result is o1 + (o0 - o1) / (1 + e^(l1 - l0)), the softmax over [prefix | own cache], written in bf16 as
 * transformers' attention output [B, KVH * G, 64]. Returns as decode_attention. */
int decode_attention_merged(const uint16_t *q, int64_t q_sb, int64_t q_sh, const uint16_t *k, const uint16_t *v,
                            int64_t kv_sb, int64_t kv_sh, const uint16_t *mask, int64_t m_sb, const uint16_t *o0,
                            int64_t o0_sh, int64_t o0_sl, const float *l0, int64_t l0_sh, int64_t l0_sl,
                            uint16_t *merged, int64_t B, int64_t KVH, int64_t G, int64_t S, float scale) {
    return decode_tasks(q, q_sb, q_sh, k, v, kv_sb, kv_sh, mask, m_sb, o0, o0_sh, o0_sl, l0, l0_sh, l0_sl, merged,
                        NULL, NULL, B, KVH, G, S, scale);
}
