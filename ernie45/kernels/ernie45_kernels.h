// ernie45 native CPU kernels: every exported function and struct, in one place.
//
// The Python side (ernie45/kernels/__init__.py) mirrors these with ctypes: the argument lists of each function
// and the two structs (QSet, LayerPlan), whose sizes it checks against ernie45_sizeof() when it loads the library.
// Change a signature or a struct here and there together. Every function returns 0, or a negative code for
// arguments the Python side should have rejected (-2 shapes, -3 memory, -4 an index out of range).
//
// Shapes: bf16 values are uint16_t; "x_bf16"/"out_bf16"/"s_bf16" flags say bf16 (1) or fp32 (0) for a void*.
#ifndef ERNIE45_KERNELS_H
#define ERNIE45_KERNELS_H

#include <stdint.h>

// ---------------------------------------------------------------------------------------------- structs
typedef struct {  // weights that read one input: quantized (span layout: ernie45_qgemm_multi's arguments) or bf16
                  // (bits 16: rows[nw], weights[nw] [rows, K]; s_bf16, wbits, wgroup unused)
    int64_t nw, bits, s_bf16;  // bits: 16 for bf16 weights, else the first weight's (each weight's in wbits)
    int64_t args[16];  // rows[nw], codes[nw], scales[nw], zeros[nw] (addresses; 0 = no zeros), nw <= 4
    int64_t wbits[4], wgroup[4];  // quantized: each weight's bits and group (a GGUF Q4_K_M's v_proj is Q6_K, q and k
                                  // Q4_K): a run of one scheme is one ernie45_qgemm_multi
} QSet;

typedef struct {  // one decoder layer for ernie45_decode_layer: shapes and the addresses of its weights
    int64_t H, NQ, NKV, D;          // hidden size; query and kv heads; head dim
    int64_t E, K, I, W;             // experts (0: a dense layer), top-k, expert width; SwiGLU width (0: none)
    float eps, scale, norm_min, unused;
    const uint16_t *in_norm, *post_norm;  // bf16 [H]
    const float *router_w, *router_b;     // fp32 [E, H], [E]
    QSet qkv, o, gate_up, down;     // gate_up / down: the dense MLP, or the shared experts of a MoE layer
    int64_t ebits, es_bf16;         // routed experts: bits (16: bf16 stacks, gu [E, 2I, H], dn [E, H, I]), scales in bf16
    int64_t egu[4], edn[4];         // codes (bf16: the stack), scales, zeros (0: none), group of the gate_up and down stacks
    int64_t edn_bits;               // the down stack's bits (ebits but for mixed-bit experts; 16 with ebits 16)
} LayerPlan;

// sizeof of a struct by name ("QSet", "LayerPlan"); -1 for another name. The ctypes mirrors are checked with it.
int64_t ernie45_sizeof(const char* name);

// ------------------------------------------------------------------------------------------- matmuls
// Columns per activation scale of qgemm: 128 when the weight's groups allow it, else 64; 32 for groups of 32 (8/4/2 bits).
int ernie45_qgemm_xblock(int64_t K, int64_t group, int bits);
// out[M, N] = x[M, K] @ W^T for a weight-only quantized W in the span layout (8/6/4/2 bits).
int ernie45_qgemm(const void* x, int x_bf16, int64_t M, int64_t K, int64_t N, const uint8_t* w, int bits,
                  const void* scales, const void* zeros, int s_bf16, int64_t group, void* out, int out_bf16,
                  int nthreads);
// Several span weights of one scheme reading the same x (args as QSet.args); outputs one after another.
int ernie45_qgemm_multi(const void* x, int x_bf16, int64_t M, int64_t K, int64_t nw, const int64_t* args, int bits,
                        int s_bf16, int64_t group, void* out, int out_bf16, int nthreads);
// out[M, N] = x[M, K] @ w[N, K]^T, bf16 in, fp32 accumulation; K % 32 == 0.
int ernie45_bgemm(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, void* out, int out_bf16,
                  int nthreads);

// ----------------------------------------------------------------------------------------------- MoE
// The selected experts of T tokens (idx/wts [T, k]) with span-layout quantized stacks; out [T, H] fp32.
int ernie45_qmoe(const void* x, int x_bf16, int64_t T, int64_t H, int64_t I, int64_t k, const int64_t* idx,
                 const float* wts, int64_t E, int bits, int s_bf16, const uint8_t* gu_w, const void* gu_s,
                 const void* gu_z, int64_t gu_group, const uint8_t* dn_w, const void* dn_s, const void* dn_z,
                 int64_t dn_group, int dn_bits, int bf16, float* out, int nthreads);
// The same for bf16 stacks gu [E, 2I, H], dn [E, H, I].
int ernie45_bmoe(const uint16_t* x, int64_t T, int64_t H, int64_t I, int64_t k, const int64_t* idx, const float* wts,
                 int64_t E, const uint16_t* gu, const uint16_t* dn, float* out, int nthreads);
// Top-k router: fp32 logits/softmax probs [T, E], idx [T, k] of probs + bias, weights renormalised over the k.
int ernie45_router(const void* x, int x_bf16, const float* W, const float* bias, int64_t T, int64_t H, int64_t E,
                   int64_t k, float norm_min, float* probs, int64_t* idx, void* wout, int w_bf16, int nthreads);

// ----------------------------------------------------------------------------------------- attention
// One query per row q [S, N, D] over the paged cache [blocks, P, KV, D] through tables [S, B], lens [S].
int ernie45_decode_attn(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int64_t* tables, int64_t B,
                        const int64_t* lens, int64_t S, int64_t N, int64_t KV, int64_t D, int64_t P, float scale,
                        void* out, int out_bf16, int nthreads);
// cache.view(-1, row)[slots] = k / v for T rows of `row` values.
int ernie45_kv_write(const uint16_t* k, const uint16_t* v, uint16_t* kc, uint16_t* vc, const int64_t* slots, int64_t T,
                     int64_t row, int64_t num_slots);

// ------------------------------------------------------------------------------------------ small ops
int ernie45_rmsnorm(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t T, int64_t H, float eps);
// Interleaved RoPE in place on x [T, NH, D] with fp32 cos/sin [T, D/2].
int ernie45_rope(uint16_t* x, int64_t T, int64_t NH, int64_t D, const float* cs, const float* sn);
// out[S] = argmax of each row of x [S, V] (first index on ties, NaN largest).
int ernie45_argmax(const void* x, int x_bf16, int64_t S, int64_t V, int64_t* out);

// ----------------------------------------------------------------------------------- the fused layer
// One decoder layer on h [T, H] (bf16, in place) of a decode step: T rows, row t attending through tables[t] to
// lens[t] positions of the layer's cache kc/vc after its k/v are written at slots[t].
int ernie45_decode_layer(const LayerPlan* L, uint16_t* h, int64_t T, const float* cs, const float* sn, uint16_t* kc,
                         uint16_t* vc, const int64_t* slots, int64_t num_slots, int64_t P, const int64_t* tables,
                         int64_t B, const int64_t* lens, int nthreads);

// ----------------------------------------------------------------------------------------- benchmarks
// The int32 lanes of buf summed into *out, every byte read once (bytes % 256 == 0): a pure streaming read.
int ernie45_stream_read(const void* buf, int64_t bytes, int64_t* out, int nthreads);

#endif
