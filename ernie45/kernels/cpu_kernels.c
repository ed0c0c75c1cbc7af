// ernie45 CPU decode kernels: few-row matmuls that stream the weight once, at memory speed.
//
// Built on first use by ernie45/kernels/__init__.py (gcc -O3 -march=native -fopenmp); needs AVX-512 with
// BF16 and VNNI (Zen 4, Sapphire Rapids and later). Threads come from the OpenMP runtime torch has already
// loaded (libgomp.so.1), so these kernels and torch share one pool.
//
// qgemm: y[M, N] = x[M, K] @ W^T for a weight-only quantized W (8, 4 or 2 bits). The activations are
//   quantized per 64 columns to int8 (scale = max|x| / 127, as llama.cpp's Q8 activations) and the weight
//   codes (unsigned, 0 .. 2^bits - 1) meet them in VPDPBUSD (u8 x s8 -> int32). With mid = 2^(bits-1),
//       W[n, k] = (code[n, k] - mid) * scale[n, g] + zero[n, g]          (g = k / group)
//       y[m, n] = sum_g scale[n, g] * sum_{b in g} sx[m, b] * sum_{k in b} code * xq
//               + sum_g (zero[n, g] - mid * scale[n, g]) * X[m, g],     X[m, g] = sum_{b in g} sx[m, b] * sum_{k in b} xq
//   The inner sums are exact in int32; everything else accumulates in fp32.
//   Weight layout ("span" layout): each row is K * bits / 8 bytes in spans of 64 bytes; a span holds
//   64 * (8 / bits) consecutive columns, byte j carrying column j + 64 p of the span in bits [p*bits, (p+1)*bits).
//   So unpacking plane p of a span is one shift and one mask, and gives 64 consecutive columns in order.
//
// bgemm: y[M, N] = x[M, K] @ W^T for bf16 x and W (VDPBF16PS, fp32 accumulation), K % 32 == 0.
//
// Shape letters: M rows of x (tokens), N output features (weight rows), K input features, B = K / 64 blocks.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MT 4  // rows of x handled together per weight row (the weight row is unpacked once per tile)

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512 load16_f32(const void* x, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float*)x + i);
}

static inline void store_out(void* out, int out_bf16, int64_t i, float v) {
    if (out_bf16) ((uint16_t*)out)[i] = f32_to_bf16(v);
    else ((float*)out)[i] = v;
}

// x[M, K] -> xq[M, K] int8, sx[M, B] scales, sq[M, B] = sum of the block's int8 values.
static void quantize_rows(const void* x, int x_bf16, int64_t M, int64_t K, int8_t* xq, float* sx, int32_t* sq) {
    const int64_t nb = K / 64;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            int64_t off = m * K + b * 64;
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = load16_f32(x, x_bf16, off + 16 * i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            float a = _mm512_reduce_max_ps(amax);
            float s = a / 127.0f;
            float inv = a > 0.0f ? 127.0f / a : 0.0f;
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)));  // round to nearest even
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i*)(xq + off + 16 * i), _mm512_cvtepi32_epi8(q));
            }
            sx[m * nb + b] = s;
            sq[m * nb + b] = _mm512_reduce_add_epi32(sum);
        }
    }
}

static inline float load_scale(const void* s, int s_bf16, int64_t i) {
    return s_bf16 ? bf16_to_f32(((const uint16_t*)s)[i]) : ((const float*)s)[i];
}

// One weight row against MT_ rows of x starting at m0. BITS, MT_ and SB (bf16 scales) are compile-time
// constants after inlining, so the tile's accumulators and pointers stay in registers.
static inline __attribute__((always_inline)) void qrow(
    const uint8_t* wr, const int BITS, const int MT_, const int SB, int64_t n, int64_t m0, int64_t K, int64_t N,
    int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const void* scales, const void* zeros, void* out, int out_bf16) {
    const int P = 8 / BITS;
    const int64_t nb = K / 64, spans = nb / P;
    const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    const uint16_t* s16 = (const uint16_t*)scales + n * ng;
    const float* s32 = (const float*)scales + n * ng;
    const int8_t* xm[MT];
    const float* sxm[MT];
    __m512 acc[MT];
    for (int i = 0; i < MT_; i++) {
        xm[i] = xq + (m0 + i) * K;
        sxm[i] = sx + (m0 + i) * nb;
        acc[i] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < spans; s++) {
        __m512i v = _mm512_loadu_si512((const void*)(wr + s * 64));
#pragma GCC unroll 4
        for (int p = 0; p < P; p++) {
            __m512i c = BITS == 8 ? v : _mm512_and_si512(_mm512_srli_epi16(v, p * BITS), mask);
            int64_t b = s * P + p;
            int32_t g = gidx[b];
            __m512 ws = _mm512_set1_ps(SB ? bf16_to_f32(s16[g]) : s32[g]);
#pragma GCC unroll 4
            for (int i = 0; i < MT_; i++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c,
                                                _mm512_loadu_si512((const void*)(xm[i] + b * 64)));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws, _mm512_set1_ps(sxm[i][b])), acc[i]);
            }
        }
    }
    // The codes' offset (mid) and the zeros, per group: sum_g (zero - mid * scale) * sum of the group's x.
    const float mid = (float)(1 << (BITS - 1));
    for (int i = 0; i < MT_; i++) {
        float r = _mm512_reduce_add_ps(acc[i]);
        const float* xs = xsum_g + (m0 + i) * ng;
        for (int64_t g = 0; g < ng; g++) {
            float sc = SB ? bf16_to_f32(s16[g]) : s32[g];
            float z = zeros ? (SB ? bf16_to_f32(((const uint16_t*)zeros)[n * ng + g]) : ((const float*)zeros)[n * ng + g])
                            : 0.0f;
            r += (z - mid * sc) * xs[g];
        }
        store_out(out, out_bf16, (m0 + i) * N + n, r);
    }
}

