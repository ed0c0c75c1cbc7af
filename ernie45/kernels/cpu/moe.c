// Quantized MoE (qmoe): the selected experts of one layer for a decode batch, one parallel region.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

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
static inline float silu_mul(float g, float e, float u, int bf16) {  // silu(g) * u from e = exp(-g), torch's roundings
    return round_bf16(round_bf16(g / (1.0f + e), bf16) * u, bf16);
}

static void swiglu_rows(const float* h, int64_t n, int64_t I, int bf16, float* act_f32, uint16_t* act_bf16) {
    float e[16];
    for (int64_t r = 0; r < n; r++)
        for (int64_t c0 = 0; c0 < I; c0 += 16) {
            const int64_t w = I - c0 < 16 ? I - c0 : 16;
            const float* hg = h + r * 2 * I + c0;
            if (w == 16) {  // exp(-g) 16 at a time (v16_exp_ps), the roundings scalar as in silu_mul
                v16f g = v16_loadu_ps(hg);
                if (bf16) g = v16_castsi_ps(v16_slli_epi32(v16_cvtepu16_epi32(v16_cvtneps_bh(g)), 16));
                v16_storeu_ps(e, v16_exp_ps(v16_mul_ps(g, v16_set1_ps(-1.0f))));
            } else {
                for (int64_t c = 0; c < w; c++) e[c] = expf(-round_bf16(hg[c], bf16));
            }
            for (int64_t c = 0; c < w; c++) {
                const float g = round_bf16(hg[c], bf16), u = round_bf16(hg[I + c], bf16);
                const float a = silu_mul(g, e[c], u, bf16);
                if (act_bf16) act_bf16[r * I + c0 + c] = f32_to_bf16(a);
                else act_f32[r * I + c0 + c] = a;
            }
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
// gate_up_e: [2I, H] (gate rows first), down_e: [H, I]; scales/zeros [E, rows, groups] in the scales' dtype. bits:
// gate_up's, dn_bits: down's (GGUF's Q4_K_M: Q4_K gate and up, Q6_K down in some layers).
// With bf16 = 1 every intermediate is rounded to bf16 where the unfused torch path rounds (matmul outputs,
// silu, the product, the weighting); out is fp32 [T, H] (the fp32 sum the torch path also uses), zeroed here.
// One parallel region for the layer: the gate_up rows of all selected experts are split evenly over the threads,
// then the SwiGLU, then the down rows, then the weighted sum by column ranges (each column summed in the same
// order as a serial loop: experts ascending, rows in token order).
int ernie45_qmoe(const void* x, int x_bf16, int64_t T, int64_t H, int64_t I, int64_t k, const int64_t* idx,
                 const float* wts, int64_t E, int bits, int s_bf16, const uint8_t* gu_w, const void* gu_s,
                 const void* gu_z, int64_t gu_group, const uint8_t* dn_w, const void* dn_s, const void* dn_z,
                 int64_t dn_group, int dn_bits, int bf16, float* out, int nthreads) {
    if (!qgemm_args_ok(bits, H, gu_group) || !qgemm_args_ok(dn_bits, I, dn_group) || !qrows_ok(bits, 2 * I)
        || !qrows_ok(dn_bits, H) || T < 1 || k < 1) return -2;
    for (int64_t j = 0; j < T * k; j++)
        if (idx[j] < 0 || idx[j] >= E) return -4;
    if (nthreads < 1) nthreads = 1;
    const size_t es = s_bf16 ? 2 : 4;
    const int64_t gu_ng = H / gu_group, dn_ng = I / dn_group, S = T * k;  // S: (token, expert) pairs
    QAct xa;
    if (qact_init(&xa, x, x_bf16, T, H, gu_group, bits)) return -3;
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
        const int64_t gn = na * 2 * I, gc = qchunk(gn, nt), g0 = t * gc, g1 = g0 + gc < gn ? g0 + gc : gn;
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
            if (qact_init(&aa[j], act + o * I, 0, n, I, dn_group, dn_bits)) {
#pragma omp atomic write
                bad = 1;
            }
        }
        if (!bad) {
            const int64_t dn = na * H, dc = qchunk(dn, nt), d0 = t * dc, d1 = d0 + dc < dn ? d0 + dc : dn;
            for (int64_t j = 0; j < na; j++) {
                const int64_t lo = j * H, n0 = d0 > lo ? d0 - lo : 0, n1 = d1 - lo < H ? d1 - lo : H;
                const int64_t e = ex[3 * j], o = ex[3 * j + 1];
                qact_rows(&aa[j], NULL, ex[3 * j + 2], H, dn_w + e * (H * I * dn_bits / 8), dn_bits,
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
