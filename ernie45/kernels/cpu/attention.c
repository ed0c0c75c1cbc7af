// Paged decode attention read in place through the block table.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// ------------------------------------------------------------------------------------- decode attention
// Softmax of r[0 .. n) in place for the attention: 16 entries at a time with v16_exp_ps (the scalar tail with expf),
// fp32 sums in 16 lanes. A NaN score stays NaN (v16_exp_ps alone would clamp it: d * 0 puts it back).
static void attn_softmax(float* r, int64_t n) {
    const int64_t n16 = n / 16 * 16;
    float mx = -INFINITY;
    if (n16) {
        v16f m = v16_loadu_ps(r);
        for (int64_t i = 16; i < n16; i += 16) m = v16_max_ps(m, v16_loadu_ps(r + i));
        mx = v16_reduce_max_ps(m);
    }
    for (int64_t i = n16; i < n; i++) mx = r[i] > mx ? r[i] : mx;
    const v16f nmx = v16_set1_ps(-mx), zero = v16_setzero_ps();
    v16f vs = zero;
    for (int64_t i = 0; i < n16; i += 16) {
        const v16f d = v16_add_ps(v16_loadu_ps(r + i), nmx);
        const v16f e = v16_add_ps(v16_exp_ps(d), v16_mul_ps(d, zero));
        v16_storeu_ps(r + i, e);
        vs = v16_add_ps(vs, e);
    }
    float sum = n16 ? v16_reduce_add_ps(vs) : 0.0f;
    for (int64_t i = n16; i < n; i++) { r[i] = expf(r[i] - mx); sum += r[i]; }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) r[i] *= inv;
}

// One item of the decode attention: kv head h for the M query tokens s0 .. s0 + M - 1 that read the same cache
// (a verify step's tokens: one block table, lengths lens[s0] + m), each with its G query heads over its own lens[s0 +
// m] positions; VN = D / 16 a compile-time constant after inlining (4 or 8; 0: the runtime vn). Blocks of 16
// positions: their key rows are converted to fp32 once into kf (L1) for all M x G query rows, and each row's 16 dot
// products are summed across lanes in one v16_reduce16_add_ps (the same sums as one v16_reduce_add_ps each); the next
// block's rows are prefetched, and the value rows of this one (read after the softmax), so the cache is not read one
// dependent row at a time. Then the values the same way, each row's 16-lane accumulators kept in acc between blocks.
// A row computes what it would alone (its positions, its order of operations), whatever M is.
static inline __attribute__((always_inline)) void attn_item(
    const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* table, const int64_t* lens, int64_t s0,
    int M, int64_t N, int64_t KV, int64_t D, int64_t P, int64_t h, int gn, const int VN, int vn_rt, float scale,
    float* sc, int64_t L16, float* kf, void* out, int out_bf16) {
    const int vn = VN ? VN : vn_rt;
    const int64_t L = lens[s0 + M - 1];  // the longest (lengths grow with m)
#define ROW(c, l) ((c) + ((table[(l) / P] * P + (l) % P) * KV + h) * D)
    for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int nl = L - l0 < 16 ? (int)(L - l0) : 16;
        for (int j = 0; j < nl; j++) {
            const uint16_t* kr = ROW(kc, l0 + j);
            if (l0 + 16 + j < L) {
                const char* nk = (const char*)ROW(kc, l0 + 16 + j);
                for (int64_t b = 0; b < D * 2; b += 64) __builtin_prefetch(nk + b, 0, 3);
            }
            const char* vr = (const char*)ROW(vc, l0 + j);
            for (int64_t b = 0; b < D * 2; b += 64) __builtin_prefetch(vr + b, 0, 1);
            for (int v = 0; v < vn; v++) v16_storeu_ps(kf + j * D + 16 * v, load16_f32(kr, 1, 16 * v));
        }
        for (int m = 0; m < M; m++) {
            const int64_t Lm = lens[s0 + m];
            if (l0 >= Lm) continue;
            const int nm = Lm - l0 < 16 ? (int)(Lm - l0) : 16;
            for (int g = 0; g < gn; g++) {
                const uint16_t* qg = q + ((s0 + m) * N + h * gn + g) * D;
                v16f qv[8], part[16];
                for (int v = 0; v < vn; v++) qv[v] = load16_f32(qg, 1, 16 * v);
                for (int j = 0; j < nm; j++) {
                    v16f a = v16_mul_ps(qv[0], v16_loadu_ps(kf + j * D));
                    for (int v = 1; v < vn; v++) a = v16_fmadd_ps(qv[v], v16_loadu_ps(kf + j * D + 16 * v), a);
                    part[j] = a;
                }
                for (int j = nm; j < 16; j++) part[j] = v16_setzero_ps();
                v16_storeu_ps(sc + (m * gn + g) * L16 + l0,
                              v16_mul_ps(v16_reduce16_add_ps(part), v16_set1_ps(scale)));
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int g = 0; g < gn; g++) attn_softmax(sc + (m * gn + g) * L16, lens[s0 + m]);
    float* acc = kf + 16 * D;  // [M * gn][D] fp32
    for (int64_t i = 0; i < M * gn * D; i++) acc[i] = 0.0f;
    for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int nl = L - l0 < 16 ? (int)(L - l0) : 16;
        for (int j = 0; j < nl; j++) {
            if (l0 + 16 + j < L) {
                const char* nv = (const char*)ROW(vc, l0 + 16 + j);
                for (int64_t b = 0; b < D * 2; b += 64) __builtin_prefetch(nv + b, 0, 3);
            }
            const uint16_t* vr = ROW(vc, l0 + j);
            for (int v = 0; v < vn; v++) v16_storeu_ps(kf + j * D + 16 * v, load16_f32(vr, 1, 16 * v));
        }
        for (int r = 0; r < M * gn; r++) {  // query row r: token r / gn, head r % gn
            const int64_t Lm = lens[s0 + r / gn];
            if (l0 >= Lm) continue;
            const int nm = Lm - l0 < 16 ? (int)(Lm - l0) : 16;
            v16f a[8];
            for (int v = 0; v < vn; v++) a[v] = v16_loadu_ps(acc + r * D + 16 * v);
            for (int j = 0; j < nm; j++) {
                const v16f p = v16_set1_ps(sc[r * L16 + l0 + j]);
                for (int v = 0; v < vn; v++) a[v] = v16_fmadd_ps(p, v16_loadu_ps(kf + j * D + 16 * v), a[v]);
            }
            for (int v = 0; v < vn; v++) v16_storeu_ps(acc + r * D + 16 * v, a[v]);
        }
    }
#undef ROW
    for (int r = 0; r < M * gn; r++)
        for (int v = 0; v < vn; v++) {
            const int64_t at = ((s0 + r / gn) * N + h * gn + r % gn) * D + 16 * v;
            const v16f a = v16_loadu_ps(acc + r * D + 16 * v);
            if (out_bf16) v16h_storeu(((uint16_t*)out + at), v16_cvtneps_bh(a));
            else v16_storeu_ps((float*)out + at, a);
        }
}

