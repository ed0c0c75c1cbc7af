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
//   6-bit codes: per 256 columns, 192 bytes: the low 4 bits in the 4-bit span layout (128 bytes), then the high
//   2 bits in the 2-bit span layout (64 bytes); code = low | high << 4 (K % 256 == 0). One sequential stream a row.
//
// bgemm: y[M, N] = x[M, K] @ W^T for bf16 x and W (VDPBF16PS, fp32 accumulation), K % 32 == 0.
//
// Shape letters: M rows of x (tokens), N output features (weight rows), K input features, B = K / 64 blocks.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ernie45_kernels.h"  // the exported functions and structs

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

// x[M, K] -> xq[M, K] int8, sx[M, K/XB] scales, sq[M, K/XB] = sum of the block's int8 values (XB = 64 or 128).
static void quantize_rows(const void* x, int x_bf16, int64_t M, int64_t K, int64_t XB, int8_t* xq, float* sx,
                          int32_t* sq) {
    const int64_t nx = K / XB;
    const int V = (int)(XB / 16);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nx; b++) {
            int64_t off = m * K + b * XB;
            __m512 v[8];
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < V; i++) {
                v[i] = load16_f32(x, x_bf16, off + 16 * i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            float a = _mm512_reduce_max_ps(amax);
            float s = a / 127.0f;
            float inv = a > 0.0f ? 127.0f / a : 0.0f;
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < V; i++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)));  // round to nearest even
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i*)(xq + off + 16 * i), _mm512_cvtepi32_epi8(q));
            }
            sx[m * nx + b] = s;
            sq[m * nx + b] = _mm512_reduce_add_epi32(sum);
        }
    }
}

static inline __m512 load16_masked(const void* p, int bf16, int64_t i, __mmask16 k) {  // masked lanes read 0
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(k, (const void*)((const uint16_t*)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(k, (const float*)p + i);
}

// One weight row against MT_ rows of x starting at m0. BITS, MT_, SB (bf16 scales) and BPX (64-column
// sub-blocks per activation block) are compile-time constants after inlining, so the tile's accumulators and
// pointers stay in registers. 512-bit operations are the budget on this path (Zen 4 issues about one a cycle):
// per activation block, one int32 chain of VPDPBUSD, one conversion, one broadcast and one FMA per row of x.
static inline __attribute__((always_inline)) void qrow(
    const uint8_t* wr, const int BITS, const int MT_, const int SB, const int BPX, int64_t n, int64_t m0, int64_t K,
    int64_t N, int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const int64_t* xrow, const void* scales, const void* zeros, void* out, int out_bf16) {
    const int P = BITS == 6 ? 2 : 8 / BITS;  // 6 bits: the 4-bit part's planes (the 2-bit part has 4)
    const int64_t nb = K / 64, nx = nb / BPX;
    const __m512i mask = _mm512_set1_epi8((char)(BITS == 6 ? 15 : (1 << BITS) - 1)), mask2 = _mm512_set1_epi8(0x30);

    const uint16_t* s16 = (const uint16_t*)scales + n * ng;
    const float* s32 = (const float*)scales + n * ng;
    const int8_t* xm[MT];
    const float* sxm[MT];
    __m512 acc[MT][2];  // even and odd activation blocks: two FMA chains per row of x
    for (int i = 0; i < MT_; i++) {
        const int64_t r = xrow ? xrow[m0 + i] : m0 + i;  // the x row (output row m0 + i)
        xm[i] = xq + r * K;
        sxm[i] = sx + r * nx;
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    }
    // Codes of 64-column sub-block b (0 <= b < nb): plane b % P of the span b / P.
#define CODES(b)                                                                                             \
    (P == 1 ? _mm512_loadu_si512((const void*)(wr + (b) * 64))                                               \
            : _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512((const void*)(wr + ((b) / P) * 64)),     \
                                                 ((b) % P) * BITS), mask))
    // Activation block X (sub-blocks X*BPX ..) with its codes C0 (and C1 when BPX == 2), into chain J.
#define XBLOCK(X, C0, C1, J)                                                                                 \
    do {                                                                                                     \
        const int32_t g_ = gidx[X];                                                                          \
        const float ws_ = SB ? bf16_to_f32(s16[g_]) : s32[g_];                                              \
        for (int i = 0; i < MT_; i++) {                                                                      \
            const int8_t* xp_ = xm[i] + (X) * BPX * 64;                                                      \
            __m512i d_ = _mm512_dpbusd_epi32(_mm512_setzero_si512(), (C0), _mm512_loadu_si512((const void*)xp_)); \
            if (BPX == 2) d_ = _mm512_dpbusd_epi32(d_, (C1), _mm512_loadu_si512((const void*)(xp_ + 64)));   \
            acc[i][J] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d_), _mm512_set1_ps(ws_ * sxm[i][X]), acc[i][J]);  \
        }                                                                                                    \
    } while (0)
    // Main loop: 4 sub-blocks (256 columns) an iteration, whole spans, even/odd activation blocks alternating.
    const int64_t iters = nb / 4;
    for (int64_t it = 0; it < iters; it++) {
        const int64_t b0 = it * 4;
        // Sub-block j of this iteration: span it * (4 / P) + j / P, plane j % P (constants after unrolling, so
        // each span is loaded once and shifted by immediates).
#define LOCODES(j, B)                                                                                        \
    (P == 1 ? _mm512_loadu_si512((const void*)(wr + (b0 + (j)) * 64))                                        \
            : _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512((const void*)(wr + (it * (BITS == 6 ? 3 : 4 / P) \
                                                                                           + (j) / P) * 64)),  \
                                                 ((j) % P) * (B)), mask))
    // 6 bits: plane j of the high part moved to bits 4-5 of each byte (a 16-bit shift; what crosses into the
    // neighbouring byte lands outside 0x30), then (hi & 0x30) | lo in one ternary-logic op.
