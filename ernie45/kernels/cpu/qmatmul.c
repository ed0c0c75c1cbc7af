// Weight-only quantized matmul (qgemm) in the span layout: activation quantization, VNNI dot products.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// 6 bits: one weight row against MT_ rows of x starting at m0, row by row (the 4 + 2-bit split has no tile layout;
// 8, 4 and 2 bits take qtile below). Per 256 columns (K is a multiple of 256 at 6 bits) the low 4 bits in 128 bytes
// (byte j: column j + 64p in bit-plane p) and the high 2 bits in 64 bytes. MT_, SB (bf16 scales) and BPX (64-column
// sub-blocks per activation block) are compile-time constants after inlining, so the tile's accumulators and pointers
// stay in registers: per activation block, one int32 chain of VPDPBUSD, one conversion, one broadcast and one FMA
// per row of x. GS (16 or 32; 0: groups of 64 columns or more) is a group smaller than the 64-column activation
// block (GGUF's Q6_K, Q5_K, Q5_0): int32 lane l of sub-block j sums columns 64j + 4l .. 64j + 4l + 3, all in one
// group, so each lane takes its own group's scale (one load of the iteration's 256 / GS scales, one permute a
// sub-block) and the lanes are summed at the end as before.
static inline v16i group_lanes(const int GS, int j) {  // lane l of sub-block j: its group among the iteration's
    const int q = 64 / GS, per = 16 / q;  // groups a sub-block, lanes a group
    int v[16];
    for (int l = 0; l < 16; l++) v[l] = q * j + l / per;
    return v16_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13],
                          v[14], v[15]);
}

