// bf16 x bf16 matmul (bgemm), the bf16 MoE (bmoe) and the shared softmax.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// ------------------------------------------------------------------------------------------ bf16 x bf16
// One chain of VDPBF16PS per (weight row, x row), 32 columns a step, in column order, reduced by the one tree: the
// same sum whatever the tiling (btile below), so a row's result does not depend on its batch.
static inline __attribute__((always_inline)) void brow(const uint16_t* wr, const int MT_, int64_t n, int64_t m0,
                                                       const uint16_t* x, int64_t K, int64_t N, void* out,
                                                       int out_bf16) {
    v16f acc[MT];
    for (int i = 0; i < MT_; i++) acc[i] = v16_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        v16bh w0 = v16_as_bh(v16_loadu_si((const void*)(wr + k)));
        for (int i = 0; i < MT_; i++)
            acc[i] = v16_dpbf16_ps(acc[i], w0, v16_as_bh(v16_loadu_si((const void*)(x + (m0 + i) * K + k))));
    }
    for (int i = 0; i < MT_; i++) store_out(out, out_bf16, (m0 + i) * N + n, v16_reduce_add_ps(acc[i]));
}

// One weight row against x rows [m0, M): brow over groups of 4, then the rest.
static inline __attribute__((always_inline)) void brow_rows(const uint16_t* wr, int64_t n, int64_t m0, int64_t M,
                                                            const uint16_t* x, int64_t K, int64_t N, void* out,
                                                            int out_bf16) {
    for (; m0 + 4 <= M; m0 += 4) brow(wr, 4, n, m0, x, K, N, out, out_bf16);
    switch (M - m0) {
        case 3: brow(wr, 3, n, m0, x, K, N, out, out_bf16); break;
        case 2: brow(wr, 2, n, m0, x, K, N, out, out_bf16); break;
        case 1: brow(wr, 1, n, m0, x, K, N, out, out_bf16); break;
        default: break;
    }
}

// JW weight rows x MT_ x rows (JW * MT_ <= 16): each loaded vector serves several dot products, and the 16 sums are
// reduced together (v16_reduce16_add_ps: the same tree as brow's, a third of its operations), so a pair's result is
// brow's bit for bit. Pair (j, i) accumulates in acc[j * MT_ + i]; unused accumulators stay zero.
static inline __attribute__((always_inline)) void btile(const uint16_t* w, const int JW, const int MT_, int64_t n,
                                                        int64_t m0, const uint16_t* x, int64_t K, int64_t N,
                                                        void* out, int out_bf16) {
    v16f acc[16];
    for (int s = 0; s < 16; s++) acc[s] = v16_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        v16bh xv[4];
        for (int i = 0; i < MT_; i++) xv[i] = v16_as_bh(v16_loadu_si((const void*)(x + (m0 + i) * K + k)));
        for (int j = 0; j < JW; j++) {
            const v16bh wv = v16_as_bh(v16_loadu_si((const void*)(w + (n + j) * K + k)));
            for (int i = 0; i < MT_; i++) acc[j * MT_ + i] = v16_dpbf16_ps(acc[j * MT_ + i], wv, xv[i]);
        }
    }
    const v16f r = v16_reduce16_add_ps(acc);
    if (MT_ == 1 && JW == 16) {  // 16 consecutive outputs of one row
        if (out_bf16) v16h_storeu((uint16_t*)out + m0 * N + n, v16_to_bf16_ps(r));
        else v16_storeu_ps((float*)out + m0 * N + n, r);
        return;
    }
    float rs[16];
    v16_storeu_ps(rs, r);
    for (int j = 0; j < JW; j++)
        for (int i = 0; i < MT_; i++) store_out(out, out_bf16, (m0 + i) * N + n + j, rs[j * MT_ + i]);
}

// Weight rows [n0, n1) against all M rows of x, in blocks of 16 weight rows: 4 x 4 tiles over the block for each
// group of 4 x rows, then the 1-3 rows left with 16 x 1, 8 x 2 or 4 x 3 tiles over the same block while it is in
// cache (one pass over the weights, which decode reads from DRAM); rows of a partial block by brow. Without BTILES
// (AVX2): 4 x 4 tiles only from 8 rows, brow for the rest.
static void brows(const uint16_t* w, int64_t n0, int64_t n1, const uint16_t* x, int64_t M, int64_t K, int64_t N,
                  void* out, int out_bf16) {
    const int tiles = BTILES || M >= 8;
    const int64_t m4 = tiles ? M / 4 * 4 : 0, rest = M - m4;
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) {
        for (int64_t m0 = 0; m0 < m4; m0 += 4)
            for (int64_t j = 0; j < 16; j += 4) btile(w, 4, 4, n + j, m0, x, K, N, out, out_bf16);
        if (BTILES && rest == 1) {
            btile(w, 16, 1, n, m4, x, K, N, out, out_bf16);
        } else if (BTILES && rest == 2) {
            for (int64_t j = 0; j < 16; j += 8) btile(w, 8, 2, n + j, m4, x, K, N, out, out_bf16);
        } else if (BTILES && rest == 3) {
            for (int64_t j = 0; j < 16; j += 4) btile(w, 4, 3, n + j, m4, x, K, N, out, out_bf16);
        } else if (rest) {
            for (int64_t j = n; j < n + 16; j++) brow_rows(w + j * K, j, m4, M, x, K, N, out, out_bf16);
        }
    }
    for (; n < n1; n++) brow_rows(w + n * K, n, 0, M, x, K, N, out, out_bf16);
}

static void bmatmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, void* out, int out_bf16,
                    int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        // shares of whole 16-row blocks, so that only the last thread's share ends in a partial block
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t blocks = (N + 15) / 16, chunk = (blocks + nt - 1) / nt;
        int64_t n0 = t * chunk * 16, n1 = n0 + chunk * 16 < N ? n0 + chunk * 16 : N;
        if (n0 < n1) brows(w, n0, n1, x, M, K, N, out, out_bf16);
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