#define HISHIFT(j) ((j) == 0 ? _mm512_slli_epi16(hs, 4) : (j) == 1 ? _mm512_slli_epi16(hs, 2) \
                    : (j) == 2 ? hs : _mm512_srli_epi16(hs, 2))
#define ITCODES(j) (BITS == 6 ? _mm512_ternarylogic_epi32(HISHIFT(j), mask2, LOCODES(j, 4), 0xEA) : LOCODES(j, BITS))
        const __m512i hs = BITS == 6 ? _mm512_loadu_si512((const void*)(wr + it * 192 + 128)) : _mm512_setzero_si512();
        const __m512i c0 = ITCODES(0), c1 = ITCODES(1), c2 = ITCODES(2), c3 = ITCODES(3);
#undef ITCODES
#undef HISHIFT
#undef LOCODES
        if (BPX == 2) {
            XBLOCK(b0 / 2, c0, c1, 0);
            XBLOCK(b0 / 2 + 1, c2, c3, 1);
        } else {
            XBLOCK(b0, c0, c0, 0);
            XBLOCK(b0 + 1, c1, c1, 1);
            XBLOCK(b0 + 2, c2, c2, 0);
            XBLOCK(b0 + 3, c3, c3, 1);
        }
    }
    for (int64_t x = iters * 4 / BPX; x < nx; x++) {  // rows whose length is not a multiple of 256
        const __m512i c0 = CODES(x * BPX), c1 = BPX == 2 ? CODES(x * BPX + 1) : c0;
        XBLOCK(x, c0, c1, 0);
    }
#undef XBLOCK
#undef CODES
    // The codes' offset (mid) and the zeros, per group: sum_g (zero - mid * scale) * X[m, g], 16 groups at a time.
    const __m512 mid = _mm512_set1_ps((float)(1 << (BITS - 1)));
    for (int i = 0; i < MT_; i++) {
        __m512 t = _mm512_add_ps(acc[i][0], acc[i][1]);
        const float* xs = xsum_g + (xrow ? xrow[m0 + i] : m0 + i) * ng;
        for (int64_t g = 0; g < ng; g += 16) {
            const __mmask16 k = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
            __m512 sc = load16_masked(scales, SB, n * ng + g, k);
            __m512 z = zeros ? load16_masked(zeros, SB, n * ng + g, k) : _mm512_setzero_ps();
            t = _mm512_fmadd_ps(_mm512_fnmadd_ps(mid, sc, z), _mm512_maskz_loadu_ps(k, xs + g), t);
        }
        store_out(out, out_bf16, (m0 + i) * N + n, _mm512_reduce_add_ps(t));
    }
}

static inline __attribute__((always_inline)) void qrows(
    const uint8_t* w, const int BITS, const int SB, const int BPX, int64_t n0, int64_t n1, int64_t M, int64_t K,
    int64_t N, int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const int64_t* xrow, const void* scales, const void* zeros, void* out, int out_bf16) {
    const int64_t rb = K * BITS / 8;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wr = w + n * rb;
        int64_t m0 = 0;
#define QROW(MT_) qrow(wr, BITS, MT_, SB, BPX, n, m0, K, N, ng, xq, sx, xsum_g, gidx, xrow, scales, zeros, out, out_bf16)
        for (; m0 + 4 <= M; m0 += 4) QROW(4);
        switch (M - m0) {
            case 3: QROW(3); break;
            case 2: QROW(2); break;
            case 1: QROW(1); break;
            default: break;
        }
#undef QROW
    }
}

// The activation block: 128 columns when the weight's groups allow it (half the per-block work of 64), else 64.
int ernie45_qgemm_xblock(int64_t K, int64_t group) { return (group % 128 == 0 && K % 128 == 0) ? 128 : 64; }

// Returns 0, or a negative code for arguments the Python side should have rejected.
// Activations quantized once, for one or several weights that read the same x (the experts of a MoE layer).
typedef struct {
    int64_t M, K, XB, nx, group, ng;
    int8_t* xq;
    float *sx, *xsum_g;
    int32_t *sq, *gidx;
} QAct;

static void qact_free(QAct* a) {
    free(a->xq); free(a->sx); free(a->sq); free(a->xsum_g); free(a->gidx);
}

static int qact_init(QAct* a, const void* x, int x_bf16, int64_t M, int64_t K, int64_t group) {
    a->M = M; a->K = K; a->group = group;
    a->XB = ernie45_qgemm_xblock(K, group);
    a->nx = K / a->XB; a->ng = K / group;
    a->xq = (int8_t*)malloc((size_t)(M * K));
    a->sx = (float*)malloc((size_t)(M * a->nx) * sizeof(float));
    a->sq = (int32_t*)malloc((size_t)(M * a->nx) * sizeof(int32_t));
    a->xsum_g = (float*)calloc((size_t)(M * a->ng), sizeof(float));
    a->gidx = (int32_t*)malloc((size_t)a->nx * sizeof(int32_t));
    if (!a->xq || !a->sx || !a->sq || !a->xsum_g || !a->gidx) {
        qact_free(a);
        return -3;
    }
    for (int64_t b = 0; b < a->nx; b++) a->gidx[b] = (int32_t)((b * a->XB) / group);
    quantize_rows(x, x_bf16, M, K, a->XB, a->xq, a->sx, a->sq);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < a->nx; b++)
            a->xsum_g[m * a->ng + a->gidx[b]] += a->sx[m * a->nx + b] * (float)a->sq[m * a->nx + b];
    return 0;
}