static inline __attribute__((always_inline)) void qrow6(
    const uint8_t* wr, const int MT_, const int SB, const int BPX, const int GS, int64_t n, int64_t m0, int64_t K, int64_t N,
    int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx, const int64_t* xrow,
    const void* scales, const void* zeros, void* out, int out_bf16) {
    const int64_t nb = K / 64, nx = nb / BPX;
    const v16i mask = v16_set1_epi8(15), mask2 = v16_set1_epi8(0x30);

    const uint16_t* s16 = (const uint16_t*)scales + n * ng;
    const float* s32 = (const float*)scales + n * ng;
    const int8_t* xm[MT];
    const float* sxm[MT];
    v16f acc[MT][2];  // even and odd activation blocks: two FMA chains per row of x
    for (int i = 0; i < MT_; i++) {
        const int64_t r = xrow ? xrow[m0 + i] : m0 + i;  // the x row (output row m0 + i)
        xm[i] = xq + r * K;
        sxm[i] = sx + r * nx;
        acc[i][0] = acc[i][1] = v16_setzero_ps();
    }
    // Activation block X (sub-blocks X*BPX ..) with its codes C0 (and C1 when BPX == 2), into chain J. Codes below
    // 128 take the AVX2 build's shorter exact u8 x s8 dot product (simd.h); the same instruction in the AVX-512 build.
#define XBLOCK(X, C0, C1, J)                                                                                 \
    do {                                                                                                     \
        const int32_t g_ = gidx[X];                                                                          \
        const float ws_ = SB ? bf16_to_f32(s16[g_]) : s32[g_];                                              \
        for (int i = 0; i < MT_; i++) {                                                                      \
            const int8_t* xp_ = xm[i] + (X) * BPX * 64;                                                      \
            v16i d_ = v16_dpbusd_u7_epi32(v16_setzero_si(), (C0), v16_loadu_si((const void*)xp_));         \
            if (BPX == 2) d_ = v16_dpbusd_u7_epi32(d_, (C1), v16_loadu_si((const void*)(xp_ + 64)));        \
            acc[i][J] = v16_fmadd_ps(v16_cvtepi32_ps(d_), v16_set1_ps(ws_ * sxm[i][X]), acc[i][J]);  \
        }                                                                                                    \
    } while (0)
    // The same for a 64-column block X whose lanes carry their own group scales WSV (GS).
#define XBLOCKV(X, C0, WSV, J)                                                                               \
    do {                                                                                                     \
        for (int i = 0; i < MT_; i++) {                                                                      \
            const v16i d_ = v16_dpbusd_u7_epi32(v16_setzero_si(), (C0), v16_loadu_si((const void*)(xm[i] + (X) * 64))); \
            acc[i][J] = v16_fmadd_ps(v16_cvtepi32_ps(d_), v16_mul_ps((WSV), v16_set1_ps(sxm[i][X])), acc[i][J]); \
        }                                                                                                    \
    } while (0)
    v16i gl[4];
    for (int j = 0; j < 4; j++) gl[j] = GS ? group_lanes(GS ? GS : 16, j) : v16_setzero_si();
    // 4 sub-blocks (256 columns) an iteration, even/odd activation blocks alternating.
    for (int64_t it = 0; it < nb / 4; it++) {
        const int64_t b0 = it * 4;
        // Sub-block j: the low part's span j / 2, plane j % 2 (constants after unrolling: each span is loaded once
        // and shifted by immediates), and plane j of the high part moved to bits 4-5 of each byte (a 16-bit shift;
        // what crosses into the neighbouring byte lands outside 0x30), then (hi & 0x30) | lo in one ternary-logic op.
#define LOCODES(j) \
    v16_and_si(v16_srli_epi16(v16_loadu_si((const void*)(wr + it * 192 + ((j) / 2) * 64)), ((j) % 2) * 4), mask)
#define HISHIFT(j) ((j) == 0 ? v16_slli_epi16(hs, 4) : (j) == 1 ? v16_slli_epi16(hs, 2) \
                    : (j) == 2 ? hs : v16_srli_epi16(hs, 2))
#define ITCODES(j) v16_andor_si(HISHIFT(j), mask2, LOCODES(j))
        const v16i hs = v16_loadu_si((const void*)(wr + it * 192 + 128));
        const v16i c0 = ITCODES(0), c1 = ITCODES(1), c2 = ITCODES(2), c3 = ITCODES(3);
#undef ITCODES
#undef HISHIFT
#undef LOCODES
        if (GS) {  // BPX == 1
            const v16f gs = load16_masked(scales, SB, n * ng + it * (256 / (GS ? GS : 16)),
                                          GS == 16 ? (vmask16)0xFFFF : (vmask16)0x00FF);
            XBLOCKV(b0, c0, v16_permutexvar_ps(gl[0], gs), 0);
            XBLOCKV(b0 + 1, c1, v16_permutexvar_ps(gl[1], gs), 1);
            XBLOCKV(b0 + 2, c2, v16_permutexvar_ps(gl[2], gs), 0);
            XBLOCKV(b0 + 3, c3, v16_permutexvar_ps(gl[3], gs), 1);
        } else if (BPX == 2) {
            XBLOCK(b0 / 2, c0, c1, 0);
            XBLOCK(b0 / 2 + 1, c2, c3, 1);
        } else {
            XBLOCK(b0, c0, c0, 0);
            XBLOCK(b0 + 1, c1, c1, 1);
            XBLOCK(b0 + 2, c2, c2, 0);
            XBLOCK(b0 + 3, c3, c3, 1);
        }
    }
