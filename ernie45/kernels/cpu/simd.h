// The SIMD layer of the ernie45 CPU kernels: our names for the 16-lane vector operations the kernels use.
// Part of ernie45/kernels/cpu_kernels.c (included there right after <immintrin.h>, before the kernel parts).
//
// The kernel sources (cpu_kernels.c after this include, cpu/*.c) name no intrinsic and no vector type: they use
// the types and operations below, so one source builds twice:
//
// - AVX-512 (the default, -march=native on a CPU with AVX-512 F/BW/VL/VNNI/BF16): every name is a #define of the
//   intrinsic or a typedef of the type it replaces; the compiled code is the one the kernels had before this layer
//   (ernie45/kernels/__init__.py's docstring gives the objdump comparison that checks it). Three are written out:
//   v16_reduce_add_ps (gcc's tree, whatever the compiler), v16_reduce16_add_ps and v16_to_bf16_ps.
// - AVX2 (-DERNIE45_AVX2, -mavx2 -mfma -mf16c: x86-64-v3): a 16-lane vector is a struct of two 256-bit halves
//   (lanes 0-7 in lo, 8-15 in hi) and a mask a 16-bit int; each operation gives, lane by lane, the bits of the
//   AVX-512 instruction it stands for. The dot products:
//     v16_dpbusd_epi32: per int32 lane the 4 products u8 * s8 summed exactly (bytes widened to int16, two
//       VPMADDWD, wrap-around int32 adds as VPDPBUSD); v16_dpbusd_u7_epi32 is the same sum when every unsigned
//       byte is < 128 (codes of up to 7 bits): then VPMADDUBSW cannot saturate (|2 * 127 * 128| < 2^15) and gives
//       the same int32 in two instructions instead of nine (qgemm's 2/4/6-bit codes use it; 8-bit codes cannot).
//     v16_dpbf16_ps: per fp32 lane acc + a[2i+1] * b[2i+1], rounded, then + a[2i] * b[2i], rounded: two FMAs,
//       odd pair first, as VDPBF16PS (a bf16 * bf16 product is exact in fp32, so an FMA adds it with one rounding).
//     v16_cvtneps_bh: round to nearest even, NaN kept and made quiet, fp32 denormals to a signed zero (VCVTNEPS2BF16
//       flushes them; checked on Zen 4).
//   Not emulated: VDPBF16PS also flushes denormal (< 2^-126) inputs and results to zero; the AVX2 build keeps them
//   (a difference below 2^-126 in a lane, and only for such numbers).
//   v16_reduce_*: the tree of gcc's _mm512_reduce_*_ps (halves, quarters, pairs), so sums are bit-identical too.
#ifndef ERNIE45_SIMD_H
#define ERNIE45_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#ifndef ERNIE45_AVX2
// ================================================================================================= AVX-512
typedef __m512 v16f;      // 16 x fp32
typedef __m512i v16i;     // 16 x int32, or 64 bytes
typedef __m512bh v16bh;   // 32 x bf16 (pairs per fp32 lane)
typedef __m256i v16h;     // 16 x 16-bit (bf16 bits)
typedef __mmask16 vmask16;

#define v16_setzero_ps() _mm512_setzero_ps()
#define v16_setzero_si() _mm512_setzero_si512()
#define v16_set1_ps(a) _mm512_set1_ps(a)
#define v16_set1_epi32(a) _mm512_set1_epi32(a)
#define v16_set1_epi8(a) _mm512_set1_epi8(a)
#define v16_setr_epi32 _mm512_setr_epi32
#define v16_loadu_ps(p) _mm512_loadu_ps(p)
#define v16_loadu_si(p) _mm512_loadu_si512(p)
// The same 64 bytes as two 256-bit loads: a plain read streams from DRAM ~10% faster so on Zen 4 (stream_read, the
// benchmarks' ceiling; benchmarks/results/2026-12-05-int4-bw.md); the matmuls' weight loads were slower so.
#define v16_loadu2_si(p) \
    _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p))), \
                       _mm256_loadu_si256((const __m256i*)(p) + 1), 1)