// out[i, n] = x[xrow[i], :] . W[n, :] for i < rows (xrow NULL: the identity) and n0 <= n < n1 (out's row stride N).
static void qact_rows(const QAct* a, const int64_t* xrow, int64_t rows, int64_t N, const uint8_t* w, int bits,
                      const void* scales, const void* zeros, int s_bf16, void* out, int out_bf16, int64_t n0, int64_t n1) {
    const int64_t M = rows, K = a->K, ng = a->ng;
    const int8_t* xq = a->xq;
    const float *sx = a->sx, *xsum_g = a->xsum_g;
    const int32_t* gidx = a->gidx;
    if (n0 >= n1) return;
#define QROWS(B, SB, BPX) \
    qrows(w, B, SB, BPX, n0, n1, M, K, N, ng, xq, sx, xsum_g, gidx, xrow, scales, zeros, out, out_bf16)
#define QBITS(SB, BPX) do { if (bits == 4) QROWS(4, SB, BPX); else if (bits == 8) QROWS(8, SB, BPX); \
                            else if (bits == 6) QROWS(6, SB, BPX); else QROWS(2, SB, BPX); } while (0)
    if (s_bf16) {
        if (a->XB == 128) QBITS(1, 2); else QBITS(1, 1);
    } else {
        if (a->XB == 128) QBITS(0, 2); else QBITS(0, 1);
    }
#undef QBITS
#undef QROWS
}

// The whole of W, threads over its rows.
static void qact_matmul(const QAct* a, const int64_t* xrow, int64_t rows, int64_t N, const uint8_t* w, int bits,
                        const void* scales, const void* zeros, int s_bf16, void* out, int out_bf16, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunk = (N + nt - 1) / nt, n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        qact_rows(a, xrow, rows, N, w, bits, scales, zeros, s_bf16, out, out_bf16, n0, n1);
    }
}

static int qgemm_args_ok(int bits, int64_t K, int64_t group) {
    const int64_t span = bits == 6 ? 256 : 64 * (8 / (bits > 0 ? bits : 1));
    return (bits == 8 || bits == 6 || bits == 4 || bits == 2) && K % span == 0 && group % 64 == 0 && K % group == 0;
}

// Several weights that read the same x (q/k/v, gate/up): x quantized once and one parallel region over all their
// rows. args = [Ns (nw), codes, scales, zeros (addresses; zeros 0 = none)]; weight i has Ns[i] rows and writes
// out_i [M, Ns[i]] at out + M * (Ns[0] + .. + Ns[i-1]) elements (the outputs one after another).
int ernie45_qgemm_multi(const void* x, int x_bf16, int64_t M, int64_t K, int64_t nw, const int64_t* args, int bits,
                        int s_bf16, int64_t group, void* out, int out_bf16, int nthreads) {
    if (!qgemm_args_ok(bits, K, group) || M < 1 || nw < 1) return -2;
    const int64_t *Ns = args, *ws = args + nw, *scales = args + 2 * nw, *zeros = args + 3 * nw;
    int64_t total = 0;
    for (int64_t i = 0; i < nw; i++) total += Ns[i];
    QAct a;
    if (qact_init(&a, x, x_bf16, M, K, group)) return -3;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t chunk = (total + nt - 1) / nt, r0 = t * chunk, r1 = r0 + chunk < total ? r0 + chunk : total;
        int64_t lo = 0;
        for (int64_t i = 0; i < nw; lo += Ns[i], i++) {
            const int64_t n0 = r0 > lo ? r0 - lo : 0, n1 = r1 - lo < Ns[i] ? r1 - lo : Ns[i];
            void* oi = (char*)out + M * lo * (out_bf16 ? 2 : 4);
            qact_rows(&a, NULL, M, Ns[i], (const uint8_t*)(intptr_t)ws[i], bits, (const void*)(intptr_t)scales[i],
                      zeros[i] ? (const void*)(intptr_t)zeros[i] : NULL, s_bf16, oi, out_bf16, n0, n1);
        }
    }
    qact_free(&a);
    return 0;
}

int ernie45_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t N, const uint8_t* w, int bits,
                  const void* scales, const void* zeros, int s_bf16, int64_t group, void* out, int out_bf16,
                  int nthreads) {
    if (!qgemm_args_ok(bits, K, group) || M < 1 || N < 1) return -2;
    QAct a;
    if (qact_init(&a, x, x_bf16, M, K, group)) return -3;
    qact_matmul(&a, NULL, M, N, w, bits, scales, zeros, s_bf16, out, out_bf16, nthreads < 1 ? 1 : nthreads);
    qact_free(&a);
    return 0;
}

static inline float round_bf16(float v, int on) { return on ? bf16_to_f32(f32_to_bf16(v)) : v; }

// The MoE helpers shared by qmoe and bmoe. Rows of expert e: the (token, weight) pairs that picked it.
static int64_t expert_rows(const int64_t* idx, const float* wts, int64_t T, int64_t k, int64_t e, int64_t* rows,
                           float* wrow) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++)
            if (idx[t * k + j] == e) { rows[n] = t; wrow[n] = wts[t * k + j]; n++; }
    return n;
}

// silu(gate) * up from h [n, 2I] (gate columns first) into act [n, I] (bf16 bits or fp32), rounding as torch in bf16.
static inline float silu_mul(float g, float u, int bf16) {  // silu(g) * u of (rounded) inputs, torch's roundings
    return round_bf16(round_bf16(g / (1.0f + expf(-g)), bf16) * u, bf16);
}

static void swiglu_rows(const float* h, int64_t n, int64_t I, int bf16, float* act_f32, uint16_t* act_bf16) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < I; c++) {
            float g = round_bf16(h[r * 2 * I + c], bf16), u = round_bf16(h[r * 2 * I + I + c], bf16);
            float a = silu_mul(g, u, bf16);
            if (act_bf16) act_bf16[r * I + c] = f32_to_bf16(a);
            else act_f32[r * I + c] = a;
        }
}

