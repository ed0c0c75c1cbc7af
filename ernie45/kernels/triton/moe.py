"""Fused Mixture-of-Experts for the token-sorted expert assignment, in two Triton grouped GEMMs.

1. :func:`moe_align` (torch ops on the device, no host synchronisation): the T*K token-expert pairs sorted by
   expert, each expert's run padded to a multiple of ``BLOCK_M`` so that every row block of the GEMMs belongs
   to one expert; the number of valid blocks stays a device tensor and the grid is sized for the worst case
   (blocks past the valid count return at once).
2. gate_up GEMM + SwiGLU: ``act = silu(x @ gate_e^T) * (x @ up_e^T)`` for each pair, gathered from the token's
   row of ``x`` (no sorted copy of the activations), both halves accumulated in one pass over K.
3. down GEMM, multiplied by the pair's routing weight, written at the pair's own index; the K pairs of a token
   are summed in fp32 (the reference's ``index_add_`` accumulates in fp32 too).

The roundings follow the module code (``Experts.forward``): gate/up and the down product rounded to the
activation dtype, SwiGLU in fp32 of the rounded values and rounded, the weighted product rounded.

Weights: dense ``[E, N, K]`` in the activation dtype, or quantized ``codes [E, N, K*bits/8]`` uint8 with
``scales``/``zeros [E, N, G]`` (the portable layout, see the package docstring), 8, 4 or 2 bits.
Shape suffixes: T tokens, K top-k, S pairs (T*K), E experts, H hidden, I expert width, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class ExpertWeight:
    """One stacked expert matrix of logical shape [E, N, K] (N output rows), dense or quantized."""

    data: torch.Tensor                      # [E, N, K] dense, or [E, N, K*bits/8] uint8 codes
    bits: int = 16                          # 16: dense; else 8, 4 or 2
    scales: torch.Tensor | None = None      # [E, N, G]
    zeros: torch.Tensor | None = None       # [E, N, G]
    k: int = 0                              # logical input features (K)

    def __post_init__(self) -> None:
        if self.bits == 16:
            self.k = self.data.shape[-1]
            return
        if self.bits not in (8, 4, 2):
            raise ValueError(f"the Triton MoE takes 8-, 4- or 2-bit codes (or dense weights); got bits={self.bits}")
        if self.scales is None or self.zeros is None:
            raise ValueError("a quantized expert weight needs scales and zeros [E, N, G]")
        self.k = self.data.shape[-1] * 8 // self.bits
        if self.k % self.scales.shape[-1]:
            raise ValueError(f"{self.k} input features do not split into {self.scales.shape[-1]} groups")

    @property
    def n(self) -> int:
        return self.data.shape[1]

    @property
    def group(self) -> int:
        return self.k // self.scales.shape[-1] if self.scales is not None else self.k

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference: [E, N, K] in ``dtype`` (what the kernel computes tile by tile)."""
        if self.bits == 16:
            return self.data.to(dtype)
        per, mask = 8 // self.bits, 2 ** self.bits - 1
        parts = [(self.data >> (self.bits * j)) & mask for j in range(per)]
        codes = torch.stack(parts, dim=-1).flatten(-2).float()               # [E, N, K]
        e, n, k = codes.shape
        g = self.group
        c = codes.view(e, n, k // g, g) - 2 ** (self.bits - 1)
        w = c * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(e, n, k).to(dtype)


def moe_align(idx_TK: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert and padded per expert to ``block_m`` rows, all on the device.

    Returns (pair_ids [M] int32, padded with S = T*K; block_expert [M / block_m] int32; num_blocks [1] int32),
    where M = block_m * (ceil(S / block_m) + min(E, S)) bounds the padded length whatever the routing.
    """
    dev = idx_TK.device
    flat = idx_TK.reshape(-1).long()
    s = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)                         # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                                     # pair ids by expert
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts                                     # first sorted index per expert
    dest = starts[sorted_e] + torch.arange(s, device=dev) - first[sorted_e]
    max_blocks = -(-s // block_m) + min(num_experts, s)
    pair_ids = torch.full((max_blocks * block_m,), s, dtype=torch.int32, device=dev)
    pair_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp(max=num_experts - 1).to(torch.int32)
    num_blocks = (ends[-1:] // block_m).to(torch.int32)
    return pair_ids, block_expert, num_blocks


@triton.jit
def _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n, offs_k, n_lim, k_lim,
                 stride_we, stride_wn, stride_se, stride_sn, group,
                 BITS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of W[e]^T in OUT_DTYPE, dequantized in registers when BITS < 16."""
    mask = (offs_k[:, None] < k_lim) & (offs_n[None, :] < n_lim)
    if BITS == 16:
        w = tl.load(w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask, other=0.0)
        return w.to(OUT_DTYPE)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] // PER,
                       mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs_k[:, None] % PER) * BITS)) & ((1 << BITS) - 1)
        g = offs_k[:, None] // group
        sc = tl.load(s_ptr + e * stride_se + offs_n[None, :] * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        zr = tl.load(z_ptr + e * stride_se + offs_n[None, :] * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        w = (code.to(tl.float32) - (1 << (BITS - 1))) * sc + zr
        return w.to(OUT_DTYPE)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, pair_ptr, block_expert_ptr, num_blocks_ptr,
                    num_pairs, top_k, hidden, width, stride_xt,
                    stride_we, stride_wn, stride_se, stride_sn, group,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    valid = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < hidden), other=0.0)
        wg = _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n, offs_k, width, hidden,
                          stride_we, stride_wn, stride_se, stride_sn, group, BITS, dt)
        wu = _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n + width, offs_k, 2 * width, hidden,
                          stride_we, stride_wn, stride_se, stride_sn, group, BITS, dt)
        acc_g = tl.dot(x, wg, acc_g)
        acc_u = tl.dot(x, wu, acc_u)
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    out_mask = valid[:, None] & (offs_n[None, :] < width)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * width + offs_n[None, :], act.to(dt), mask=out_mask)


