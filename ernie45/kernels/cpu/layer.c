// A whole decoder layer at a decode step (ernie45_decode_layer): quantized or bf16 weights.
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// ------------------------------------------------------------------------------------- a whole decoder layer
// One decode step of a decoder layer (spec §2.2): the calls above in the order of the module code, with no Python
// between them. Weights: quantized span layouts, or bf16 (a QSet of bits 16: bgemm per weight; experts of ebits 16:
// bmoe), as the module path computes each. Every intermediate is rounded to bf16 where the module code (with the small
// native ops) rounds it, so the result is that of the per-op path, up to the SwiGLU's exp (v16_exp_ps here, torch's
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
    if (s->bits == 16) {  // bf16 weights (args: rows, addresses): one bgemm each, the outputs one after another
        for (int64_t i = 0, lo = 0; i < s->nw; lo += s->args[i], i++) {
            const int rc = ernie45_bgemm(x, M, K, s->args[i], (const uint16_t*)(intptr_t)s->args[s->nw + i],
                                         out + M * lo, 1, nthreads);
            if (rc) return rc;
        }
        return 0;
    }
    for (int64_t i = 0, lo = 0; i < s->nw;) {  // runs of weights of one scheme: one qgemm_multi each
        int64_t j = i + 1, rows = s->args[i], sub[16];
        while (j < s->nw && s->wbits[j] == s->wbits[i] && s->wgroup[j] == s->wgroup[i]) rows += s->args[j++];
        for (int64_t f = 0; f < 4; f++)
            for (int64_t w = i; w < j; w++) sub[f * (j - i) + w - i] = s->args[f * s->nw + w];
        const int rc = ernie45_qgemm_multi(x, 1, M, K, j - i, sub, (int)s->wbits[i], (int)s->s_bf16, s->wgroup[i],
                                           out + M * lo, 1, nthreads);
        if (rc) return rc;
        lo += rows;
        i = j;
    }
    return 0;
}

static void add_bf16(uint16_t* h, const uint16_t* y, int64_t n) {  // h = bf16(h + y), n % 16 == 0
    for (int64_t i = 0; i < n; i += 16)
        v16h_storeu((h + i), v16_cvtneps_bh(v16_add_ps(bf16x16_load(h + i), bf16x16_load(y + i))));
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
        for (int64_t i0 = 0; i0 < T * W; i0 += 16) {  // exp(-g) 16 at a time (v16_exp_ps), as the MoE's swiglu_rows
            float e[16];
            const int64_t n = T * W - i0 < 16 ? T * W - i0 : 16;
            if (n == 16) v16_storeu_ps(e, v16_exp_ps(v16_mul_ps(bf16x16_load(g + i0), v16_set1_ps(-1.0f))));
            else for (int64_t j = 0; j < n; j++) e[j] = expf(-bf16_to_f32(g[i0 + j]));
            for (int64_t j = 0; j < n; j++)
                act[i0 + j] = f32_to_bf16(silu_mul(bf16_to_f32(g[i0 + j]), e[j], bf16_to_f32(u[i0 + j]), 1));
        }
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
        if (!rc && L->ebits == 16)
            rc = ernie45_bmoe(x, T, H, L->I, K, idx, wts, E, (const uint16_t*)(intptr_t)L->egu[0],
                              (const uint16_t*)(intptr_t)L->edn[0], routed, nthreads);
        else if (!rc) rc = ernie45_qmoe(x, 1, T, H, L->I, K, idx, wts, E, (int)L->ebits, (int)L->es_bf16,
                                   (const uint8_t*)(intptr_t)L->egu[0], (const void*)(intptr_t)L->egu[1],
                                   (const void*)(intptr_t)L->egu[2], L->egu[3], (const uint8_t*)(intptr_t)L->edn[0],
                                   (const void*)(intptr_t)L->edn[1], (const void*)(intptr_t)L->edn[2], L->edn[3],
                                   (int)L->edn_bits, 1, routed, nthreads);
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