#define v16_storeu_ps(p, a) _mm512_storeu_ps((p), (a))
#define v16_storeu_si(p, a) _mm512_storeu_si512((p), (a))
#define v16_maskz_loadu_ps(k, p) _mm512_maskz_loadu_ps((k), (p))
#define v16h_loadu(p) _mm256_loadu_si256((const __m256i*)(p))
#define v16h_storeu(p, a) _mm256_storeu_si256((__m256i*)(p), (a))
#define v16h_maskz_loadu(k, p) _mm256_maskz_loadu_epi16((k), (p))

#define v16_add_ps(a, b) _mm512_add_ps((a), (b))
#define v16_mul_ps(a, b) _mm512_mul_ps((a), (b))
#define v16_max_ps(a, b) _mm512_max_ps((a), (b))
#define v16_min_ps(a, b) _mm512_min_ps((a), (b))
#define v16_abs_ps(a) _mm512_abs_ps(a)
#define v16_fmadd_ps(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define v16_fnmadd_ps(a, b, c) _mm512_fnmadd_ps((a), (b), (c))
#define v16_add_epi32(a, b) _mm512_add_epi32((a), (b))
#define v16_max_epi32(a, b) _mm512_max_epi32((a), (b))
#define v16_min_epi32(a, b) _mm512_min_epi32((a), (b))
#define v16_and_si(a, b) _mm512_and_si512((a), (b))
#define v16_andor_si(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0xEA)  // (a & b) | c
#define v16_srli_epi16(a, n) _mm512_srli_epi16((a), (n))
#define v16_slli_epi16(a, n) _mm512_slli_epi16((a), (n))
#define v16_slli_epi32(a, n) _mm512_slli_epi32((a), (n))

#define v16_cvtepi32_ps(a) _mm512_cvtepi32_ps(a)
#define v16_cvtps_epi32(a) _mm512_cvtps_epi32(a)
#define v16_cvtepu16_epi32(h) _mm512_cvtepu16_epi32(h)
#define v16_castsi_ps(a) _mm512_castsi512_ps(a)
#define v16_storeu_epi8(p, a) _mm_storeu_si128((__m128i*)(p), _mm512_cvtepi32_epi8(a))  // low byte of each lane
#define v16_cvtneps_bh(a) ((__m256i)_mm512_cvtneps_pbh(a))
#define v16_as_bh(a) ((__m512bh)(a))
#define v16_dpbf16_ps(acc, a, b) _mm512_dpbf16_ps((acc), (a), (b))
#define v16_dpbusd_epi32(acc, u, s) _mm512_dpbusd_epi32((acc), (u), (s))
#define v16_dpbusd_u7_epi32(acc, u, s) _mm512_dpbusd_epi32((acc), (u), (s))

// gcc's _mm512_reduce_add_ps tree (halves, quarters, pairs), written out so that v16_reduce16_add_ps below and any
// compiler ($CC) sum in the same order.
static inline __attribute__((always_inline)) float v16_reduce_add_ps(__m512 a) {
    const __m256 t3 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)),  // AVX-512F
                                    _mm512_castps512_ps256(a));
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
// Lane i = v16_reduce_add_ps(v[i]), bit for bit: the same pairs added at each level, 16 sums at once (45 operations
// instead of 16 x 7). Vector s of the first level takes v[4 (s % 4) + s / 4] so that the last level's lanes come
// out in order.
static inline __attribute__((always_inline)) v16f v16_reduce16_add_ps(const v16f* v) {
    __m512 u[8], w[4], x[2];
    for (int j = 0; j < 8; j++) {  // lanes i and i + 8 of two vectors: each 256-bit half of u one vector's t3
        const __m512 a = v[4 * ((2 * j) % 4) + (2 * j) / 4], b = v[4 * ((2 * j + 1) % 4) + (2 * j + 1) / 4];
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int j = 0; j < 4; j++)  // lanes i and i + 4 of each t3: each 128-bit lane of w one vector's t6
        w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; j++) {  // lanes i and i + 2 of each t6: two lanes of t8 per vector
        const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
        x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));  // t8[0] + t8[1]
}
// 16 fp32 to bf16 bits as f32_to_bf16 rounds them (nearest even, NaN kept quiet, denormals rounded, not flushed).
static inline __attribute__((always_inline)) v16h v16_to_bf16_ps(__m512 a) {
    const __m512i u = _mm512_castps_si512(a), top = _mm512_srli_epi32(u, 16);
    const __m512i rne = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(top, _mm512_set1_epi32(1)))),
        16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rne, nan, _mm512_or_si512(top, _mm512_set1_epi32(0x40))));
}
#define v16_reduce_max_ps(a) _mm512_reduce_max_ps(a)
#define v16_reduce_add_epi32(a) _mm512_reduce_add_epi32(a)

