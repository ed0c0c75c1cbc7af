// Small decode ops: RMSNorm, RoPE, router, KV write, argmax.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// ------------------------------------------------------------------------------------- small decode ops
// The per-layer elementwise work of a decode step, one call each instead of ten torch ops. Each one rounds where
// the torch code it replaces rounds (the file is built with -ffp-contract=off, so a * b + c stays two roundings).

static inline v16f bf16x16_load(const uint16_t* p) { return load16_f32(p, 1, 0); }

static inline v16f bf16x16_round(v16f v) {  // round to bf16 (nearest even) and back to fp32
    return v16_castsi_ps(v16_slli_epi32(v16_cvtepu16_epi32(v16_cvtneps_bh(v)), 16));
}

// RMSNorm of bf16 rows with a bf16 weight, as the module computes it (spec §2.3):
//   y = bf16(w * bf16(x / sqrt(mean(x^2) + eps)))   (x^2 rounded, summed in fp32; 1 / sqrt as torch's rsqrt)
int ernie45_rmsnorm(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t T, int64_t H, float eps) {
    if (H % 16 || T < 1) return -2;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t* xr = x + t * H;
        v16f acc = v16_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
            const v16f v = bf16x16_load(xr + i);
            acc = v16_add_ps(acc, v16_mul_ps(v, v));
        }
        const float r = 1.0f / sqrtf(v16_reduce_add_ps(acc) / (float)H + eps);
        const v16f rv = v16_set1_ps(r);
        for (int64_t i = 0; i < H; i += 16) {
            const v16f y = bf16x16_round(v16_mul_ps(bf16x16_load(xr + i), rv));
            v16h_storeu((out + t * H + i), v16_cvtneps_bh(v16_mul_ps(bf16x16_load(w + i), y)));
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
            v16f acc[4] = {v16_setzero_ps(), v16_setzero_ps(), v16_setzero_ps(), v16_setzero_ps()};
            const int c = H % 64 ? 1 : 4;
            for (int64_t i = 0; i < H; i += 16 * c)
                for (int j = 0; j < c; j++)
                    acc[j] = v16_fmadd_ps(load16_f32(x, x_bf16, t * H + i + 16 * j), v16_loadu_ps(wr + i + 16 * j),
                                             acc[j]);
            probs[t * E + e] = v16_reduce_add_ps(v16_add_ps(v16_add_ps(acc[0], acc[1]),
                                                                  v16_add_ps(acc[2], acc[3])));
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
        v16f best = v16_set1_ps(-INFINITY);
        v16i bidx = v16_set1_epi32(-1), cur = v16_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                        14, 15);
        const v16i step = v16_set1_epi32(16);
        vmask16 nan = 0;
        for (int64_t i = 0; i < full; i += 16) {
            const v16f v = load16_f32(x, x_bf16, base + i);
            nan |= v16_cmpunord_ps_mask(v, v);
            const vmask16 gt = v16_cmpgt_ps_mask(v, best) | (v16_cmplt_epi32_mask(bidx, v16_set1_epi32(0)));
            best = v16_mask_mov_ps(best, gt, v);
            bidx = v16_mask_mov_epi32(bidx, gt, cur);
            cur = v16_add_epi32(cur, step);
        }
        float bv = -INFINITY;
        int64_t bi = -1;
        float lanes[16];
        int32_t li[16];
        v16_storeu_ps(lanes, best);
        v16_storeu_si(li, bidx);
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
