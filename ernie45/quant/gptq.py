"""GPTQ (Frantar et al. 2022): calibrated quantization with error feedback, run layer by layer.

:func:`quantize_gptq` quantizes one weight: columns are rounded one at a time and each column's rounding error
is spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs (H = X^T X
over calibration tokens), so the layer's *output* error is minimised rather than the weight error. Each group's
grid comes from a clipping search weighted by the Hessian's diagonal, and once the codes are fixed the scales
and offsets are refitted by least squares on the same output error.

:func:`calibrate` is the pipeline around it (the paper's, and AutoGPTQ's "true sequential" order): the
calibration tokens' hidden states go through the model one decoder layer at a time; inside a layer the weights
are quantized in the order the forward reads them (q/k/v, o, the MLP's inputs, its down projections), each
group's Hessian measured with every earlier weight *already quantized*, and the next layer sees the quantized
layer's outputs. A routed expert's Hessian comes from the tokens routed to it, shrunk towards the average of
its layer's experts (a prior worth ``PRIOR_TOKENS`` tokens): with 2,048 calibration tokens, 8 experts and
top-2 an expert sees ~500 tokens for a 256-wide input, and its raw Hessian overfits those tokens. An expert
no token reached gets the average alone.

What each part is worth on the bundled demo model: ``benchmarks/results/2026-12-04-gptq-int2.md``.

Shape suffixes: N out rows, K in columns, G groups, T tokens, H hidden, E experts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.model.moe import Experts
from ernie45.quant.math import check_bits

log = logging.getLogger(__name__)

DAMP = 0.01
"""Damping added to the Hessian's diagonal, as a fraction of its mean (the paper's 1%)."""
PRIOR_TOKENS = 64.0
"""Weight, in tokens, of the layer-average Hessian mixed into each routed expert's own (shrinkage)."""
CLIP_GRID = 20
"""Clipping ratios tried per group by the grid search (from 1.0 down to 0.525 of the min/max range)."""


# ------------------------------------------------------------------------------------------ one weight
def _stored_grid(s: torch.Tensor, o: torch.Tensor, qmax: int, dtype: torch.dtype | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset as the module stores them: scale and middle-code zero (offset + mid * scale) rounded to
    ``dtype`` (``QWeight.set``), so the error feedback compensates exactly what inference computes."""
    if dtype is None:
        return s, o
    mid = (qmax + 1) // 2
    s = s.to(dtype).float()
    return s, (o + mid * s).to(dtype).float() - mid * s


def _group_grid(w_Ng: torch.Tensor, d_g: torch.Tensor, qmax: int, search: bool, grid_dtype: torch.dtype | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N], offset [N]) of one group of columns [N, g]: the min/max grid, or (search) the clipped grid
    with the lowest rounding error weighted by ``d_g`` [g] (the Hessian's diagonal: how much each input column
    moves the output)."""
    lo0, hi0 = w_Ng.amin(1), w_Ng.amax(1)
    best = None
    for i in range(CLIP_GRID if search else 1):
        r = 1.0 - 0.5 * i / CLIP_GRID
        s, o = _stored_grid(((hi0 - lo0) * r / qmax).clamp(min=1e-12), lo0 * r, qmax, grid_dtype)
        s = s.clamp(min=1e-12)
        q = ((w_Ng - o[:, None]) / s[:, None]).round().clamp(0, qmax)
        e = ((q * s[:, None] + o[:, None] - w_Ng).pow(2) * d_g).sum(1)  # [N]
        if best is None:
            best = (s, o, e)
        else:
            better = e < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((s, o, e), best, strict=True))
    return best[0], best[1]