#define v16_cmpunord_ps_mask(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_UNORD_Q)
#define v16_cmpgt_ps_mask(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_GT_OQ)
#define v16_cmplt_epi32_mask(a, b) _mm512_cmp_epi32_mask((a), (b), _MM_CMPINT_LT)
#define v16_mask_mov_ps(src, k, a) _mm512_mask_mov_ps((src), (k), (a))
#define v16_permutexvar_ps(idx, a) _mm512_permutexvar_ps((idx), (a))  // lane i: a[idx[i] & 15]
#define v16_mask_mov_epi32(src, k, a) _mm512_mask_mov_epi32((src), (k), (a))

#else
// ==================================================================================================== AVX2
typedef struct { __m256 lo, hi; } v16f;
typedef struct { __m256i lo, hi; } v16i;
typedef struct { __m256i lo, hi; } v16bh;
typedef __m256i v16h;
typedef uint16_t vmask16;

#define SIMD_FN static inline __attribute__((always_inline))

SIMD_FN v16f v16f_make(__m256 lo, __m256 hi) { v16f r = {lo, hi}; return r; }
SIMD_FN v16i v16i_make(__m256i lo, __m256i hi) { v16i r = {lo, hi}; return r; }

SIMD_FN v16f v16_setzero_ps(void) { return v16f_make(_mm256_setzero_ps(), _mm256_setzero_ps()); }
SIMD_FN v16i v16_setzero_si(void) { return v16i_make(_mm256_setzero_si256(), _mm256_setzero_si256()); }
SIMD_FN v16f v16_set1_ps(float a) { return v16f_make(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
SIMD_FN v16i v16_set1_epi32(int a) { return v16i_make(_mm256_set1_epi32(a), _mm256_set1_epi32(a)); }
SIMD_FN v16i v16_set1_epi8(char a) { return v16i_make(_mm256_set1_epi8(a), _mm256_set1_epi8(a)); }
SIMD_FN v16i v16_setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9, int a10,
                            int a11, int a12, int a13, int a14, int a15) {
    return v16i_make(_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7),
                     _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15));
}
SIMD_FN v16f v16_loadu_ps(const float* p) { return v16f_make(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
SIMD_FN v16i v16_loadu_si(const void* p) {
    return v16i_make(_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1));
}
#define v16_loadu2_si(p) v16_loadu_si(p)  // two 256-bit loads already
SIMD_FN void v16_storeu_ps(float* p, v16f a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
SIMD_FN void v16_storeu_si(void* p, v16i a) {
    _mm256_storeu_si256((__m256i*)p, a.lo);
    _mm256_storeu_si256((__m256i*)p + 1, a.hi);
}
SIMD_FN __m256i simd_mask8(unsigned k) {  // bit i of k -> all ones in int32 lane i
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k), bit), bit);
}
SIMD_FN v16f v16_maskz_loadu_ps(vmask16 k, const float* p) {  // masked lanes read 0 and touch no memory
    if (k == 0xFFFF) return v16_loadu_ps(p);
    return v16f_make(_mm256_maskload_ps(p, simd_mask8(k & 0xFFu)), _mm256_maskload_ps(p + 8, simd_mask8(k >> 8)));
}
#define v16h_loadu(p) _mm256_loadu_si256((const __m256i*)(p))
#define v16h_storeu(p, a) _mm256_storeu_si256((__m256i*)(p), (a))
SIMD_FN v16h v16h_maskz_loadu(vmask16 k, const void* p) {  // 16-bit lanes: AVX2 has no such masked load
    if (k == 0xFFFF) return _mm256_loadu_si256((const __m256i*)p);
    uint16_t buf[16];
    for (int i = 0; i < 16; i++) buf[i] = (k >> i) & 1 ? ((const uint16_t*)p)[i] : 0;
    return _mm256_loadu_si256((const __m256i*)buf);
}