// out[rows[r]] += w[r] * y[r], with the products rounded as torch rounds them in bf16; fp32 sum.
static void scatter_rows(float* out, const int64_t* rows, const float* wrow, const float* y, int64_t n, int64_t H,
                         int bf16) {
    for (int64_t r = 0; r < n; r++) {
        float* o = out + rows[r] * H;
        const float wr = round_bf16(wrow[r], bf16);
        for (int64_t c = 0; c < H; c++) o[c] += round_bf16(round_bf16(y[r * H + c], bf16) * wr, bf16);
    }
}

// Routed experts of one MoE layer for T tokens (decode sizes), the quantized stacks in the span layout:
//   out[t] += sum over t's k experts, ascending, of w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))
// gate_up_e: [2I, H] (gate rows first), down_e: [H, I]; scales/zeros [E, rows, groups] in the scales' dtype.
// With bf16 = 1 every intermediate is rounded to bf16 where the unfused torch path rounds (matmul outputs,
// silu, the product, the weighting); out is fp32 [T, H] (the fp32 sum the torch path also uses), zeroed here.
// One parallel region for the layer: the gate_up rows of all selected experts are split evenly over the threads,
// then the SwiGLU, then the down rows, then the weighted sum by column ranges (each column summed in the same
// order as a serial loop: experts ascending, rows in token order).
int ernie45_qmoe(const void* x, int x_bf16, int64_t T, int64_t H, int64_t I, int64_t k, const int64_t* idx,
                 const float* wts, int64_t E, int bits, int s_bf16, const uint8_t* gu_w, const void* gu_s,
                 const void* gu_z, int64_t gu_group, const uint8_t* dn_w, const void* dn_s, const void* dn_z,
                 int64_t dn_group, int bf16, float* out, int nthreads) {
    if (!qgemm_args_ok(bits, H, gu_group) || !qgemm_args_ok(bits, I, dn_group) || T < 1 || k < 1) return -2;
    for (int64_t j = 0; j < T * k; j++)
        if (idx[j] < 0 || idx[j] >= E) return -4;
    if (nthreads < 1) nthreads = 1;
    const size_t es = s_bf16 ? 2 : 4;
    const int64_t gu_ng = H / gu_group, dn_ng = I / dn_group, S = T * k;  // S: (token, expert) pairs
    QAct xa;
    if (qact_init(&xa, x, x_bf16, T, H, gu_group)) return -3;
    int64_t* rows = (int64_t*)malloc((size_t)S * sizeof(int64_t));   // grouped by expert, ascending
    float* wrow = (float*)malloc((size_t)S * sizeof(float));
    int64_t* ex = (int64_t*)malloc((size_t)(3 * S) * sizeof(int64_t));  // per selected expert: id, first pair, count
    float* h = (float*)malloc((size_t)(S * 2 * I) * sizeof(float));
    float* act = (float*)malloc((size_t)(S * I) * sizeof(float));
    float* y = (float*)malloc((size_t)(S * H) * sizeof(float));
    QAct* aa = (QAct*)calloc((size_t)S, sizeof(QAct));
    if (!rows || !wrow || !ex || !h || !act || !y || !aa) {
        free(rows); free(wrow); free(ex); free(h); free(act); free(y); free(aa); qact_free(&xa);
        return -3;
    }
    int64_t na = 0, off = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = expert_rows(idx, wts, T, k, e, rows + off, wrow + off);
        if (n) { ex[3 * na] = e; ex[3 * na + 1] = off; ex[3 * na + 2] = n; na++; off += n; }
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        // gate_up: the rows [0, na * 2I) of the selected experts' stacked weights, a contiguous share per thread
        const int64_t gn = na * 2 * I, gc = (gn + nt - 1) / nt, g0 = t * gc, g1 = g0 + gc < gn ? g0 + gc : gn;
        for (int64_t j = 0; j < na; j++) {
            const int64_t lo = j * 2 * I, n0 = g0 > lo ? g0 - lo : 0, n1 = g1 - lo < 2 * I ? g1 - lo : 2 * I;
            const int64_t e = ex[3 * j], o = ex[3 * j + 1];
            qact_rows(&xa, rows + o, ex[3 * j + 2], 2 * I, gu_w + e * (2 * I * H * bits / 8), bits,
                      (const char*)gu_s + e * 2 * I * gu_ng * es, gu_z ? (const char*)gu_z + e * 2 * I * gu_ng * es : NULL,
                      s_bf16, h + o * 2 * I, 0, n0, n1);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t j = 0; j < na; j++) {
            const int64_t o = ex[3 * j + 1], n = ex[3 * j + 2];
            swiglu_rows(h + o * 2 * I, n, I, bf16, act + o * I, NULL);
            if (qact_init(&aa[j], act + o * I, 0, n, I, dn_group)) {
#pragma omp atomic write
                bad = 1;
            }
        }
        if (!bad) {
            const int64_t dn = na * H, dc = (dn + nt - 1) / nt, d0 = t * dc, d1 = d0 + dc < dn ? d0 + dc : dn;
            for (int64_t j = 0; j < na; j++) {
                const int64_t lo = j * H, n0 = d0 > lo ? d0 - lo : 0, n1 = d1 - lo < H ? d1 - lo : H;
                const int64_t e = ex[3 * j], o = ex[3 * j + 1];
                qact_rows(&aa[j], NULL, ex[3 * j + 2], H, dn_w + e * (H * I * bits / 8), bits,
                          (const char*)dn_s + e * H * dn_ng * es, dn_z ? (const char*)dn_z + e * H * dn_ng * es : NULL,
                          s_bf16, y + o * H, 0, n0, n1);
            }
#pragma omp barrier
            const int64_t cc = (H + nt - 1) / nt, c0 = t * cc, c1 = c0 + cc < H ? c0 + cc : H;
            for (int64_t tt = 0; tt < T; tt++)
                for (int64_t c = c0; c < c1; c++) out[tt * H + c] = 0.0f;
            for (int64_t p = 0; p < off; p++) {  // pairs in ascending expert order
                float* orow = out + rows[p] * H;
                const float wr = round_bf16(wrow[p], bf16);
                for (int64_t c = c0; c < c1; c++) orow[c] += round_bf16(round_bf16(y[p * H + c], bf16) * wr, bf16);
            }
        }
    }
    for (int64_t j = 0; j < na; j++) qact_free(&aa[j]);
    free(rows); free(wrow); free(ex); free(h); free(act); free(y); free(aa); qact_free(&xa);
    return bad ? -3 : 0;
}