def _refit(w_NK: torch.Tensor, codes_NK: torch.Tensor, h_KK: torch.Tensor, scales_NG: torch.Tensor,
           offsets_NG: torch.Tensor, group_size: int, qmax: int, grid_dtype: torch.dtype | None,
           rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scales and offsets for fixed codes: per row, the 2G values that minimise the output error
    (w - q)^T H (w - q) with q_k = code_k * s_g(k) + o_g(k) (the normal equations of a [K, 2G] design). A row
    whose solution is singular or has a non-positive scale keeps its grid."""
    n, k = codes_NK.shape
    g = k // group_size
    onehot_KG = torch.zeros(k, g, device=w_NK.device)
    onehot_KG[torch.arange(k), torch.arange(k) // group_size] = 1.0
    s_out, o_out = scales_NG.clone(), offsets_NG.clone()
    for r0 in range(0, n, rows):  # [R, K, 2G] designs, a block of rows at a time
        c_RK = codes_NK[r0:r0 + rows]
        a = torch.cat((c_RK[..., None] * onehot_KG, onehot_KG.expand(c_RK.shape[0], k, g)), dim=-1)
        ha = torch.einsum("kl,rla->rka", h_KK, a)
        lhs = torch.einsum("rka,rkb->rab", a, ha)  # [R, 2G, 2G]
        rhs = torch.einsum("rka,rk->ra", ha, w_NK[r0:r0 + rows])
        sol, info = torch.linalg.solve_ex(lhs, rhs)
        s, o = _stored_grid(sol[:, :g], sol[:, g:], qmax, grid_dtype)
        ok = (info == 0)[:, None] & (s > 0) & torch.isfinite(s) & torch.isfinite(o)
        ok = ok.all(1, keepdim=True)  # a row's groups are fitted jointly: take all or none of them
        s_out[r0:r0 + rows] = torch.where(ok, s, s_out[r0:r0 + rows])
        o_out[r0:r0 + rows] = torch.where(ok, o, o_out[r0:r0 + rows])
    return s_out, o_out


def _inverse_factor(h_KK: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of the damped H^-1 (the paper's reformulation); the damping grows tenfold up to
    three times if H is not positive definite in fp32. None if it never is."""
    k = h_KK.shape[0]
    eye = torch.eye(k, device=h_KK.device)
    mean = torch.diag(h_KK).mean()
    for _ in range(4):
        low, info = torch.linalg.cholesky_ex(h_KK + damp * mean * eye)
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info == 0:
                return u
        damp *= 10
    return None


@torch.no_grad()
def quantize_gptq(w_NK: torch.Tensor, hess_KK: torch.Tensor | None, bits: int, group_size: int,
                  damp: float = DAMP, act_order: bool = False, search: bool = True, refit: bool = True,
                  grid_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one weight -> (codes [N, K] uint8, scales [N, G], offsets [N, G]) as ``math.quantize_rtn``.

    hess_KK: X^T X of the weight's inputs. None (no calibration token reached it) rounds to nearest on the
        group grid (the searched one with ``search``, on the weights' own squared error).
    damp: added to H's diagonal, as a fraction of its mean.
    act_order: quantize columns in descending Hessian diagonal. Groups must stay contiguous columns (the stored
        layout), so each group's grid is then fixed up front from the original weights ("static groups");
        otherwise a group's grid is taken from the error-updated weights when its first column comes up.
        Off by default: on the demo model static grids lose more than the order gains (results file).
    search: each group's grid from a clipping search weighted by H's diagonal instead of the plain min/max.
    refit: once all codes are fixed, refit the scales and offsets by least squares on the output error.
    grid_dtype: the dtype the module stores scales and zeros in (rounded as it will be).
    """
    check_bits(bits)
    w = w_NK.float().clone()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"a row of {k} columns does not split into groups of {group_size}")
    qmax = 2**bits - 1
    g = k // group_size
    scales, offsets = torch.empty(n, g, device=w.device), torch.empty(n, g, device=w.device)
    u = None
    if hess_KK is not None:
        h = hess_KK.float().clone()
        dead = torch.diag(h) == 0  # inputs that were always zero: their weights never matter
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        diag = torch.diag(h) + damp * torch.diag(h).mean()
        perm = torch.argsort(diag, descending=True) if act_order else torch.arange(k, device=w.device)
        u = _inverse_factor(h[perm][:, perm], damp)  # [K, K] in quantization order
        if u is None:
            log.warning("a Hessian stays singular after damping; rounding that weight to nearest")
    if u is None:
        ones = torch.ones(group_size, device=w.device)
        for j in range(g):
            sl = slice(j * group_size, (j + 1) * group_size)
            scales[:, j], offsets[:, j] = _group_grid(w[:, sl], ones, qmax, search, grid_dtype)
        codes = ((w.view(n, g, group_size) - offsets[..., None]) / scales[..., None]).round().clamp(0, qmax)
        return codes.reshape(n, k).to(torch.uint8), scales, offsets
    if act_order:  # static groups: every grid from the original weights, before any column moves
        for j in range(g):
            sl = slice(j * group_size, (j + 1) * group_size)
            scales[:, j], offsets[:, j] = _group_grid(w[:, sl], diag[sl], qmax, search, grid_dtype)
    w = w[:, perm]
    group_of = perm // group_size  # [K] group of each (permuted) column
    codes = torch.empty(n, k, device=w.device)
    block = group_size * max(1, 128 // group_size)  # whole groups: a group's grid sees all earlier updates
    for b0 in range(0, k, block):  # the paper's lazy batch updates: the same result, fewer passes over w
        b1 = min(b0 + block, k)
        err_NB = torch.empty(n, b1 - b0, device=w.device)
        for i in range(b0, b1):
            j = int(group_of[i])
            if not act_order and i % group_size == 0:
                sl = slice(i, i + group_size)  # perm is the identity here
                scales[:, j], offsets[:, j] = _group_grid(w[:, sl], diag[sl], qmax, search, grid_dtype)
            s, o = scales[:, j], offsets[:, j]
            col = w[:, i]
            q = ((col - o) / s).round().clamp(0, qmax)
            codes[:, i] = q
            e = (col - (q * s + o)) / u[i, i]  # [N]
            w[:, i + 1:b1] -= e[:, None] * u[i, i + 1:b1][None, :]
            err_NB[:, i - b0] = e
        w[:, b1:] -= err_NB @ u[b0:b1, b1:]
    codes = codes[:, torch.argsort(perm)]
    if refit:
        h_damped = h + damp * torch.diag(h).mean() * torch.eye(k, device=h.device)
        w0 = w_NK.float().masked_fill(dead[None, :], 0.0)
        scales, offsets = _refit(w0, codes, h_damped, scales, offsets, group_size, qmax, grid_dtype)
    return codes.to(torch.uint8), scales, offsets


# --------------------------------------------------------------------------------- Hessian collection
class _Stat:
    """A running X^T X (fp32) of one weight's inputs and the number of rows it holds."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.rows = 0

    def add(self, x_TK: torch.Tensor) -> None:
        x = x_TK.reshape(-1, x_TK.shape[-1]).float()
        self.xtx = x.t() @ x if self.xtx is None else self.xtx.addmm_(x.t(), x)
        self.rows += x.shape[0]


def _expert_hessians(stats: list[_Stat], prior_tokens: float) -> list[torch.Tensor | None]:
    """Each expert's X^T X plus ``prior_tokens`` tokens' worth of its layer's per-token average (the average
    alone for an expert no token reached; all None if none was reached)."""
    seen = [s for s in stats if s.xtx is not None]
    if not seen:
        return [None] * len(stats)
    mean = sum(s.xtx for s in seen) / sum(s.rows for s in seen)
    return [prior_tokens * mean if s.xtx is None else s.xtx + prior_tokens * mean for s in stats]


def _recording_forward(m: Experts, gate_up: list[_Stat] | None, down: list[_Stat] | None) -> Callable:
    """``Experts.forward`` (one expert at a time, fp32 sum) that also records each expert's inputs."""

    def forward(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e in range(m.num_experts):
            tok, slot = (idx_TK == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            x = x_TH[tok]
            if gate_up is not None:
                gate_up[e].add(x)
            gate, up = F.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
            hid = F.silu(gate) * up
            if down is not None:
                down[e].add(hid)
            y = F.linear(hid, m.down_proj[e]) * w_TK[tok, slot, None].to(hid.dtype)
            out_TH.index_add_(0, tok, y.float())
        return out_TH.to(x_TH.dtype)

    return forward


@contextmanager
def _recording(targets: dict[str, nn.Module]) -> Iterator[dict[str, list[_Stat]]]:
    """While the block runs, record X^T X of each target's inputs: {key: [one _Stat]} for a Linear, {key: [one
    per expert]} for an ``Experts`` projection (keys ``<name>.gate_up_proj`` / ``<name>.down_proj``)."""
    stats: dict[str, list[_Stat]] = {}
    handles, patched = [], []
    for key, m in targets.items():
        if isinstance(m, nn.Linear):
            stats[key] = [_Stat()]
            handles.append(m.register_forward_pre_hook(lambda mod, args, st=stats[key][0]: st.add(args[0])))
        elif isinstance(m, Experts):
            stats[key] = [_Stat() for _ in range(m.num_experts)]
    for m in {m for m in targets.values() if isinstance(m, Experts)}:
        name = next(k for k, v in targets.items() if v is m).rpartition(".")[0]
        m.forward = _recording_forward(m, stats.get(f"{name}.gate_up_proj"), stats.get(f"{name}.down_proj"))
        patched.append(m)  # an instance attribute shadowing the method, for this pass only
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


# ------------------------------------------------------------------------------------------- pipeline
def _targets(layer: nn.Module, prefix: str, names: set[str]) -> dict[str, nn.Module]:
    """The weights of ``layer`` to quantize, by key: a Linear by its qualified name, each projection of an
    ``Experts`` as ``<name>.gate_up_proj`` / ``<name>.down_proj``."""
    out: dict[str, nn.Module] = {}
    for sub, m in layer.named_modules():
        name = prefix + sub
        if name not in names:
            continue
        if isinstance(m, Experts):
            out[f"{name}.gate_up_proj"] = out[f"{name}.down_proj"] = m
        elif isinstance(m, nn.Linear):
            out[name] = m
        else:
            raise TypeError(f"{name}: GPTQ calibrates Linear and Experts modules, not {type(m).__name__}")
    return out


def _stages(run_probe: Callable[[], object], targets: dict[str, nn.Module]) -> list[list[str]]:
    """The targets grouped by the tensor they read, in the order the forward reads them (one probe run):
    q/k/v together, then o, then the MLP's inputs, then its down projections."""
    first: dict[str, int] = {}  # key -> id of its input
    keep: list[torch.Tensor] = []  # hold the inputs so their ids stay unique during the probe

    def seen(key: str, x: torch.Tensor) -> None:
        if key not in first:
            keep.append(x)
            first[key] = id(x)

    handles, patched = [], []
    for key, m in targets.items():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(lambda mod, args, key=key: seen(key, args[0])))
        elif m not in patched:
            name = key.rpartition(".")[0]

            def forward(x_TH, idx_TK, w_TK, m=m, name=name):  # noqa: ANN001, ANN202
                seen(f"{name}.gate_up_proj", x_TH[:1])  # the experts read rows of x, then their hidden states
                gate, up = F.linear(x_TH[:1], m.gate_up_proj[0]).chunk(2, dim=-1)
                seen(f"{name}.down_proj", F.silu(gate) * up)
                return Experts.forward(m, x_TH, idx_TK, w_TK)

            m.forward = forward
            patched.append(m)
    try:
        run_probe()
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
    stages: dict[int, list[str]] = {}
    for key, xid in first.items():
        stages.setdefault(xid, []).append(key)
    missing = sorted(set(targets) - set(first))  # not reached by the forward: last (they get no Hessian)
    return list(stages.values()) + ([missing] if missing else [])


Quantize = Callable[[str, str, nn.Module, "torch.Tensor | list[torch.Tensor | None] | None", bool], None]


@torch.no_grad()
def calibrate(model: nn.Module, names: set[str], ids_BT: torch.Tensor, quantize: Quantize,
              finish: Callable[[str], None], batch: int = 8) -> set[str]:
    """Quantize the modules ``names`` of an ``ErnieForCausalLM``, layer by layer, on calibration token ids.

    quantize(name, proj, module, hessian, write_back): quantize one weight of a module given the X^T X of its
        inputs: ``proj`` "weight" for a Linear (one Hessian or None), "gate_up_proj" / "down_proj" for an
        ``Experts`` (a list, one per expert, each None when no token reached any expert). With ``write_back``
        it must overwrite the full-precision weight with the quantized values, so that later weights are
        calibrated on what the quantized model computes (not for the head, which may be tied to the embedding).
    finish(name): the module is done (called once its layer's outputs have been computed).
    Returns the names done; modules outside the decoder layers and the head (the MTP block) are the caller's.
    """
    if ids_BT.dim() != 2 or ids_BT.dtype not in (torch.int32, torch.int64) or ids_BT.numel() == 0:
        raise ValueError(f"calibration must be token ids [batch, seq] (int64); got {ids_BT.dtype} "
                         f"{tuple(ids_BT.shape)}")
    vocab = model.config.vocab_size
    if int(ids_BT.min()) < 0 or int(ids_BT.max()) >= vocab:
        raise ValueError(f"calibration holds token ids outside [0, {vocab}): min {int(ids_BT.min())}, max "
                         f"{int(ids_BT.max())}; tokenize it with this model's tokenizer")
    m = model.model
    chunks = [c.to(m.embed_tokens.weight.device) for c in ids_BT.long().split(batch)]
    hs = [m.embed_tokens(c) for c in chunks]
    rope = [m.rotary(model._positions(c, None)) for c in chunks]
    done: set[str] = set()
    for li, layer in enumerate(m.layers):
        prefix = f"model.layers.{li}."
        targets = _targets(layer, prefix, names)

        def run(i: int, layer: nn.Module = layer, hs: list[torch.Tensor] = hs) -> torch.Tensor:
            return layer(hs[i], *rope[i], None, None, None)

        for stage in _stages(lambda: run(0), targets) if targets else []:
            with _recording({k: targets[k] for k in stage}) as stats:
                for i in range(len(chunks)):
                    run(i)
            for key in stage:
                mod = targets[key]
                if isinstance(mod, Experts):
                    name, _, proj = key.rpartition(".")
                    quantize(name, proj, mod, _expert_hessians(stats[key], PRIOR_TOKENS), True)
                else:
                    name = key
                    quantize(name, "weight", mod, stats[key][0].xtx, True)
                done.add(name)
        hs = [run(i) for i in range(len(chunks))]
        for name in sorted(n for n in done if n.startswith(prefix)):
            finish(name)
    if "lm_head" in names:
        stat = _Stat()
        for h in hs:
            stat.add(m.norm(h))
        quantize("lm_head", "weight", model.lm_head, stat.xtx, False)
        done.add("lm_head")
        finish("lm_head")
    return done