#undef XBLOCK
#undef XBLOCKV
    // The codes' offset (mid = 32) and the zeros, per group: sum_g (zero - mid * scale) * X[m, g], 16 groups at a
    // time, each chunk of (zero - mid * scale) computed once for the tile's rows.
    const v16f mid = v16_set1_ps(32.0f);
    v16f t[MT];
    const float* xs[MT];
    for (int i = 0; i < MT_; i++) {
        t[i] = v16_add_ps(acc[i][0], acc[i][1]);
        xs[i] = xsum_g + (xrow ? xrow[m0 + i] : m0 + i) * ng;
    }
    for (int64_t g = 0; g < ng; g += 16) {
        const vmask16 k = ng - g >= 16 ? (vmask16)0xFFFF : (vmask16)((1u << (ng - g)) - 1);
        const v16f sc = load16_masked(scales, SB, n * ng + g, k);
        const v16f z = zeros ? load16_masked(zeros, SB, n * ng + g, k) : v16_setzero_ps();
        const v16f zm = v16_fnmadd_ps(mid, sc, z);
        for (int i = 0; i < MT_; i++) t[i] = v16_fmadd_ps(zm, v16_maskz_loadu_ps(k, xs[i] + g), t[i]);
    }
    for (int i = 0; i < MT_; i++) store_out(out, out_bf16, (m0 + i) * N + n, v16_reduce_add_ps(t[i]));
}

// 8, 4 and 2 bits: one tile of 16 weight rows (n .. n + 15, n a multiple of 16) against MT_ rows of x from m0, in the
// tiled span layout (kernels.to_span): with P = 8 / BITS planes, chunk c (64 bytes) holds columns 4Pc .. 4Pc + 4P - 1
// of the 16 rows, lane l's four bytes row n + l's columns 4Pc + 4p + b in bits [p * BITS, (p + 1) * BITS). One shift
// and one mask unpack a plane: four consecutive columns of each of the 16 rows per int32 lane, so each row of x meets
// it in one VPDPBUSD against four broadcast activation bytes and the int32 lanes are the 16 rows' sums: per activation
// block one conversion and one FMA per row of x for 16 outputs (the row-by-row loop above spends them per output), no
// lane reduction, and 16 results stored at once. Scales and zeros of the tile: [ng][16] in its rows' place
// (kernels.span_scales). Up to QCH2 rows of x (4; 1 in the AVX2 build, 16 registers) each keeps two int32 chains (even
// and odd planes; 8 bits: even and odd chunks), so VPDPBUSD's latency is hidden even for one row. From QPF_ROWS rows
// the loop is paced by compute, and the hardware prefetcher falls behind the weight stream: a software prefetch QPF
// bytes ahead (at 1 row it costs more than it gains), into L2 (PREFETCHT2), whose miss queue keeps more lines in
// flight than L1's: a 4-token int4 MoE layer from DRAM at 1.16-1.27x its 1-token time, against 1.34-1.38x with
// PREFETCHT0 (bench_kernels_ab's "same experts" case).
static inline __attribute__((always_inline)) void qtile(
    const uint8_t* wt, const int BITS, const int MT_, const int SB, const int XBC, int64_t n, int64_t m0, int64_t K,
    int64_t N, int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const int64_t* xrow, const void* scales, const void* zeros, void* out, int out_bf16) {
    const int P = 8 / BITS, CPB = XBC / (4 * P);  // planes; chunks per activation block (64 B each, 4P columns)
    const int64_t XB = XBC, nx = K / XB, so = n * ng;  // so: the tile's first scale
    const int CH = MT_ <= QCH2 ? 2 : 1;
    const v16i mask = v16_set1_epi8((char)((1 << BITS) - 1));
    // Codes below 128 (4/2 bits) take the AVX2 build's shorter exact u8 x s8 dot product (simd.h).
#define TDPBUSD(A, U, S) (BITS == 8 ? v16_dpbusd_epi32((A), (U), (S)) : v16_dpbusd_u7_epi32((A), (U), (S)))
    const int8_t* xm[MT];
    const float* sxm[MT];
    v16f f[MT];
    for (int i = 0; i < MT_; i++) {
        const int64_t r = xrow ? xrow[m0 + i] : m0 + i;
        xm[i] = xq + r * K;
        sxm[i] = sx + r * nx;
        f[i] = v16_setzero_ps();
    }
    for (int64_t X = 0; X < nx; X++) {
        const v16f ws = load16_masked(scales, SB, so + gidx[X] * 16, (vmask16)0xFFFF);
        const uint8_t* wp = wt + X * CPB * 64;
        v16i a[MT], b[MT];
        for (int i = 0; i < MT_; i++) a[i] = b[i] = v16_setzero_si();
        for (int c = 0; c < CPB; c++) {
            if (QPF && MT_ >= QPF_ROWS) __builtin_prefetch(wp + c * 64 + QPF, 0, 1);
            const v16i v = v16_loadu_si((const void*)(wp + c * 64));
            for (int p = 0; p < P; p++) {
                const v16i pl = P == 1 ? v : v16_and_si(p ? v16_srli_epi16(v, p * BITS) : v, mask);
                for (int i = 0; i < MT_; i++) {
                    int32_t xv;
                    memcpy(&xv, xm[i] + X * XB + c * 4 * P + 4 * p, 4);
                    if (CH == 2 && ((c * P + p) & 1)) b[i] = TDPBUSD(b[i], pl, v16_set1_epi32(xv));
                    else a[i] = TDPBUSD(a[i], pl, v16_set1_epi32(xv));
                }
            }
        }
        for (int i = 0; i < MT_; i++) {
            const v16i d = CH == 2 ? v16_add_epi32(a[i], b[i]) : a[i];
            f[i] = v16_fmadd_ps(v16_cvtepi32_ps(d), v16_mul_ps(ws, v16_set1_ps(sxm[i][X])), f[i]);
        }
    }
#undef TDPBUSD
    // The codes' offset (mid) and the zeros: sum_g (zero - mid * scale) * X[m, g], per tile row.
    const v16f mid = v16_set1_ps((float)(1 << (BITS - 1)));
    const float* xs[MT];
    for (int i = 0; i < MT_; i++) xs[i] = xsum_g + (xrow ? xrow[m0 + i] : m0 + i) * ng;
    for (int64_t g = 0; g < ng; g++) {
        const v16f sc = load16_masked(scales, SB, so + g * 16, (vmask16)0xFFFF);
        const v16f z = zeros ? load16_masked(zeros, SB, so + g * 16, (vmask16)0xFFFF) : v16_setzero_ps();
        const v16f zm = v16_fnmadd_ps(mid, sc, z);
        for (int i = 0; i < MT_; i++) f[i] = v16_fmadd_ps(zm, v16_set1_ps(xs[i][g]), f[i]);
    }
    float o[16];
    for (int i = 0; i < MT_; i++) {
        if (!out_bf16) {
            v16_storeu_ps((float*)out + (m0 + i) * N + n, f[i]);
            continue;
        }
        v16_storeu_ps(o, f[i]);
        for (int l = 0; l < 16; l++) store_out(out, 1, (m0 + i) * N + n + l, o[l]);
    }
}