// ------------------------------------------------------------------------------------------ bf16 x bf16
// One chain of VDPBF16PS per (weight row, x row), 32 columns a step, in column order: the same sum whatever
// the tiling, so a row's result does not depend on its batch.
static inline __attribute__((always_inline)) void brow(const uint16_t* wr, const int MT_, int64_t n, int64_t m0,
                                                       const uint16_t* x, int64_t K, int64_t N, void* out,
                                                       int out_bf16) {
    __m512 acc[MT];
    for (int i = 0; i < MT_; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(wr + k));
        for (int i = 0; i < MT_; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], w0, (__m512bh)_mm512_loadu_si512((const void*)(x + (m0 + i) * K + k)));
    }
    for (int i = 0; i < MT_; i++) store_out(out, out_bf16, (m0 + i) * N + n, _mm512_reduce_add_ps(acc[i]));
}

// 4 weight rows x 4 x rows: each loaded vector serves four dot products, so 16 x rows that no longer fit L1
// are read from L2 a quarter as often as by brow. Same per-pair sums as brow.
static inline void btile(const uint16_t* w, int64_t n, int64_t m0, const uint16_t* x, int64_t K, int64_t N, void* out,
                         int out_bf16) {
    __m512 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[4], xv[4];
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(w + (n + j) * K + k));
        for (int i = 0; i < 4; i++) xv[i] = (__m512bh)_mm512_loadu_si512((const void*)(x + (m0 + i) * K + k));
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[j], xv[i]);
    }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) store_out(out, out_bf16, (m0 + i) * N + n + j, _mm512_reduce_add_ps(acc[j][i]));
}

static void bmatmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, void* out, int out_bf16,
                    int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunk = (N + nt - 1) / nt, n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        int64_t n = n0;
        if (M >= 8)  // 4 x 4 tiles where there are enough rows of x to reuse each weight load
            for (; n + 4 <= n1; n += 4) {
                int64_t m0 = 0;
                for (; m0 + 4 <= M; m0 += 4) btile(w, n, m0, x, K, N, out, out_bf16);
                for (int j = 0; j < 4; j++)
                    switch (M - m0) {
                        case 3: brow(w + (n + j) * K, 3, n + j, m0, x, K, N, out, out_bf16); break;
                        case 2: brow(w + (n + j) * K, 2, n + j, m0, x, K, N, out, out_bf16); break;
                        case 1: brow(w + (n + j) * K, 1, n + j, m0, x, K, N, out, out_bf16); break;
                        default: break;
                    }
            }
        for (; n < n1; n++) {
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
}

int ernie45_bgemm(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, void* out, int out_bf16,
                  int nthreads) {
    if (K % 32 || M < 1 || N < 1) return -2;
    bmatmul(x, M, K, N, w, out, out_bf16, nthreads < 1 ? 1 : nthreads);
    return 0;
}

// ernie45_qmoe for bf16 stacks: gate_up [E, 2I, H], down [E, H, I], x [T, H], all bf16; out fp32 [T, H].
// Every intermediate is rounded to bf16 where the per-expert torch path rounds.
int ernie45_bmoe(const uint16_t* x, int64_t T, int64_t H, int64_t I, int64_t k, const int64_t* idx, const float* wts,
                 int64_t E, const uint16_t* gu, const uint16_t* dn, float* out, int nthreads) {
    if (H % 32 || I % 32 || T < 1 || k < 1) return -2;
    for (int64_t j = 0; j < T * k; j++)
        if (idx[j] < 0 || idx[j] >= E) return -4;
    if (nthreads < 1) nthreads = 1;
    const int64_t S = T * k;
    int64_t* rows = (int64_t*)malloc((size_t)S * sizeof(int64_t));
    float* wrow = (float*)malloc((size_t)S * sizeof(float));
    uint16_t* xe = (uint16_t*)malloc((size_t)(S * H) * sizeof(uint16_t));
    float* h = (float*)malloc((size_t)(S * 2 * I) * sizeof(float));
    uint16_t* act = (uint16_t*)malloc((size_t)(S * I) * sizeof(uint16_t));
    float* y = (float*)malloc((size_t)(S * H) * sizeof(float));
    if (!rows || !wrow || !xe || !h || !act || !y) {
        free(rows); free(wrow); free(xe); free(h); free(act); free(y);
        return -3;
    }
    memset(out, 0, (size_t)(T * H) * sizeof(float));
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = expert_rows(idx, wts, T, k, e, rows, wrow);
        if (!n) continue;
        for (int64_t r = 0; r < n; r++) memcpy(xe + r * H, x + rows[r] * H, (size_t)H * sizeof(uint16_t));
        bmatmul(xe, n, H, 2 * I, gu + e * 2 * I * H, h, 0, nthreads);
        swiglu_rows(h, n, I, 1, NULL, act);
        bmatmul(act, n, I, H, dn + e * H * I, y, 0, nthreads);
        scatter_rows(out, rows, wrow, y, n, H, 1);
    }
    free(rows); free(wrow); free(xe); free(h); free(act); free(y);
    return 0;
}

