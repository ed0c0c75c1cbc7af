// Paged decode attention read in place through the block table.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

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
        v16f qv[8][8];  // G <= 8 query heads per kv head, D <= 128
        const int gn = (int)G, vn = (int)V;
        if (gn > 8 || vn > 8) { free(sc); bad = 1; continue; }
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) qv[g][v] = load16_f32(q, 1, ((s * N + h * G + g) * D) + 16 * v);
        for (int64_t l = 0; l < L; l++) {
            const uint16_t* kr = kc + ((tables[s * B + l / P] * P + l % P) * KV + h) * D;
            v16f kv[8];
            for (int v = 0; v < vn; v++) kv[v] = load16_f32(kr, 1, 16 * v);
            for (int g = 0; g < gn; g++) {
                v16f a = v16_mul_ps(qv[g][0], kv[0]);
                for (int v = 1; v < vn; v++) a = v16_fmadd_ps(qv[g][v], kv[v], a);
                sc[g * L + l] = v16_reduce_add_ps(a) * scale;
            }
        }
        for (int g = 0; g < gn; g++) softmax_inplace(sc + g * L, L);
        v16f acc[8][8];
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) acc[g][v] = v16_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const uint16_t* vr = vc + ((tables[s * B + l / P] * P + l % P) * KV + h) * D;
            v16f vv[8];
            for (int v = 0; v < vn; v++) vv[v] = load16_f32(vr, 1, 16 * v);
            for (int g = 0; g < gn; g++) {
                const v16f p = v16_set1_ps(sc[g * L + l]);
                for (int v = 0; v < vn; v++) acc[g][v] = v16_fmadd_ps(p, vv[v], acc[g][v]);
            }
        }
        for (int g = 0; g < gn; g++)
            for (int v = 0; v < vn; v++) {
                const int64_t at = (s * N + h * G + g) * D + 16 * v;
                if (out_bf16) v16h_storeu(((uint16_t*)out + at), v16_cvtneps_bh(acc[g][v]));
                else v16_storeu_ps((float*)out + at, acc[g][v]);
            }
        free(sc);
    }
    return bad ? -4 : 0;
}