static inline __attribute__((always_inline)) void qrows(
    const uint8_t* w, const int BITS, const int SB, const int XBC, int gs, int64_t n0, int64_t n1, int64_t M, int64_t K,
    int64_t N, int64_t ng, const int8_t* xq, const float* sx, const float* xsum_g, const int32_t* gidx,
    const int64_t* xrow, const void* scales, const void* zeros, void* out, int out_bf16) {
    const int64_t rb = K * BITS / 8;
// The rows of x from m0 to M in tiles: of MT, then one of 4 (where MT is 8), then the last 3, 2 or 1.
#define X_TILES(CALL)                                 \
    for (; m0 + MT <= M; m0 += MT) CALL(MT);          \
    if (MT > 4 && m0 + 4 <= M) { CALL(4); m0 += 4; }  \
    switch (M - m0) {                                 \
        case 3: CALL(3); break;                       \
        case 2: CALL(2); break;                       \
        case 1: CALL(1); break;                       \
        default: break;                               \
    }
    if (BITS != 6) {  // tiles of 16 rows (n0, n1 multiples of 16): each meets every MT rows of x
        for (int64_t n = n0; n < n1; n += 16) {
            int64_t m0 = 0;
#define QTILE(MT_) qtile(w + n * rb, BITS, MT_, SB, XBC, n, m0, K, N, ng, xq, sx, xsum_g, gidx, xrow, scales, zeros, out, out_bf16)
            X_TILES(QTILE)
#undef QTILE
        }
        return;
    }
    if (XBC < 64) return;  // 6 bits: activation blocks of 64 or 128 (ernie45_qgemm_xblock)
    // Blocks of QNB weight rows: each tile of x rows (MT x K bytes, L1-resident) meets the block's rows (from L2)
    // before the next tile is read, instead of every weight row re-reading all M rows of x from L2 (prefill).
    for (int64_t nb = n0; nb < n1; nb += QNB) {
        const int64_t ne = nb + QNB < n1 ? nb + QNB : n1;
        int64_t m0 = 0;
#define QROW6(MT_, GS)                                                                                      \
    for (int64_t n = nb; n < ne; n++)                                                                       \
        qrow6(w + n * rb, MT_, SB, XBC / 64, GS, n, m0, K, N, ng, xq, sx, xsum_g, gidx, xrow, scales, zeros, out, out_bf16)
#define QROW(MT_) QROW6(MT_, 0)
#define QROW16(MT_) QROW6(MT_, 16)
#define QROW32(MT_) QROW6(MT_, 32)
        if (XBC == 64 && gs == 16) { X_TILES(QROW16) }
        else if (XBC == 64 && gs == 32) { X_TILES(QROW32) }
        else { X_TILES(QROW) }
#undef QROW
#undef QROW16
#undef QROW32
#undef QROW6
    }
#undef X_TILES
}