// Softmax of r[0..n) in place, fp32: exp(r - max) times 1 / sum (torch's order of operations).
static void softmax_inplace(float* r, int64_t n) {
    float mx = r[0];
    for (int64_t i = 1; i < n; i++) mx = r[i] > mx ? r[i] : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) { r[i] = expf(r[i] - mx); sum += r[i]; }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) r[i] *= inv;
}

// ------------------------------------------------------------------------------------- decode attention
// One query token per sequence over its paged KV cache, read in place through the block table (no gather):
//   out[s, h, :] = softmax_l(scale * q[s, h] . k[s, l, h / G]) @ v[s, l, h / G],   l < context_len[s]
// q [S, N, D], caches [blocks, P, KV, D] (bf16), block_tables [S, B] int64; fp32 throughout; out [S, N, D] fp32,
// or rounded to bf16 with out_bf16.
int ernie45_decode_attn(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* tables, int64_t B,
                        const int64_t* lens, int64_t S, int64_t N, int64_t KV, int64_t D, int64_t P, float scale,
                        void* out, int out_bf16, int nthreads) {
    if (D % 16 || N % KV || S < 1 || nthreads < 1) return -2;
    const int64_t G = N / KV, V = D / 16;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(| : bad)
    for (int64_t item = 0; item < S * KV; item++) {
        const int64_t s = item / KV, h = item % KV, L = lens[s];
        if (L < 1 || L > B * P) { bad = 1; continue; }
        float* sc = (float*)malloc((size_t)(G * L) * sizeof(float));
        if (!sc) { bad = 1; continue; }
        __m512 qv[8][8];  // G <= 8 query heads per kv head, D <= 128
        const int gn = (int)G, vn = (int)V;
        if (gn > 8 || vn > 8) { free(sc); bad = 1; continue; }
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) qv[g][v] = load16_f32(q, 1, ((s * N + h * G + g) * D) + 16 * v);
        for (int64_t l = 0; l < L; l++) {
            const uint16_t* kr = kc + ((tables[s * B + l / P] * P + l % P) * KV + h) * D;
            __m512 kv[8];
            for (int v = 0; v < vn; v++) kv[v] = load16_f32(kr, 1, 16 * v);
            for (int g = 0; g < gn; g++) {
                __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
                for (int v = 1; v < vn; v++) a = _mm512_fmadd_ps(qv[g][v], kv[v], a);
                sc[g * L + l] = _mm512_reduce_add_ps(a) * scale;
            }
        }
        for (int g = 0; g < gn; g++) softmax_inplace(sc + g * L, L);
        __m512 acc[8][8];
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) acc[g][v] = _mm512_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const uint16_t* vr = vc + ((tables[s * B + l / P] * P + l % P) * KV + h) * D;
            __m512 vv[8];
            for (int v = 0; v < vn; v++) vv[v] = load16_f32(vr, 1, 16 * v);
            for (int g = 0; g < gn; g++) {
                const __m512 p = _mm512_set1_ps(sc[g * L + l]);
                for (int v = 0; v < vn; v++) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
            }
        }
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) {
                const int64_t at = (s * N + h * G + g) * D + 16 * v;
                if (out_bf16) _mm256_storeu_si256((__m256i*)((uint16_t*)out + at), (__m256i)_mm512_cvtneps_pbh(acc[g][v]));
                else _mm512_storeu_ps((float*)out + at, acc[g][v]);
            }
        free(sc);
    }
    return bad ? -4 : 0;
}

// ------------------------------------------------------------------------------------- small decode ops
// The per-layer elementwise work of a decode step, one call each instead of ten torch ops. Each one rounds where
// the torch code it replaces rounds (the file is built with -ffp-contract=off, so a * b + c stays two roundings).

static inline __m512 bf16x16_load(const uint16_t* p) { return load16_f32(p, 1, 0); }

static inline __m512 bf16x16_round(__m512 v) {  // round to bf16 (nearest even) and back to fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// RMSNorm of bf16 rows with a bf16 weight, as the module computes it (spec §2.3):
//   y = bf16(w * bf16(x / sqrt(mean(x^2) + eps)))   (x^2 rounded, summed in fp32; 1 / sqrt as torch's rsqrt)
int ernie45_rmsnorm(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t T, int64_t H, float eps) {
    if (H % 16 || T < 1) return -2;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t* xr = x + t * H;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
            const __m512 v = bf16x16_load(xr + i);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
        const __m512 rv = _mm512_set1_ps(r);
        for (int64_t i = 0; i < H; i += 16) {
            const __m512 y = bf16x16_round(_mm512_mul_ps(bf16x16_load(xr + i), rv));
            _mm256_storeu_si256((__m256i*)(out + t * H + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(bf16x16_load(w + i), y)));
        }
    }
    return 0;
}

// Interleaved RoPE in place on bf16 x [T, NH, D]: pair (2i, 2i+1) of token t rotated by cos/sin[t, i] (fp32):
//   (e, o) -> (bf16(e cos - o sin), bf16(o cos + e sin)), each product and sum rounded in fp32 (spec §2.5).
int ernie45_rope(uint16_t* x, int64_t T, int64_t NH, int64_t D, const float* cs, const float* sn) {
    if (D % 2 || T < 1) return -2;
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < NH; h++) {
            uint16_t* r = x + (t * NH + h) * D;
            for (int64_t i = 0; i < half; i++) {
                const float e = bf16_to_f32(r[2 * i]), o = bf16_to_f32(r[2 * i + 1]);
                const float c = cs[t * half + i], s = sn[t * half + i];
                r[2 * i] = f32_to_bf16(e * c - o * s);
                r[2 * i + 1] = f32_to_bf16(o * c + e * s);
            }
        }
    return 0;
}