// The most query tokens of one sequence an item of the decode attention takes together (a verify step's k + 1).
#define ATTN_GROUP 8

// One query token per sequence over its paged KV cache, read in place through the block table (no gather):
//   out[s, h, :] = softmax_l(scale * q[s, h] . k[s, l, h / G]) @ v[s, l, h / G],   l < context_len[s]
// q [S, N, D], caches [blocks, P, KV, D] (bf16), block_tables [S, B] int64; fp32 throughout; out [S, N, D] fp32,
// or rounded to bf16 with out_bf16. Consecutive tokens whose lengths grow by one and whose block tables agree on
// the blocks they read (a speculative verify step's tokens, run as decode rows) form one group of up to ATTN_GROUP:
// its items read each cached row once for all of them. Items (group, kv head) over the threads (attn_item).
int ernie45_decode_attn(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* tables, int64_t B,
                        const int64_t* lens, int64_t S, int64_t N, int64_t KV, int64_t D, int64_t P, float scale,
                        void* out, int out_bf16, int nthreads) {
    if (D % 16 || D > 128 || N % KV || N / KV > 8 || S < 1 || nthreads < 1) return -2;
    for (int64_t s = 0; s < S; s++)
        if (lens[s] < 1 || lens[s] > B * P) return -4;
    const int64_t G = N / KV;
    int64_t* first = (int64_t*)malloc((size_t)(S + 1) * sizeof(int64_t));  // group i: tokens first[i] .. first[i+1]-1
    if (!first) return -3;
    int64_t ng = 0;
    for (int64_t s = 0; s < S; s++) {
        int join = 0;
        if (s > 0 && s - first[ng - 1] < ATTN_GROUP && lens[s] == lens[s - 1] + 1) {
            const int64_t used = (lens[s - 1] + P - 1) / P;  // the blocks the previous token reads
            join = !memcmp(tables + s * B, tables + (s - 1) * B, (size_t)used * sizeof(int64_t));
        }
        if (!join) first[ng++] = s;
    }
    first[ng] = S;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(| : bad)
    for (int64_t item = 0; item < ng * KV; item++) {
        const int64_t i = item / KV, h = item % KV, s0 = first[i], M = first[i + 1] - s0;
        const int64_t L16 = (lens[s0 + M - 1] + 15) / 16 * 16;
        // scores [M G][L16] (rows padded to 16: whole vectors stored), 16 converted rows [16][D], accumulators [M G][D]
        float* sc = (float*)malloc((size_t)(M * G * L16 + (16 + M * G) * D) * sizeof(float));
        if (!sc) { bad = 1; continue; }
        float* kf = sc + M * G * L16;
        const int64_t* table = tables + (s0 + M - 1) * B;  // the longest token's: the others agree on their blocks
        if (D == 128)
            attn_item(q, kc, vc, table, lens, s0, (int)M, N, KV, D, P, h, (int)G, 8, 8, scale, sc, L16, kf, out,
                      out_bf16);
        else if (D == 64)
            attn_item(q, kc, vc, table, lens, s0, (int)M, N, KV, D, P, h, (int)G, 4, 4, scale, sc, L16, kf, out,
                      out_bf16);
        else
            attn_item(q, kc, vc, table, lens, s0, (int)M, N, KV, D, P, h, (int)G, 0, (int)(D / 16), scale, sc, L16,
                      kf, out, out_bf16);
        free(sc);
    }
    free(first);
    return bad ? -3 : 0;
}
