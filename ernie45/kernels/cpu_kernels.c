// ernie45 CPU decode kernels: few-row matmuls that stream the weight once, at memory speed.
//
// Built on first use by ernie45/kernels/__init__.py, twice from this one source (cpu/simd.h names every vector
// operation): the AVX-512 build (gcc -O3 -march=native -fopenmp) needs AVX-512 F/BW/VL with BF16 and VNNI (Zen 4,
// Sapphire Rapids and later); the AVX2 build (-O3 -mavx2 -mfma -mf16c -DERNIE45_AVX2) needs AVX2, FMA and F16C
// (x86-64-v3) and emulates each 16-lane operation exactly on two 256-bit halves. Threads come from the OpenMP runtime torch has already
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
//   6-bit codes: per 256 columns, 192 bytes: the low 4 bits in the 4-bit span layout (128 bytes), then the high
//   2 bits in the 2-bit span layout (64 bytes); code = low | high << 4 (K % 256 == 0). One sequential stream a row.
//
// bgemm: y[M, N] = x[M, K] @ W^T for bf16 x and W (VDPBF16PS, fp32 accumulation), K % 32 == 0.
//
// stream_read: a plain read of a buffer, the bandwidth ceiling the matmuls are benchmarked against.
//
// Shape letters: M rows of x (tokens), N output features (weight rows), K input features, B = K / 64 blocks.

#include <immintrin.h>
#include "cpu/simd.h"  // our names for the vector operations: one source, an AVX-512 and an AVX2 build
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ernie45_kernels.h"  // the exported functions and structs

// Rows of x handled together per weight row (the weight row is unpacked once per tile): 8 with AVX-512's 32
// registers, 4 with AVX2's 16 (8 spills there: measured 1.1x slower on a 256-token int4 MoE layer).
#ifndef MT
#ifdef ERNIE45_AVX2
#define MT 4
#else
#define MT 8
#endif
#endif
// bgemm's register tiles of up to 16 sums (btile) for every row count: AVX-512 only. AVX2's 16 registers hold 4 of
// them (a 16-sum tile spills: 0.92-0.95x the per-row loop at 4 rows), and its joint reduction is 16 single ones, so
// that build keeps the per-row loop below 8 rows and 4 x 4 tiles from 8 (bench_kernels_ab --only bgemm).
#ifndef BTILES
#ifdef ERNIE45_AVX2
#define BTILES 0
#else
#define BTILES 1
#endif
#endif
#ifndef QCH2
#ifdef ERNIE45_AVX2
#define QCH2 1  // rows of x up to which the 4/2-bit tile keeps two int32 chains a row (qtile): AVX2 spills at 2
#else
#define QCH2 4
#endif
#endif
#ifndef QPF
#define QPF 8192
#endif
#ifndef QPF_ROWS
#define QPF_ROWS 2
#endif
#ifndef QNB
#define QNB 16  // weight rows per block of the quantized matmul's cache blocking (qrows; 4 and 64: slower)
#endif

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

static inline v16f load16_f32(const void* x, int bf16, int64_t i) {
    if (bf16) {
        v16h h = v16h_loadu((const void*)((const uint16_t*)x + i));
        return v16_castsi_ps(v16_slli_epi32(v16_cvtepu16_epi32(h), 16));
    }
    return v16_loadu_ps((const float*)x + i);
}

static inline void store_out(void* out, int out_bf16, int64_t i, float v) {
    if (out_bf16) ((uint16_t*)out)[i] = f32_to_bf16(v);
    else ((float*)out)[i] = v;
}

// x[M, K] -> xq[M, K] int8, sx[M, K/XB] scales, sq[M, K/XB] = sum of the block's int8 values (XB = 64 or 128).
static void quantize_rows(const void* x, int x_bf16, int64_t M, int64_t K, int64_t XB, int8_t* xq, float* sx,
                          int32_t* sq) {
    const int64_t nx = K / XB;
    const int V = (int)(XB / 16);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nx; b++) {
            int64_t off = m * K + b * XB;
            v16f v[8];
            v16f amax = v16_setzero_ps();
            for (int i = 0; i < V; i++) {
                v[i] = load16_f32(x, x_bf16, off + 16 * i);
                amax = v16_max_ps(amax, v16_abs_ps(v[i]));
            }
            float a = v16_reduce_max_ps(amax);
            float s = a / 127.0f;
            float inv = a > 0.0f ? 127.0f / a : 0.0f;
            v16i sum = v16_setzero_si();
            for (int i = 0; i < V; i++) {
                v16i q = v16_cvtps_epi32(v16_mul_ps(v[i], v16_set1_ps(inv)));  // round to nearest even
                q = v16_max_epi32(v16_min_epi32(q, v16_set1_epi32(127)), v16_set1_epi32(-127));
                sum = v16_add_epi32(sum, q);
                v16_storeu_epi8((xq + off + 16 * i), q);
            }
            sx[m * nx + b] = s;
            sq[m * nx + b] = v16_reduce_add_epi32(sum);
        }
    }
}

static inline v16f load16_masked(const void* p, int bf16, int64_t i, vmask16 k) {  // masked lanes read 0
    if (bf16) {
        v16h h = v16h_maskz_loadu(k, (const void*)((const uint16_t*)p + i));
        return v16_castsi_ps(v16_slli_epi32(v16_cvtepu16_epi32(h), 16));
    }
    return v16_maskz_loadu_ps(k, (const float*)p + i);
}

// The kernels by concern, in dependency order (one translation unit, so static helpers stay shared):
#include "cpu/qmatmul.c"
#include "cpu/moe.c"
#include "cpu/bf16.c"
#include "cpu/attention.c"
#include "cpu/small_ops.c"
#include "cpu/layer.c"
#include "cpu/stream.c"