// MoE router (spec §2.7) for T rows of x (bf16 or fp32) with an fp32 weight W [E, H] and correction bias [E]:
//   probs = softmax(x W^T) in fp32 (exp(l - max) times 1 / sum, as torch's softmax);
//   idx = the k largest probs + bias, descending (the lower index first on a tie);
//   w = probs[idx] / max(sum of those k, norm_min), summed in idx order; written fp32 or rounded to bf16.
int ernie45_router(const void* x, int x_bf16, const float* W, const float* bias, int64_t T, int64_t H, int64_t E,
                   int64_t k, float norm_min, float* probs, int64_t* idx, void* wout, int w_bf16, int nthreads) {
    if (H % 16 || T < 1 || k < 1 || k > E) return -2;
#pragma omp parallel for schedule(static) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t e = 0; e < E; e++) {
        const float* wr = W + e * H;
        for (int64_t t = 0; t < T; t++) {  // four chains (H % 64 == 0) or one: latency, not bandwidth, bounds one row
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            const int c = H % 64 ? 1 : 4;
            for (int64_t i = 0; i < H; i += 16 * c)
                for (int j = 0; j < c; j++)
                    acc[j] = _mm512_fmadd_ps(load16_f32(x, x_bf16, t * H + i + 16 * j), _mm512_loadu_ps(wr + i + 16 * j),
                                             acc[j]);
            probs[t * E + e] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                                  _mm512_add_ps(acc[2], acc[3])));
        }
    }
    for (int64_t t = 0; t < T; t++) {
        float* p = probs + t * E;
        softmax_inplace(p, E);
        int64_t* it = idx + t * k;
        float wsum = 0.0f;
        for (int64_t j = 0; j < k; j++) {  // selection by repeated maximum: k and E are small (8 of 64)
            int64_t best = -1;
            float bv = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t q = 0; q < j; q++) taken |= it[q] == e;
                const float s = p[e] + bias[e];
                if (!taken && (best < 0 || s > bv)) { best = e; bv = s; }
            }
            it[j] = best;
            wsum += p[best];
        }
        const float den = wsum > norm_min ? wsum : norm_min;
        for (int64_t j = 0; j < k; j++) store_out(wout, w_bf16, t * k + j, p[it[j]] / den);
    }
    return 0;
}

// Store this step's keys and values (bf16 rows of KV * D) at their cache slots; -4 if a slot is outside the cache.
int ernie45_kv_write(const uint16_t* k, const uint16_t* v, uint16_t* kc, uint16_t* vc, const int64_t* slots, int64_t T,
                     int64_t row, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -4;
    for (int64_t t = 0; t < T; t++) {
        memcpy(kc + slots[t] * row, k + t * row, (size_t)row * 2);
        memcpy(vc + slots[t] * row, v + t * row, (size_t)row * 2);
    }
    return 0;
}

// Index of the largest value of each row of x [S, V] (bf16 or fp32), the first one on ties; a NaN counts as the
// largest (the first NaN wins), as torch.argmax.
int ernie45_argmax(const void* x, int x_bf16, int64_t S, int64_t V, int64_t* out) {
    if (V < 1) return -2;
    for (int64_t s = 0; s < S; s++) {
        const int64_t base = s * V, full = V / 16 * 16;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i bidx = _mm512_set1_epi32(-1), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                        14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < full; i += 16) {
            const __m512 v = load16_f32(x, x_bf16, base + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | (_mm512_cmp_epi32_mask(bidx, _mm512_set1_epi32(0), _MM_CMPINT_LT));
            best = _mm512_mask_mov_ps(best, gt, v);
            bidx = _mm512_mask_mov_epi32(bidx, gt, cur);
            cur = _mm512_add_epi32(cur, step);
        }
        float bv = -INFINITY;
        int64_t bi = -1;
        float lanes[16];
        int32_t li[16];
        _mm512_storeu_ps(lanes, best);
        _mm512_storeu_si512(li, bidx);
        for (int j = 0; j < 16; j++)
            if (li[j] >= 0 && (bi < 0 || lanes[j] > bv || (lanes[j] == bv && li[j] < bi))) { bv = lanes[j]; bi = li[j]; }
        for (int64_t i = full; i < V; i++) {
            const float v = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[base + i]) : ((const float*)x)[base + i];
            if (v != v) nan = 1;
            if (bi < 0 || v > bv) { bv = v; bi = i; }
        }
        if (nan) {  // rare: find the first NaN
            for (int64_t i = 0; i < V; i++) {
                const float v = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[base + i]) : ((const float*)x)[base + i];
                if (v != v) { bi = i; break; }
            }
        }
        out[s] = bi;
    }
    return 0;
}

// ------------------------------------------------------------------------------------- a whole decoder layer
// One decode step of a decoder layer of a quantized model (spec §2.2): the calls above in the order of the module
// code, with no Python between them. Every intermediate is rounded to bf16 where the module code (with the small
// native ops) rounds it, so the result is that of the per-op path, up to the SwiGLU's exp (glibc's here, torch's
// vectorised one there: at most a last-place difference in a bf16 activation, rarely).
//   h += o(attention(rope(q(n1)), rope(k(n1)), v(n1)))     n1 = rms_norm(h, in_norm)
//   h += mlp(n2)                                            n2 = rms_norm(h, post_norm)
// mlp: dense SwiGLU, or bf16(routed experts) + shared SwiGLU (spec §2.7). T tokens, each its own sequence
// (a decode-only step of the paged cache): token t attends to the lens[t] cached positions of block table t.

