"""ggml's block types as ernie45.quant weights: decode a GGUF tensor's raw blocks to (codes, scales, zeros) in our
middle-code form, and encode our codes back to blocks.

Our stored form is ``w = (code - 2**(bits-1)) * scale + zero`` per group of a row (``quant.math.dequantize_mid``).
The block layouts are ggml's (``ggml-common.h`` / ``ggml-quants.c``; gguf-py's ``quants.py`` implements the same in
numpy, and the tests hold ours to its ``dequantize``):

- ``Q8_0``: 32 weights, ``d`` (f16) then 32 int8 ``q``; w = d * q -> int8 g32 symmetric: code = q + 128, scale = d,
  zero = 0. Exact.
- ``Q4_0``: 32 weights, ``d`` (f16), 16 bytes (weight j in the low nibble of byte j, weight j + 16 in its high
  nibble); w = d * (q - 8) -> int4 g32 symmetric: code = q, scale = d, zero = 0. Exact.
- ``Q4_1``: as Q4_0 plus ``m`` (f16); w = d * q + m -> int4 g32: scale = d, zero = m + 8 d.
- ``Q4_K``: super-blocks of 256 = 8 groups of 32: ``d``, ``dmin`` (f16), 12 bytes of 6-bit group scales and mins,
  128 bytes of nibbles; w = d * sc * q - dmin * m -> int4 g32 asymmetric: scale = d sc, zero = 8 d sc - dmin m.
- ``Q5_0``: 32 weights, ``d``, 32 high bits, 16 bytes of nibbles; w = d * (q - 16) -> 6-bit g32: scale = d,
  zero = 16 d (a 5-bit code held in 6 bits: 20% more storage, no loss).
- ``Q5_K``: as Q4_K with a fifth bit per weight (32 bytes); w = d * sc * q - dmin * m -> 6-bit g32 asymmetric:
  scale = d sc, zero = 32 d sc - dmin m.
- ``Q6_K``: super-blocks of 256 = 16 groups of 16: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8
  group scales, ``d`` (f16); w = d * sc * (q - 32) -> 6-bit g16 symmetric: code = q, scale = d sc, zero = 0.

All products above are exact in fp32 (an f16 times a 6- or 8-bit integer), so with ``dtype=float32`` scales the
conversion is bit-exact against ggml's dequantization; with bf16 scales (the default compute dtype) each scale
and zero is rounded to bf16 (8 significant bits; relative error <= 2**-9 per group). Other types
(``Q5_1``, ``Q2_K``, ``Q3_K``, IQ*) have no exact counterpart here: ``to_float`` dequantizes them with
gguf-py and the loader requantizes them (see ``gguf.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ernie45.quant.scheme import TensorScheme

# ggml type ids (ggml.h enum ggml_type); gguf-py names them GGMLQuantizationType.
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 8, 12, 13, 14, 30
EXACT: dict[int, TensorScheme] = {
    Q8_0: TensorScheme(8, 32, symmetric=True),
    Q4_0: TensorScheme(4, 32, symmetric=True),
    Q4_1: TensorScheme(4, 32),
    Q4_K: TensorScheme(4, 32),
    Q5_0: TensorScheme(6, 32, symmetric=True),
    Q5_K: TensorScheme(6, 32),
    Q6_K: TensorScheme(6, 16, symmetric=True),
}
"""The ggml types that map onto one of our schemes without loss (``decode``), and that scheme."""
BLOCK: dict[int, tuple[int, int]] = {Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22),
                                     Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
"""(weights, bytes) of one block."""


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per value (little endian) -> fp32; b [..., 2] -> [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Low nibbles of ``qs`` [..., m] into ``out[..., 0, :]``, high nibbles into ``out[..., 1, :]``."""
    np.bitwise_and(qs, 15, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])