#define SIMD_PS2(name, op)                                                                                    \
    SIMD_FN v16f name(v16f a, v16f b) { return v16f_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
#define SIMD_SI2(name, op)                                                                                    \
    SIMD_FN v16i name(v16i a, v16i b) { return v16i_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
SIMD_PS2(v16_add_ps, _mm256_add_ps)
SIMD_PS2(v16_mul_ps, _mm256_mul_ps)
SIMD_PS2(v16_max_ps, _mm256_max_ps)
SIMD_PS2(v16_min_ps, _mm256_min_ps)
SIMD_SI2(v16_add_epi32, _mm256_add_epi32)
SIMD_SI2(v16_max_epi32, _mm256_max_epi32)
SIMD_SI2(v16_min_epi32, _mm256_min_epi32)
SIMD_SI2(v16_and_si, _mm256_and_si256)
#undef SIMD_PS2
#undef SIMD_SI2
SIMD_FN v16f v16_abs_ps(v16f a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return v16f_make(_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m));
}
SIMD_FN v16f v16_fmadd_ps(v16f a, v16f b, v16f c) {
    return v16f_make(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
SIMD_FN v16f v16_fnmadd_ps(v16f a, v16f b, v16f c) {
    return v16f_make(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
SIMD_FN v16i v16_andor_si(v16i a, v16i b, v16i c) {  // (a & b) | c
    return v16i_make(_mm256_or_si256(_mm256_and_si256(a.lo, b.lo), c.lo),
                     _mm256_or_si256(_mm256_and_si256(a.hi, b.hi), c.hi));
}
SIMD_FN v16i v16_srli_epi16(v16i a, int n) { return v16i_make(_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)); }
SIMD_FN v16i v16_slli_epi16(v16i a, int n) { return v16i_make(_mm256_slli_epi16(a.lo, n), _mm256_slli_epi16(a.hi, n)); }
SIMD_FN v16i v16_slli_epi32(v16i a, int n) { return v16i_make(_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)); }
SIMD_FN __m256 simd_permute16_8(__m256i idx, v16f a) {  // 8 lanes of VPERMPS over 16: bit 3 of idx picks the half
    const __m256 from_lo = _mm256_permutevar8x32_ps(a.lo, idx), from_hi = _mm256_permutevar8x32_ps(a.hi, idx);
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
SIMD_FN v16f v16_permutexvar_ps(v16i idx, v16f a) {  // lane i: a[idx[i] & 15]
    return v16f_make(simd_permute16_8(idx.lo, a), simd_permute16_8(idx.hi, a));
}

SIMD_FN v16f v16_cvtepi32_ps(v16i a) { return v16f_make(_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)); }
SIMD_FN v16i v16_cvtps_epi32(v16f a) { return v16i_make(_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)); }
SIMD_FN v16i v16_cvtepu16_epi32(v16h h) {
    return v16i_make(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)));
}
SIMD_FN v16f v16_castsi_ps(v16i a) { return v16f_make(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)); }
SIMD_FN void v16_storeu_epi8(void* p, v16i a) {  // the low byte of each int32 lane (truncation, as VPMOVDB)
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i gather = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);  // the two 4-byte groups to the bottom
    const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.lo, pick), gather);
    const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.hi, pick), gather);
    _mm_storeu_si128((__m128i*)p, _mm_unpacklo_epi64(_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi)));
}
SIMD_FN __m256i simd_cvtneps_bh8(__m256 a) {  // 8 fp32 -> 8 bf16 bits in the low half of each int32 lane
    const __m256i u = _mm256_castps_si256(a), top = _mm256_srli_epi32(u, 16);
    const __m256i rne = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(top, _mm256_set1_epi32(1)))),
        16);
    const __m256i quiet = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
    const __m256i sign = _mm256_and_si256(top, _mm256_set1_epi32(0x8000));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    const __m256i tiny = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
    return _mm256_blendv_epi8(_mm256_blendv_epi8(rne, quiet, nan), sign, tiny);
}
SIMD_FN v16h v16_cvtneps_bh(v16f a) {  // packus keeps the 16-bit values (all < 2^16); the permute undoes its interleave
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(simd_cvtneps_bh8(a.lo), simd_cvtneps_bh8(a.hi)), 0xD8);
}
SIMD_FN v16bh v16_as_bh(v16i a) { v16bh r = {a.lo, a.hi}; return r; }
SIMD_FN __m256 simd_dpbf16_8(__m256 acc, __m256i a, __m256i b) {
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);  // bf16 2i+1: the high half of lane i
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, odd)), _mm256_castsi256_ps(_mm256_and_si256(b, odd)),
                          acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                           acc);
}
SIMD_FN v16f v16_dpbf16_ps(v16f acc, v16bh a, v16bh b) {
    return v16f_make(simd_dpbf16_8(acc.lo, a.lo, b.lo), simd_dpbf16_8(acc.hi, a.hi, b.hi));
}
SIMD_FN __m256i simd_dpbusd_8(__m256i acc, __m256i u, __m256i s) {
    const __m256i ue = _mm256_and_si256(u, _mm256_set1_epi16(0x00FF)), uo = _mm256_srli_epi16(u, 8);
    const __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
}
SIMD_FN v16i v16_dpbusd_epi32(v16i acc, v16i u, v16i s) {
    return v16i_make(simd_dpbusd_8(acc.lo, u.lo, s.lo), simd_dpbusd_8(acc.hi, u.hi, s.hi));
}
SIMD_FN __m256i simd_dpbusd_u7_8(__m256i acc, __m256i u, __m256i s) {  // every byte of u < 128: no saturation
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
SIMD_FN v16i v16_dpbusd_u7_epi32(v16i acc, v16i u, v16i s) {
    return v16i_make(simd_dpbusd_u7_8(acc.lo, u.lo, s.lo), simd_dpbusd_u7_8(acc.hi, u.hi, s.hi));
}

SIMD_FN float v16_reduce_add_ps(v16f a) {  // gcc's _mm512_reduce_add_ps tree
    const __m256 t3 = _mm256_add_ps(a.hi, a.lo);
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
SIMD_FN v16f v16_reduce16_add_ps(const v16f* v) {  // lane i = v16_reduce_add_ps(v[i])
    float r[16];
    for (int i = 0; i < 16; i++) r[i] = v16_reduce_add_ps(v[i]);
    return v16f_make(_mm256_loadu_ps(r), _mm256_loadu_ps(r + 8));
}
SIMD_FN __m256i simd_to_bf16_8(__m256 a) {  // simd_cvtneps_bh8 without the denormal flush (f32_to_bf16's rounding)
    const __m256i u = _mm256_castps_si256(a), top = _mm256_srli_epi32(u, 16);
    const __m256i rne = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(top, _mm256_set1_epi32(1)))),
        16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rne, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
}
SIMD_FN v16h v16_to_bf16_ps(v16f a) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(simd_to_bf16_8(a.lo), simd_to_bf16_8(a.hi)), 0xD8);
}
SIMD_FN float v16_reduce_max_ps(v16f a) {  // gcc's _mm512_reduce_max_ps tree (the same operand order for NaNs)
    const __m256 t3 = _mm256_max_ps(a.hi, a.lo);
    const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1))));
}
SIMD_FN int v16_reduce_add_epi32(v16i a) {
    const __m256i t3 = _mm256_add_epi32(a.hi, a.lo);
    __m128i t = _mm_add_epi32(_mm256_extracti128_si256(t3, 1), _mm256_castsi256_si128(t3));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

SIMD_FN vmask16 simd_mask16(__m256 lo, __m256 hi) {
    return (vmask16)(_mm256_movemask_ps(lo) | (_mm256_movemask_ps(hi) << 8));
}
SIMD_FN vmask16 v16_cmpunord_ps_mask(v16f a, v16f b) {
    return simd_mask16(_mm256_cmp_ps(a.lo, b.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, b.hi, _CMP_UNORD_Q));
}
SIMD_FN vmask16 v16_cmpgt_ps_mask(v16f a, v16f b) {
    return simd_mask16(_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ));
}
SIMD_FN vmask16 v16_cmplt_epi32_mask(v16i a, v16i b) {
    return simd_mask16(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.lo, a.lo)),
                       _mm256_castsi256_ps(_mm256_cmpgt_epi32(b.hi, a.hi)));
}
SIMD_FN v16f v16_mask_mov_ps(v16f src, vmask16 k, v16f a) {
    return v16f_make(_mm256_blendv_ps(src.lo, a.lo, _mm256_castsi256_ps(simd_mask8(k & 0xFFu))),
                     _mm256_blendv_ps(src.hi, a.hi, _mm256_castsi256_ps(simd_mask8(k >> 8))));
}
SIMD_FN v16i v16_mask_mov_epi32(v16i src, vmask16 k, v16i a) {
    return v16i_make(_mm256_blendv_epi8(src.lo, a.lo, simd_mask8(k & 0xFFu)),
                     _mm256_blendv_epi8(src.hi, a.hi, simd_mask8(k >> 8)));
}
#undef SIMD_FN
#endif