// QSet and LayerPlan: ernie45_kernels.h.

int64_t ernie45_sizeof(const char* name) {
    if (!strcmp(name, "QSet")) return (int64_t)sizeof(QSet);
    if (!strcmp(name, "LayerPlan")) return (int64_t)sizeof(LayerPlan);
    return -1;
}

static int qset_apply(const QSet* s, const uint16_t* x, int64_t M, int64_t K, uint16_t* out, int nthreads) {
    return ernie45_qgemm_multi(x, 1, M, K, s->nw, s->args, (int)s->bits, (int)s->s_bf16, s->group, out, 1, nthreads);
}

static void add_bf16(uint16_t* h, const uint16_t* y, int64_t n) {  // h = bf16(h + y), n % 16 == 0
    for (int64_t i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i*)(h + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(bf16x16_load(h + i), bf16x16_load(y + i))));
}

// SwiGLU of T rows: y = down(bf16(bf16(silu(gate)) * up)), gate and up from one call (the outputs one after another).
static int swiglu_layer(const QSet* gu, const QSet* dn, int64_t W, const uint16_t* x, int64_t T, int64_t H,
                        uint16_t* y, int nthreads) {
    uint16_t* g = (uint16_t*)malloc((size_t)(3 * T * W) * 2);
    if (!g) return -3;
    int rc = qset_apply(gu, x, T, H, g, nthreads);
    uint16_t *u = g + T * W, *act = g + 2 * T * W;
    if (!rc) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < T * W; i++) act[i] = f32_to_bf16(silu_mul(bf16_to_f32(g[i]), bf16_to_f32(u[i]), 1));
        rc = qset_apply(dn, act, T, W, y, nthreads);
    }
    free(g);
    return rc;
}

int ernie45_decode_layer(const LayerPlan* L, uint16_t* h, int64_t T, const float* cs, const float* sn, uint16_t* kc,
                         uint16_t* vc, const int64_t* slots, int64_t num_slots, int64_t P, const int64_t* tables,
                         int64_t B, const int64_t* lens, int nthreads) {
    const int64_t H = L->H, qd = L->NQ * L->D, kd = L->NKV * L->D;
    if (T < 1 || H % 16 || L->D > 128 || L->D % 16 || L->NKV < 1 || L->NQ % L->NKV || L->NQ / L->NKV > 8) return -2;
    if (nthreads < 1) nthreads = 1;
    const int64_t E = L->E, K = L->K;
    uint16_t* buf = (uint16_t*)malloc((size_t)(T * (2 * H + 2 * qd + 2 * kd)) * 2);
    float* mo = (float*)malloc((size_t)(T * (H + E + K)) * sizeof(float));  // routed sum, probs, weights
    int64_t* idx = (int64_t*)malloc((size_t)(T * K + 1) * sizeof(int64_t));
    if (!buf || !mo || !idx) { free(buf); free(mo); free(idx); return -3; }
    uint16_t *x = buf, *y = x + T * H, *q = y + T * H, *k = q + T * qd, *v = k + T * kd, *att = v + T * kd;
    int rc = ernie45_rmsnorm(h, L->in_norm, x, T, H, L->eps);
    if (!rc) rc = qset_apply(&L->qkv, x, T, H, q, nthreads);  // q, k, v one after another
    if (!rc) rc = ernie45_rope(q, T, L->NQ, L->D, cs, sn) | ernie45_rope(k, T, L->NKV, L->D, cs, sn);
    if (!rc) rc = ernie45_kv_write(k, v, kc, vc, slots, T, kd, num_slots);
    if (!rc) rc = ernie45_decode_attn(q, kc, vc, tables, B, lens, T, L->NQ, L->NKV, L->D, P, L->scale, att, 1, nthreads);
    if (!rc) rc = qset_apply(&L->o, att, T, qd, y, nthreads);
    if (!rc) {
        add_bf16(h, y, T * H);
        rc = ernie45_rmsnorm(h, L->post_norm, x, T, H, L->eps);
    }
    if (!rc && E == 0) {
        rc = swiglu_layer(&L->gate_up, &L->down, L->W, x, T, H, y, nthreads);
    } else if (!rc) {
        float *routed = mo, *probs = mo + T * H, *wts = probs + T * E;
        rc = ernie45_router(x, 1, L->router_w, L->router_b, T, H, E, K, L->norm_min, probs, idx, wts, 0, nthreads);
        for (int64_t j = 0; j < T * K; j++) wts[j] = round_bf16(wts[j], 1);  // the router's weights are bf16
        if (!rc) rc = ernie45_qmoe(x, 1, T, H, L->I, K, idx, wts, E, (int)L->ebits, (int)L->es_bf16,
                                   (const uint8_t*)(intptr_t)L->egu[0], (const void*)(intptr_t)L->egu[1],
                                   (const void*)(intptr_t)L->egu[2], L->egu[3], (const uint8_t*)(intptr_t)L->edn[0],
                                   (const void*)(intptr_t)L->edn[1], (const void*)(intptr_t)L->edn[2], L->edn[3], 1,
                                   routed, nthreads);
        if (!rc && L->W) rc = swiglu_layer(&L->gate_up, &L->down, L->W, x, T, H, y, nthreads);
        if (!rc)
            for (int64_t i = 0; i < T * H; i++)  // bf16(routed) + shared, rounded: the module's two bf16 tensors
                y[i] = L->W ? f32_to_bf16(round_bf16(routed[i], 1) + bf16_to_f32(y[i])) : f32_to_bf16(routed[i]);
    }
    if (!rc) add_bf16(h, y, T * H);
    free(buf);
    free(mo);
    free(idx);
    return rc;
}