// The activation block: 128 columns when the weight's groups allow it (half the per-block work of 64), else 64; 32 for
// groups of an odd multiple of 32 at 8, 4 and 2 bits (a tile's int32 lanes are rows: a block must not span two
// groups). 6 bits keep 64 for groups of 16 and 32 (qrow6's lanes are columns: each takes its own group's scale).
int ernie45_qgemm_xblock(int64_t K, int64_t group, int bits) {
    if (group % 128 == 0 && K % 128 == 0) return 128;
    return group % 64 == 0 || bits == 6 ? 64 : 32;
}

// Returns 0, or a negative code for arguments the Python side should have rejected.
// Activations quantized once, for one or several weights that read the same x (the experts of a MoE layer).
typedef struct {
    int64_t M, K, XB, nx, group, ng, bits;
    int8_t* xq;
    float *sx, *xsum_g;
    int32_t *sq, *gidx;
} QAct;

static void qact_free(QAct* a) {
    free(a->xq); free(a->sx); free(a->sq); free(a->xsum_g); free(a->gidx);
}

static int qact_init(QAct* a, const void* x, int x_bf16, int64_t M, int64_t K, int64_t group, int bits) {
    a->M = M; a->K = K; a->group = group; a->bits = bits;
    a->XB = ernie45_qgemm_xblock(K, group, bits);
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
    // xsum_g: each group's sum of the quantized x (for the zeros and the codes' offset)
    for (int64_t m = 0; m < M; m++) {
        if (group >= a->XB) {  // whole blocks in a group
            for (int64_t b = 0; b < a->nx; b++)
                a->xsum_g[m * a->ng + a->gidx[b]] += a->sx[m * a->nx + b] * (float)a->sq[m * a->nx + b];
            continue;
        }
        for (int64_t g = 0; g < a->ng; g++) {  // groups of 16 or 32 in a block of 64 (6 bits)
            int32_t s = 0;
            for (int64_t c = g * group; c < (g + 1) * group; c++) s += a->xq[m * K + c];
            a->xsum_g[m * a->ng + g] = a->sx[m * a->nx + g * group / a->XB] * (float)s;
        }
    }
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
    const int gs = bits == 6 && a->group < 64 ? (int)a->group : 0;  // 6 bits: groups of 16 or 32 (qrow6's GS)
#define QROWS(B, SB, XBC) \
    qrows(w, B, SB, XBC, gs, n0, n1, M, K, N, ng, xq, sx, xsum_g, gidx, xrow, scales, zeros, out, out_bf16)
#define QBITS(SB, XBC) do { if (bits == 4) QROWS(4, SB, XBC); else if (bits == 8) QROWS(8, SB, XBC); \
                            else if (bits == 6) QROWS(6, SB, XBC); else QROWS(2, SB, XBC); } while (0)
