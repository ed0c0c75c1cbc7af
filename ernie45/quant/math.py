"""Pure quantization math: group-wise quantize/dequantize, bit packing, HQQ zero-point optimisation and
the layout of torch's CPU int4 kernel. No modules, no model knowledge.

A quantized weight ``W [..., N, K]`` (N output rows, K input columns; leading dims stack experts) is
``codes [..., N, K]`` (unsigned, 0 .. 2**bits - 1), ``scales [..., N, G]`` and ``offsets [..., N, G]`` with
G = K / group_size groups per row, and

    W[n, k] ~= codes[n, k] * scales[n, k // group_size] + offsets[n, k // group_size].

A symmetric scheme is the special case ``offsets = -2**(bits-1) * scales`` (zero maps exactly to a code);
an asymmetric one stores the group minimum as the offset. Shape suffixes: N rows, K columns, G groups,
P packed bytes per row.
"""

from __future__ import annotations

import torch

INT4_KERNEL_BLOCK_N = 64
"""torch's CPU int4 kernel packs rows in blocks of 64 (see ``to_int4_kernel_layout``)."""
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` accepts."""


BITS = (8, 6, 4, 2)
"""Supported code widths. 6 bits (the ``head_bits=6`` option, the size of llama.cpp's Q6_K) packs as a 4-bit low
part followed by a 2-bit high part (:func:`pack`)."""


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; choose 8, 6, 4 or 2")


def _grouped(w_NK: torch.Tensor, group_size: int) -> torch.Tensor:
    *lead, n, k = w_NK.shape
    if k % group_size:
        raise ValueError(f"a row of {k} columns does not split into groups of {group_size}; "
                         f"choose a group size that divides {k} (or per-channel)")
    return w_NK.reshape(*lead, n, k // group_size, group_size)  # [..., N, G, g]


def quantize_rtn(w_NK: torch.Tensor, bits: int, group_size: int, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization. Returns (codes_NK uint8, scales_NG fp32, offsets_NG fp32).

    group_size: columns per group; ``K`` (the row length) means per-channel.
    symmetric: scale from max |w| and zero exactly representable; otherwise min/max of each group.
    """
    check_bits(bits)
    w = _grouped(w_NK.float(), group_size)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        # Codes -half+1 .. half-1 around the midpoint keep the grid symmetric (int8: -127..127).
        scale = (w.abs().amax(-1, keepdim=True) / (half - 1 if bits > 2 else half)).clamp(min=1e-12)
        offset = -half * scale
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        offset = lo
    codes = ((w - offset) / scale).round_().clamp_(0, qmax)
    return (codes.to(torch.uint8).reshape(w_NK.shape), scale.squeeze(-1), offset.squeeze(-1))


def dequantize(codes_NK: torch.Tensor, scales_NG: torch.Tensor, offsets_NG: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale + offset, groups inferred from the shapes; returns [..., N, K] in ``dtype``."""
    *lead, n, k = codes_NK.shape
    g = k // scales_NG.shape[-1]
    c = codes_NK.reshape(*lead, n, k // g, g).to(dtype)
    return (c * scales_NG[..., None].to(dtype) + offsets_NG[..., None].to(dtype)).reshape(codes_NK.shape)


def dequantize_mid(codes_NK: torch.Tensor, scales_NG: torch.Tensor, zeros_NG: torch.Tensor, bits: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored form: (codes - 2**(bits-1)) * scale + zero, where ``zero`` is the value of the middle code
    (``offset + 2**(bits-1) * scale``). It is what torch's int4 kernel computes, it makes a symmetric zero
    exactly 0, and it needs no arithmetic between layouts, so stored scales/zeros round-trip bit-exactly."""
    *lead, n, k = codes_NK.shape
    g = k // scales_NG.shape[-1]
    c = codes_NK.reshape(*lead, n, k // g, g).to(dtype) - 2 ** (bits - 1)
    return (c * scales_NG[..., None].to(dtype) + zeros_NG[..., None].to(dtype)).reshape(codes_NK.shape)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of the lp (p < 1) error norm (HQQ, eq. 4)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def quantize_hqq(w_NK: torch.Tensor, bits: int, group_size: int, iters: int = 20, p: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-Quadratic Quantization (Badri & Shaji 2023): data-free, optimises each group's zero point
    under an lp (p<1) error norm, which fits the heavy-tailed weight errors that dominate at 2 bits
    better than the min/max grid of RTN. Asymmetric; same outputs as :func:`quantize_rtn`.

    Alternates: codes = round(w/s + z); sparse error e = shrink(w - dequant); z = mean(codes - (w - e)/s).
    Stops at the iteration where the mean absolute error stops falling, keeping the best.
    """
    check_bits(bits)
    w = _grouped(w_NK.float(), group_size)  # [..., N, G, g]
    qmax = 2**bits - 1
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    inv = 1.0 / scale
    zero = -lo * inv  # w = (q - zero) * scale
    best_zero, best_err = zero, float("inf")
    for _ in range(iters):
        q = (w * inv + zero).round_().clamp_(0, qmax)
        w_r = (q - zero) * scale
        err = float((w - w_r).abs().mean())
        if err >= best_err:
            break
        best_zero, best_err = zero, err
        w_e = _shrink_lp(w - w_r, beta, p)
        zero = (q - (w - w_e) * inv).mean(-1, keepdim=True)
        beta *= kappa
    codes = (w * inv + best_zero).round_().clamp_(0, qmax)
    offset = -best_zero * scale
    return codes.to(torch.uint8).reshape(w_NK.shape), scale.squeeze(-1), offset.squeeze(-1)


def quantize_mse(w_NK: torch.Tensor, bits: int, group_size: int, grid: int = 16, refits: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data-free scale/offset optimisation for the squared error (the idea of llama.cpp's k-quants): per
    group, search a shrunken [lo, hi] range (clipping the outliers that stretch a min/max grid, which at 2
    bits leaves most weights on one or two codes), then refit scale and offset by least squares to the
    chosen codes and re-round, a few times. Never worse than RTN on the squared error of any group (RTN's
    range is the first candidate and a refit only lowers the error for fixed codes). Asymmetric.
    """
    check_bits(bits)
    w = _grouped(w_NK.float(), group_size)  # [..., N, G, g]
    qmax = 2**bits - 1
    lo0, hi0 = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)

    def fit(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        codes = ((w - lo) / scale).round_().clamp_(0, qmax)
        err = (codes * scale + lo - w).pow_(2).sum(-1, keepdim=True)
        return codes, scale, lo, err

    codes, scale, offset, err = fit(lo0, hi0)
    for i in range(1, grid):
        shrink = 1.0 - 0.5 * i / grid  # ranges from 100% down to ~53% of the min/max span
        mid = (lo0 + hi0) / 2
        c, s, o, e = fit(mid + (lo0 - mid) * shrink, mid + (hi0 - mid) * shrink)
        better = e < err
        codes, scale, offset, err = (torch.where(better, c, codes), torch.where(better, s, scale),
                                     torch.where(better, o, offset), torch.where(better, e, err))
    for _ in range(refits):
        # least squares w ~ codes * s + o for the current codes, then re-round with the new grid
        cm, wm = codes.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
        var = (codes - cm).pow(2).mean(-1, keepdim=True)
        s_new = torch.where(var > 0, ((codes - cm) * (w - wm)).mean(-1, keepdim=True) / var.clamp(min=1e-12), scale)
        s_new = s_new.clamp(min=1e-12)
        o_new = wm - s_new * cm
        c_new = ((w - o_new) / s_new).round_().clamp_(0, qmax)
        e_new = (c_new * s_new + o_new - w).pow_(2).sum(-1, keepdim=True)
        better = e_new < err
        codes, scale, offset, err = (torch.where(better, c_new, codes), torch.where(better, s_new, scale),
                                     torch.where(better, o_new, offset), torch.where(better, e_new, err))
    return codes.to(torch.uint8).reshape(w_NK.shape), scale.squeeze(-1), offset.squeeze(-1)


# ------------------------------------------------------------------------------------------- packing
def pack(codes_NK: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``8 // bits`` to a byte along K, first column in the lowest bits.
    [..., N, K] uint8 -> [..., N, K * bits / 8] uint8. 6-bit codes: the low 4 bits of every column packed as
    4-bit codes (K/2 bytes), then the high 2 bits as 2-bit codes (K/4 bytes)."""
    check_bits(bits)
    if bits == 8:
        return codes_NK.to(torch.uint8).contiguous()
    if bits == 6:
        c = codes_NK.to(torch.uint8)
        return torch.cat((pack(c & 15, 4), pack(c >> 4, 2)), dim=-1)
    per = 8 // bits
    *lead, n, k = codes_NK.shape
    if k % per:
        raise ValueError(f"{k} columns do not pack {per} to a byte at {bits} bits")
    c = codes_NK.to(torch.uint8).reshape(*lead, n, k // per, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (bits * j)
    return out


def unpack(packed_NP: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: [..., N, P] uint8 -> [..., N, P * 8 / bits] uint8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed_NP
    if bits == 6:
        k = packed_NP.shape[-1] * 4 // 3
        return unpack(packed_NP[..., :k // 2], 4) | (unpack(packed_NP[..., k // 2:], 2) << 4)
    per, mask = 8 // bits, 2**bits - 1
    parts = [(packed_NP >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).flatten(-2)


# ------------------------------------------------------------------------ torch CPU int4 kernel layout
def int4_kernel_ok(n: int, k: int, group_size: int) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` can run an [n, k] weight with this group size."""
    return n % INT4_KERNEL_BLOCK_N == 0 and group_size in INT4_KERNEL_GROUPS and k % group_size == 0


def to_int4_kernel_layout(codes_NK: torch.Tensor) -> torch.Tensor:
    """The byte layout ``_convert_weight_to_int4pack_for_cpu`` produces, by reshapes alone (so it has an
    exact inverse and needs no int32 copy): for each block of 64 rows, K runs of 32 bytes; byte i of a run
    holds row i in its low nibble and row i + 32 in its high nibble. [..., N, K] -> [..., N, K/2] uint8."""
    *lead, n, k = codes_NK.shape
    c = codes_NK.to(torch.uint8).reshape(*lead, n // 64, 2, 32, k).transpose(-1, -3)  # [.., N/64, K, 32, 2]
    return (c[..., 0] | (c[..., 1] << 4)).reshape(*lead, n, k // 2)


def from_int4_kernel_layout(packed_NP: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_int4_kernel_layout`: [..., N, K/2] -> [..., N, K] uint8 codes."""
    *lead, n, half = packed_NP.shape
    k = 2 * half
    p = packed_NP.reshape(*lead, n // 64, k, 32)
    c = torch.stack((p & 15, p >> 4), dim=-1)  # [.., N/64, K, 32, 2]
    return c.transpose(-1, -3).reshape(*lead, n, k)


def int4_scale_zeros(scales_NG: torch.Tensor, zeros_NG: torch.Tensor) -> torch.Tensor:
    """The kernel's ``qScaleAndZeros [..., G, N, 2]`` from middle-code zeros (it computes (q - 8) * s + z)."""
    return torch.stack((scales_NG, zeros_NG), dim=-1).transpose(-2, -3).contiguous()  # [..., G, N, 2]


def int4_split_scale_zeros(sz_GN2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`int4_scale_zeros`: -> (scales_NG, zeros_NG)."""
    return sz_GN2[..., 0].transpose(-1, -2), sz_GN2[..., 1].transpose(-1, -2)