static inline __attribute__((always_inline)) void qrows(
    const uint8_t* w, const int BITS, const int SB, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N,
    int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const void* scales, const void* zeros, void* out, int out_bf16) {
    const int64_t rb = K * BITS / 8;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wr = w + n * rb;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4)
            qrow(wr, BITS, 4, SB, n, m0, K, N, ng, xq, sx, xsum_g, gidx, scales, zeros, out, out_bf16);
        switch (M - m0) {
            case 3: qrow(wr, BITS, 3, SB, n, m0, K, N, ng, xq, sx, xsum_g, gidx, scales, zeros, out, out_bf16); break;
            case 2: qrow(wr, BITS, 2, SB, n, m0, K, N, ng, xq, sx, xsum_g, gidx, scales, zeros, out, out_bf16); break;
            case 1: qrow(wr, BITS, 1, SB, n, m0, K, N, ng, xq, sx, xsum_g, gidx, scales, zeros, out, out_bf16); break;
            default: break;
        }
    }
}

// Returns 0, or a negative code for arguments the Python side should have rejected.
int ernie45_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t N, const uint8_t* w, int bits,
                  const void* scales, const void* zeros, int s_bf16, int64_t group, void* out, int out_bf16,
                  int nthreads) {
    if (bits != 8 && bits != 4 && bits != 2) return -1;
    if (K % (64 * (8 / bits)) || group % 64 || K % group || M < 1 || N < 1) return -2;
    const int64_t nb = K / 64, ng = K / group;
    int8_t* xq = (int8_t*)malloc((size_t)(M * K));
    float* sx = (float*)malloc((size_t)(M * nb) * sizeof(float));
    int32_t* sq = (int32_t*)malloc((size_t)(M * nb) * sizeof(int32_t));
    float* xsum_g = (float*)calloc((size_t)(M * ng), sizeof(float));
    int32_t* gidx = (int32_t*)malloc((size_t)nb * sizeof(int32_t));
    if (!xq || !sx || !sq || !xsum_g || !gidx) {
        free(xq); free(sx); free(sq); free(xsum_g); free(gidx);
        return -3;
    }
    for (int64_t b = 0; b < nb; b++) gidx[b] = (int32_t)((b * 64) / group);
    quantize_rows(x, x_bf16, M, K, xq, sx, sq);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) xsum_g[m * ng + (b * 64) / group] += sx[m * nb + b] * (float)sq[m * nb + b];
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunk = (N + nt - 1) / nt, n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (n0 < n1) {
#define QROWS(B, SB) qrows(w, B, SB, n0, n1, M, K, N, ng, xq, sx, xsum_g, gidx, scales, zeros, out, out_bf16)
            if (s_bf16) {
                if (bits == 4) QROWS(4, 1); else if (bits == 8) QROWS(8, 1); else QROWS(2, 1);
            } else {
                if (bits == 4) QROWS(4, 0); else if (bits == 8) QROWS(8, 0); else QROWS(2, 0);
            }
#undef QROWS
        }
    }
    free(xq); free(sx); free(sq); free(xsum_g); free(gidx);
    return 0;
}

// ------------------------------------------------------------------------------------------ bf16 x bf16
static inline __attribute__((always_inline)) void brow(const uint16_t* wr, const int MT_, int64_t n, int64_t m0,
                                                       const uint16_t* x, int64_t K, int64_t N, void* out,
                                                       int out_bf16) {
    __m512 a0[MT], a1[MT];
    for (int i = 0; i < MT_; i++) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {  // two independent chains hide the dot-product latency
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(wr + k));
        __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(wr + k + 32));
        for (int i = 0; i < MT_; i++) {
            const uint16_t* xr = x + (m0 + i) * K + k;
            a0[i] = _mm512_dpbf16_ps(a0[i], w0, (__m512bh)_mm512_loadu_si512((const void*)xr));
            a1[i] = _mm512_dpbf16_ps(a1[i], w1, (__m512bh)_mm512_loadu_si512((const void*)(xr + 32)));
        }
    }
    if (k < K) {  // K % 64 == 32
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(wr + k));
        for (int i = 0; i < MT_; i++)
            a0[i] = _mm512_dpbf16_ps(a0[i], w0, (__m512bh)_mm512_loadu_si512((const void*)(x + (m0 + i) * K + k)));
    }
    for (int i = 0; i < MT_; i++) store_out(out, out_bf16, (m0 + i) * N + n, _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i])));
}

int ernie45_bgemm(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, void* out, int out_bf16,
                  int nthreads) {
    if (K % 32 || M < 1 || N < 1) return -2;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunk = (N + nt - 1) / nt, n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        for (int64_t n = n0; n < n1; n++) {
            const uint16_t* wr = w + n * K;
            int64_t m0 = 0;
            for (; m0 + 4 <= M; m0 += 4) brow(wr, 4, n, m0, x, K, N, out, out_bf16);
            switch (M - m0) {
                case 3: brow(wr, 3, n, m0, x, K, N, out, out_bf16); break;
                case 2: brow(wr, 2, n, m0, x, K, N, out, out_bf16); break;
                case 1: brow(wr, 1, n, m0, x, K, N, out, out_bf16); break;
                default: break;
            }
        }
    }
    return 0;
}