#define QXB(SB) do { if (a->XB == 128) QBITS(SB, 128); else if (a->XB == 64) QBITS(SB, 64); else QBITS(SB, 32); } while (0)
    if (s_bf16) QXB(1);
    else QXB(0);
#undef QXB
#undef QBITS
#undef QROWS
}

static int qrows_ok(int bits, int64_t N) { return bits == 6 || N % 16 == 0; }  // whole tiles

// A thread's share of `rows` weight rows: a multiple of 16, so tiles are never split between threads.
static int64_t qchunk(int64_t rows, int nt) { return ((rows + nt - 1) / nt + 15) / 16 * 16; }

// The whole of W, threads over its rows.
static void qact_matmul(const QAct* a, const int64_t* xrow, int64_t rows, int64_t N, const uint8_t* w, int bits,
                        const void* scales, const void* zeros, int s_bf16, void* out, int out_bf16, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunk = qchunk(N, nt), n0 = t * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        qact_rows(a, xrow, rows, N, w, bits, scales, zeros, s_bf16, out, out_bf16, n0, n1);
    }
}

// Groups: a multiple of 64 columns; or of 32 at 8, 4 and 2 bits; or 16 or 32 at 6 bits (ernie45_qgemm_xblock).
static int qgemm_args_ok(int bits, int64_t K, int64_t group) {
    const int64_t span = bits == 6 ? 256 : 64 * (8 / (bits > 0 ? bits : 1));
    const int group_ok = group > 0 && (bits == 6 ? group % 64 == 0 || group == 16 || group == 32 : group % 32 == 0);
    return (bits == 8 || bits == 6 || bits == 4 || bits == 2) && K % span == 0 && group_ok && K % group == 0;
}

// Several weights that read the same x (q/k/v, gate/up): x quantized once and one parallel region over all their
// rows. args = [Ns (nw), codes, scales, zeros (addresses; zeros 0 = none)]; weight i has Ns[i] rows and writes
// out_i [M, Ns[i]] at out + M * (Ns[0] + .. + Ns[i-1]) elements (the outputs one after another).
int ernie45_qgemm_multi(const void* x, int x_bf16, int64_t M, int64_t K, int64_t nw, const int64_t* args, int bits,
                        int s_bf16, int64_t group, void* out, int out_bf16, int nthreads) {
    if (!qgemm_args_ok(bits, K, group) || M < 1 || nw < 1) return -2;
    const int64_t *Ns = args, *ws = args + nw, *scales = args + 2 * nw, *zeros = args + 3 * nw;
    int64_t total = 0;
    for (int64_t i = 0; i < nw; i++) {
        if (!qrows_ok(bits, Ns[i])) return -2;
        total += Ns[i];
    }
    QAct a;
    if (qact_init(&a, x, x_bf16, M, K, group, bits)) return -3;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t chunk = qchunk(total, nt), r0 = t * chunk, r1 = r0 + chunk < total ? r0 + chunk : total;
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
    if (!qgemm_args_ok(bits, K, group) || !qrows_ok(bits, N) || M < 1 || N < 1) return -2;
    QAct a;
    if (qact_init(&a, x, x_bf16, M, K, group, bits)) return -3;
    qact_matmul(&a, NULL, M, N, w, bits, scales, zeros, s_bf16, out, out_bf16, nthreads < 1 ? 1 : nthreads);
    qact_free(&a);
    return 0;
}

static inline float round_bf16(float v, int on) { return on ? bf16_to_f32(f32_to_bf16(v)) : v; }