@triton.jit
def _down_kernel(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, rw_ptr, pair_ptr, block_expert_ptr, num_blocks_ptr,
                 num_pairs, width, hidden,
                 stride_we, stride_wn, stride_se, stride_sn, group,
                 BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * width + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < width), other=0.0)
        w = _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n, offs_k, hidden, width,
                         stride_we, stride_wn, stride_se, stride_sn, group, BITS, dt)
        acc = tl.dot(a, w, acc)
    rw = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    y = (acc.to(dt).to(tl.float32) * rw[:, None]).to(dt)
    out_mask = valid[:, None] & (offs_n[None, :] < hidden)
    tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + offs_n[None, :], y, mask=out_mask)


def _weight_args(w: ExpertWeight) -> tuple:
    if w.bits == 16:
        return (w.data, w.data, w.data, w.data.stride(0), w.data.stride(1), 0, 0, 1)
    return (w.data, w.scales, w.zeros, w.data.stride(0), w.data.stride(1), w.scales.stride(0), w.scales.stride(1),
            w.group)


def _check(x_TH: torch.Tensor, gate_up: ExpertWeight, down: ExpertWeight) -> None:
    for name, t in (("gate_up", gate_up.data), ("down", down.data)):
        if t.device != x_TH.device or t.stride(-1) != 1:
            raise ValueError(f"fused_moe: the {name} weight must be on {x_TH.device} with unit column stride")
    if gate_up.k != x_TH.shape[-1] or down.n != x_TH.shape[-1] or gate_up.n != 2 * down.k:
        raise ValueError(f"fused_moe: shapes do not chain: x {tuple(x_TH.shape)}, gate_up [E, {gate_up.n}, "
                         f"{gate_up.k}], down [E, {down.n}, {down.k}]")


def fused_moe(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, gate_up: ExpertWeight,
              down: ExpertWeight, block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """The routed experts' weighted sum for every token: [T, H] in x's dtype (see the module docstring)."""
    _check(x_TH, gate_up, down)
    x_TH = x_TH.contiguous()
    t, h = x_TH.shape
    k = idx_TK.shape[1]
    s = t * k
    e = gate_up.data.shape[0]
    width = down.k
    pair_ids, block_expert, num_blocks = moe_align(idx_TK, e, block_m)
    max_blocks = block_expert.numel()
    act = torch.empty((pair_ids.numel(), width), dtype=x_TH.dtype, device=x_TH.device)
    gu_args, dn_args = _weight_args(gate_up), _weight_args(down)
    _gate_up_kernel[(max_blocks, triton.cdiv(width, block_n))](
        x_TH, *gu_args[:3], act, pair_ids, block_expert, num_blocks, s, k, h, width, x_TH.stride(0),
        *gu_args[3:], BITS=gate_up.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    out_S = torch.empty((s, h), dtype=x_TH.dtype, device=x_TH.device)
    rw = w_TK.reshape(-1).to(x_TH.dtype).contiguous()
    _down_kernel[(max_blocks, triton.cdiv(h, block_n))](
        act, *dn_args[:3], out_S, rw, pair_ids, block_expert, num_blocks, s, width, h,
        *dn_args[3:], BITS=down.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out_S.view(t, k, h).float().sum(1).to(x_TH.dtype)


def linear(x_TK: torch.Tensor, w: ExpertWeight, block_m: int = 16, block_n: int = 64, block_k: int = 64
           ) -> torch.Tensor:
    """``x @ W[0]^T`` for a single (E = 1) dense or quantized weight: the quantized ``Linear`` on the GPU, the
    codes dequantized in registers (never a bf16 copy of the weight). [T, K] -> [T, N]."""
    if w.data.shape[0] != 1 or w.k != x_TK.shape[-1]:
        raise ValueError(f"linear: weight [E={w.data.shape[0]}, {w.n}, {w.k}] does not take x {tuple(x_TK.shape)}")
    x_TK = x_TK.contiguous()
    t = x_TK.shape[0]
    out = torch.empty((t, w.n), dtype=x_TK.dtype, device=x_TK.device)
    args = _weight_args(w)
    _linear_kernel[(triton.cdiv(t, block_m), triton.cdiv(w.n, block_n))](
        x_TK, *args[:3], out, t, w.k, w.n, x_TK.stride(0), *args[3:],
        BITS=w.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


@triton.jit
def _linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, rows, k_dim, n_dim, stride_xt,
                   stride_we, stride_wn, stride_se, stride_sn, group,
                   BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
                    mask=(offs_m[:, None] < rows) & (offs_k[None, :] < k_dim), other=0.0)
        w = _load_w_tile(w_ptr, s_ptr, z_ptr, 0, offs_n, offs_k, n_dim, k_dim,
                         stride_we, stride_wn, stride_se, stride_sn, group, BITS, dt)
        acc = tl.dot(x, w, acc)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < n_dim)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * n_dim + offs_n[None, :], acc.to(dt), mask=mask)