def decode(raw: torch.Tensor, qtype: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw blocks of rows of ``k`` weights, ``[..., N, k / block * bytes]`` uint8 -> (codes [..., N, K] uint8,
    scales [..., N, G] fp32, zeros [..., N, G] fp32) in our middle-code form for ``EXACT[qtype]``.

    Vectorised in numpy over every block of the input at once (any number of rows or experts; no loop per block):
    byte-wise ops on small trailing dims run several times faster in numpy than in torch's CPU kernels."""
    codes, scales, zeros, _ = _decode(raw, qtype, k)
    return codes, scales, zeros


OFFSET = {Q8_0: 128, Q4_0: 8, Q5_0: 16, Q6_K: 32}
"""The types whose weights are ``scale * (code - offset)`` in ggml's own arithmetic."""


def dequantize(raw: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Raw blocks (as :func:`decode` takes them) of an ``EXACT`` type -> fp32 weights [..., N, K], computed in
    ggml's order (``d * sc * q - dmin * m`` for the K-quants, ``d * q + m`` for Q4_1), so bit for bit what ggml and
    gguf-py's ``dequantize`` give; several times faster than the latter (one vectorised pass over the blocks)."""
    codes, scales, _, mins = _decode(raw, qtype, k)
    *lead, n, _ = codes.shape
    g = scales.shape[-1]
    q = codes.reshape(*lead, n, g, k // g).float()
    s = scales[..., None]
    if mins is None:
        w = s * (q - OFFSET[qtype])
    elif qtype == Q4_1:
        w = s * q + mins[..., None]
    else:  # Q4_K, Q5_K: codes are q, mins dmin * m
        w = s * q - mins[..., None]
    return w.reshape(*lead, n, k)


def _decode(raw: torch.Tensor, qtype: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor | None]:
    """:func:`decode`, plus ggml's own additive term per group for the asymmetric types (Q4_1's ``m``, the
    K-quants' ``dmin * m``; None for the others)."""
    if qtype not in EXACT:
        raise ValueError(f"ggml type {qtype} has no exact ernie45 scheme")
    qk, nbytes = BLOCK[qtype]
    if k % qk:
        raise ValueError(f"rows of {k} weights do not split into ggml blocks of {qk}")
    *lead, n, _ = raw.shape
    nb = k // qk
    b = raw.numpy().reshape(*lead, n, nb, nbytes)  # [..., N, B, bytes]
    t = torch.from_numpy
    if qtype == Q8_0:  # code = q + 128: flipping the sign bit of the int8 byte
        d = _f16(b[..., 0:2])
        codes = np.bitwise_xor(b[..., 2:], np.uint8(128))
        return t(codes.reshape(*lead, n, k)), t(d), t(np.zeros_like(d)), None
    if qtype in (Q4_0, Q4_1):  # weights 0..15 in the low nibbles of the 16 bytes, 16..31 in the high
        d = _f16(b[..., 0:2])
        codes = np.empty((*lead, n, nb, 2, 16), np.uint8)
        _nibbles(b[..., 2:18] if qtype == Q4_0 else b[..., 4:20], codes)
        m = None if qtype == Q4_0 else _f16(b[..., 2:4])
        zeros = np.zeros_like(d) if qtype == Q4_0 else m + 8 * d
        return t(codes.reshape(*lead, n, k)), t(d), t(zeros), None if m is None else t(m)
    if qtype == Q5_0:  # d, 4 bytes of high bits (bit j: weight j, little endian), 16 bytes of nibbles
        d = _f16(b[..., 0:2])
        codes = np.empty((*lead, n, nb, 2, 16), np.uint8)
        _nibbles(b[..., 6:22], codes)
        high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little").reshape(codes.shape)
        codes |= high << 4
        return t(codes.reshape(*lead, n, k)), t(d), t(16 * d), None  # 6-bit codes around 32: (q - 32) d + 16 d
    if qtype in (Q4_K, Q5_K):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [..., N, B, 1]
        s = b[..., 4:16]
        sc = np.empty((*lead, n, nb, 2, 4), np.uint8)  # groups 0-3 from the low 6 bits, 4-7 from the rest
        mn = np.empty_like(sc)
        np.bitwise_and(s[..., 0:4], 63, out=sc[..., 0, :])
        np.bitwise_and(s[..., 4:8], 63, out=mn[..., 0, :])
        sc[..., 1, :] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
        mn[..., 1, :] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        scale = d * sc.reshape(*lead, n, nb, 8)  # fp32: an f16 times a 6-bit integer is exact
        codes = np.empty((*lead, n, nb, 4, 2, 32), np.uint8)  # group 2i: low nibbles of 32 bytes, 2i+1: high
        _nibbles(b[..., -128:].reshape(*lead, n, nb, 4, 32), codes)
        if qtype == Q5_K:  # qh[32]: bit g of byte l is the fifth bit of weight l of group g
            bits = np.unpackbits(b[..., 16:48], axis=-1, bitorder="little").reshape(*lead, n, nb, 32, 8)
            codes |= np.swapaxes(bits, -1, -2).reshape(codes.shape) << 4
        dm = dmin * mn.reshape(*lead, n, nb, 8)  # exact: an f16 times a 6-bit integer
        zeros = (32 if qtype == Q5_K else 8) * scale - dm
        return (t(codes.reshape(*lead, n, k)), t(scale.reshape(*lead, n, -1)), t(zeros.reshape(*lead, n, -1)),
                t(dm.reshape(*lead, n, -1)))
    # Q6_K: 128 bytes of low nibbles, 64 of 2-bit high pairs, 16 int8 group scales, d
    sc = b[..., 192:208].view(np.int8)  # [..., N, B, 16]
    d = _f16(b[..., 208:210])[..., None]
    ql = b[..., 0:128].reshape(*lead, n, nb, 2, 2, 32)  # [half, first/second 32 bytes, l]
    qh = b[..., 128:192].reshape(*lead, n, nb, 2, 1, 32)
    codes = np.empty((*lead, n, nb, 2, 2, 2, 32), np.uint8)  # [half, nibble, first/second, l]: rows l, 32+l, ..
    np.bitwise_and(ql, 15, out=codes[..., 0, :, :])
    np.right_shift(ql, 4, out=codes[..., 1, :, :])
    codes = codes.reshape(*lead, n, nb, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    codes |= ((qh >> shifts) & 3) << 4
    scale = (d * sc).reshape(*lead, n, -1)
    return t(codes.reshape(*lead, n, k)), t(scale), t(np.zeros_like(scale)), None


def encode(codes: torch.Tensor, scales: torch.Tensor, qtype: int) -> np.ndarray:
    """Our symmetric g32 codes (int8: 0..255 around 128; int4: 0..15 around 8) with fp scales -> Q8_0 / Q4_0
    blocks, [..., N, K / 32 * bytes] uint8. The scales are stored as f16 (exact for bf16 scales in f16's normal
    range, 6e-5 .. 65504)."""
    *lead, n, k = codes.shape
    d16 = scales.float().to(torch.float16).contiguous().reshape(-1)  # 1-D: a dtype view needs stride 1
    d = d16.view(torch.uint8).reshape(*lead, n, k // 32, 2)  # little-endian f16 bytes
    c = codes.contiguous().reshape(*lead, n, k // 32, 32)
    if qtype == Q8_0:
        q = (c.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    elif qtype == Q4_0:
        q = c[..., :16] | (c[..., 16:] << 4)
    else:
        raise ValueError(f"encode writes Q8_0 or Q4_0, not ggml type {qtype}")
    return torch.cat((d, q), dim=-1).reshape(*lead, n, -1).numpy()


def to_float(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Any ggml type -> fp32 tensor of ``shape`` (torch order): ``EXACT`` types by :func:`dequantize`, the others
    through gguf-py's own dequantization."""
    if qtype in EXACT:
        return dequantize(torch.from_numpy(np.ascontiguousarray(raw)).reshape(*shape[:-1], -1), qtype,
                          shape[-1]).reshape(shape)
    if qtype == F32:
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).reshape(shape))
    if qtype == F16:
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).reshape(shape)).float()
    if qtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).reshape(shape)).view(torch.bfloat16).float()
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(gguf_dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype).reshape(shape))