// exp(x) for 16 floats, within 2 ulp of expf for x in [-87.3, 88.3] (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// a degree-7 polynomial for exp(r), 2^n into the exponent field); x above 88.3 / below -87.3 is clamped there
// (exp(88.3) = 2.1e38, exp(-87.3) = 1.2e-38), and NaN gives a finite value: callers that need the NaN
// (silu: g / (1 + exp(-g))) keep it through the other operand. The same operations in both builds, so the two agree.
static inline __attribute__((always_inline)) v16f v16_exp_ps(v16f x) {
    x = v16_min_ps(v16_max_ps(x, v16_set1_ps(-87.3f)), v16_set1_ps(88.3f));
    const v16i n = v16_cvtps_epi32(v16_mul_ps(x, v16_set1_ps(1.44269504088896341f)));  // nearest
    const v16f fn = v16_cvtepi32_ps(n);
    v16f r = v16_fnmadd_ps(fn, v16_set1_ps(0.693359375f), x);  // ln2 in two parts: the first exact in fn * it
    r = v16_fnmadd_ps(fn, v16_set1_ps(-2.12194440e-4f), r);
    v16f p = v16_set1_ps(1.9875691500e-4f);
    p = v16_fmadd_ps(p, r, v16_set1_ps(1.3981999507e-3f));
    p = v16_fmadd_ps(p, r, v16_set1_ps(8.3334519073e-3f));
    p = v16_fmadd_ps(p, r, v16_set1_ps(4.1665795894e-2f));
    p = v16_fmadd_ps(p, r, v16_set1_ps(1.6666665459e-1f));
    p = v16_fmadd_ps(p, r, v16_set1_ps(5.0000001201e-1f));
    p = v16_fmadd_ps(p, v16_mul_ps(r, r), v16_add_ps(r, v16_set1_ps(1.0f)));
    return v16_mul_ps(p, v16_castsi_ps(v16_slli_epi32(v16_add_epi32(n, v16_set1_epi32(127)), 23)));
}

#endif
