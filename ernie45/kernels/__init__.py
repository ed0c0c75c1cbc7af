"""Native CPU decode kernels (``cpu_kernels.c``): few-row matmuls that stream a weight at memory speed.

Decode is memory bound: each step reads every active weight once for a handful of rows. torch's CPU paths
for that case (oneDNN bf16 GEMV, the aten int8/int4 weight-only ops) reach half the DRAM bandwidth here
(MACHINE.md, benchmarks/results); these kernels are written for exactly that shape:

- :func:`qgemm`: weight-only quantized matmul for 8/6/4/2-bit codes in the *span* layout (:func:`to_span`),
  activations quantized per 128 columns (64 or 32 for smaller groups: :func:`xblock`) to int8 and multiplied with
  VNNI dot products (AVX-512; emulated exactly on AVX2);
- :func:`bgemm`: bf16 x bf16 with BF16 dot products (likewise) and fp32 accumulation;
- :func:`qmoe` / :func:`bmoe`: a MoE layer's selected experts for a decode batch in one call;
- :func:`decode_attention`: one query per sequence over the paged KV cache, read in place.

The C file is compiled on first use (a few seconds, once) with the system compiler (``$CC`` or ``gcc``) into
``$ERNIE45_CACHE`` (default ``~/.cache/ernie45``), keyed by the source, the compiler, the CPU and the build, and
loaded with ctypes; its OpenMP threads are the ones torch already runs (one libgomp in the process). One source,
two builds (:data:`ISAS`), through the vector layer ``cpu/simd.h``:

- ``avx512`` (``-O3 -march=native``): needs AVX-512 F/BW/VL with VNNI and BF16 (Zen 4, Sapphire Rapids and later);
  simd.h's names are the intrinsics themselves, so the code is the one written for them (checked: ``objdump -d``
  of this build and of the source before simd.h are the same instructions), except three written out: the lane sum
  (gcc's tree of ``_mm512_reduce_add_ps``, so any ``$CC`` sums in that order), the same sum of 16 vectors at once,
  and an fp32-to-bf16 conversion that rounds as the scalar one;
- ``avx2`` (``-O3 -mavx2 -mfma -mf16c -DERNIE45_AVX2``): needs AVX2, FMA and F16C (x86-64-v3); each 16-lane
  operation is emulated exactly on two 256-bit halves (the same bits lane by lane; see simd.h), so both builds
  meet the same fp64 references and agree with each other (tests/kernels/test_isa.py).

:func:`active_isa` is the first of :data:`ISAS` that works here, ``$ERNIE45_ISA`` forces one, :func:`set_isa` /
:func:`use_isa` choose one for the process / a block; :func:`library` gives either build's library. With neither
build (no compiler, an older CPU) :func:`available` is False and callers use torch's own ops: the same results up
to rounding, only slower. ``ERNIE45_KERNELS=0`` turns the kernels off;
:func:`use_kernels` does it for a block of code (tests compare both paths with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_kernels.c")
PARTS = sorted(Path(__file__).with_name("cpu").glob("*.c"))
"""The kernels by concern (matmul, MoE, bf16, attention, small ops, the fused layer), included by ``SOURCE``."""
SIMD = Path(__file__).with_name("cpu") / "simd.h"
"""The vector operations the kernels use, by our names: AVX-512 intrinsics, or their exact AVX2 emulations."""
HEADER = Path(__file__).with_name("ernie45_kernels.h")
"""Every exported C function and struct; the ctypes declarations below mirror it (structs checked at load)."""
ISAS = ("avx512", "avx2")
"""The builds of the one kernel source, in order of preference (the default is the first that works here)."""
ISA_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"),
             "avx2": ("avx2", "fma", "f16c")}
"""/proc/cpuinfo flags each build needs."""
ISA_CFLAGS = {"avx512": ("-march=native",), "avx2": ("-mavx2", "-mfma", "-mf16c", "-DERNIE45_AVX2")}
"""The compiler flags that make each build (the AVX2 one: x86-64-v3's vector set, nothing newer)."""
CPU_FLAGS = ISA_FLAGS["avx512"]
"""/proc/cpuinfo flags the kernels are written for (the AVX-512 build; :data:`ISA_FLAGS` has both)."""
BF16_MAX_ROWS = 16
"""Rows up to which :func:`bgemm` beats oneDNN's bf16 GEMM here (benchmarks/bench_kernels.py measures it)."""

_lock = threading.RLock()
_libs: dict[str, ctypes.CDLL] = {}  # built and loaded, by ISA
_why: dict[str, str] = {}  # why a build failed, by ISA (tried once per process)
_chosen: str | None = None  # set_isa's choice (None: the default)
_active: str | None = None  # the ISA whose library the functions call, once resolved
_resolved = False
_warned = False
_lib: ctypes.CDLL | None = None  # the active ISA's library: what the module functions call
_enabled = os.environ.get("ERNIE45_KERNELS", "1") != "0"
_why_not = ""


def _cpu_info() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _cache_dir() -> Path:
    root = os.environ.get("ERNIE45_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ernie45")
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        path = Path(tempfile.gettempdir()) / f"ernie45-kernels-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _build(isa: str) -> ctypes.CDLL:
    """Compile (once per source/compiler/CPU/ISA) and load one build. Raises RuntimeError saying why not."""
    model, flags = _cpu_info()
    missing = [f for f in ISA_FLAGS[isa] if f not in flags]
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(missing)}")
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; install gcc or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    args = ["-O3", *ISA_CFLAGS[isa], "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11", "-lm"]
    sources = [SOURCE.read_text(), SIMD.read_text(), *(p.read_text() for p in PARTS)]
    key = hashlib.sha256("\n".join([*sources, HEADER.read_text(), *version, model, " ".join(sorted(flags)),
                                    *args]).encode())
    so = _cache_dir() / f"cpu_kernels-{isa}-{key.hexdigest()[:16]}.so"
    if not so.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        try:
            print(f"ernie45: compiling the native CPU kernels ({isa}) into {so.parent} (once per machine, a few "
                  f"seconds)", file=sys.stderr, flush=True)
            res = subprocess.run([cc, *args, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{cc} failed on {SOURCE.name} ({isa}): {res.stderr.strip()[-800:]}")
            os.replace(tmp, so)  # atomic: concurrent processes each build, the last rename wins, both valid
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ernie45_qgemm.argtypes = [vp, i32, i64, i64, i64, vp, i32, vp, vp, i32, i64, vp, i32, i32]
    lib.ernie45_qgemm.restype = i32
    lib.ernie45_bgemm.argtypes = [vp, i64, i64, i64, vp, vp, i32, i32]
    lib.ernie45_bgemm.restype = i32
    lib.ernie45_qmoe.argtypes = [vp, i32, i64, i64, i64, i64, vp, vp, i64, i32, i32, vp, vp, vp, i64, vp, vp, vp, i64,
                                 i32, i32, vp, i32]
    lib.ernie45_qmoe.restype = i32
    lib.ernie45_bmoe.argtypes = [vp, i64, i64, i64, i64, vp, vp, i64, vp, vp, vp, i32]
    lib.ernie45_bmoe.restype = i32
    lib.ernie45_decode_attn.argtypes = [vp, vp, vp, vp, i64, vp, i64, i64, i64, i64, i64, ctypes.c_float, vp, i32, i32]
    lib.ernie45_decode_attn.restype = i32
    lib.ernie45_qgemm_multi.argtypes = [vp, i32, i64, i64, i64, vp, i32, i32, i64, vp, i32, i32]
    lib.ernie45_qgemm_multi.restype = i32
    lib.ernie45_rmsnorm.argtypes = [vp, vp, vp, i64, i64, ctypes.c_float]
    lib.ernie45_rope.argtypes = [vp, i64, i64, i64, vp, vp]
    lib.ernie45_router.argtypes = [vp, i32, vp, vp, i64, i64, i64, i64, ctypes.c_float, vp, vp, vp, i32, i32]
    lib.ernie45_kv_write.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64]
    lib.ernie45_argmax.argtypes = [vp, i32, i64, i64, vp]
    for f in (lib.ernie45_rmsnorm, lib.ernie45_rope, lib.ernie45_router, lib.ernie45_kv_write, lib.ernie45_argmax):
        f.restype = i32
    lib.ernie45_decode_layer.argtypes = [ctypes.POINTER(LayerPlan), vp, i64, vp, vp, vp, vp, vp, i64, i64, vp, i64, vp,
                                         i32]
    lib.ernie45_decode_layer.restype = i32
    lib.ernie45_stream_read.argtypes = [vp, i64, vp, i32]
    lib.ernie45_stream_read.restype = i32
    lib.ernie45_qgemm_xblock.argtypes = [i64, i64, i32]
    lib.ernie45_qgemm_xblock.restype = i32
    lib.ernie45_sizeof.argtypes = [ctypes.c_char_p]
    lib.ernie45_sizeof.restype = i64
    for struct in (QSet, LayerPlan):  # the ctypes mirrors of ernie45_kernels.h's structs must match them byte for byte
        size = lib.ernie45_sizeof(struct.__name__.encode())
        if size != ctypes.sizeof(struct):
            raise RuntimeError(f"{HEADER.name}: struct {struct.__name__} is {size} bytes in C but "
                               f"{ctypes.sizeof(struct)} in its ctypes mirror (ernie45/kernels/__init__.py); "
                               f"update the two together")
    return lib


def _check_isa(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"unknown kernel ISA {isa!r}: choose one of {', '.join(ISAS)}")


def _load(isa: str) -> ctypes.CDLL | None:
    """One build's library, building it on first call; None (the reason in ``_why``) when it cannot run here."""
    if isa not in _libs and isa not in _why:
        with _lock:
            if isa not in _libs and isa not in _why:
                try:
                    _libs[isa] = _build(isa)
                except (RuntimeError, OSError) as e:
                    _why[isa] = str(e)
    return _libs.get(isa)


def isa_why_not(isa: str) -> str:
    """Empty when the ``isa`` build compiles and loads here; else why not (CPU flags, compiler output)."""
    _check_isa(isa)
    _load(isa)
    return _why.get(isa, "")


def _resolve() -> None:
    """Settle the active ISA: set_isa's choice, else ``$ERNIE45_ISA``, else the first of ISAS that works here."""
    global _active, _lib, _resolved, _why_not, _warned
    with _lock:
        if _resolved:
            return
        env = os.environ.get("ERNIE45_ISA", "").strip().lower()
        want = _chosen or env or None
        if want is not None and want not in ISAS:
            _active, _why_not = None, f"ERNIE45_ISA={env!r} is not one of {', '.join(ISAS)}"
        elif want is not None:
            _active = want
            _why_not = "" if _load(want) else f"the {want} build (chosen{' by ERNIE45_ISA' if not _chosen else ''}): " \
                                               f"{_why[want]}"
        else:
            _active = next((isa for isa in ISAS if _load(isa) is not None), None)
            _why_not = "" if _active else "; ".join(f"{isa}: {_why[isa]}" for isa in ISAS)
        _lib = _libs.get(_active) if _active else None
        _resolved = True
        if _lib is None and not _warned:
            _warned = True
            warnings.warn(f"ernie45 native CPU kernels unavailable ({_why_not}); using torch's ops (slower decode)",
                          stacklevel=4)


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library of ``isa`` (None: the active ISA's), building it on first call; None when it
    cannot run here or the kernels are turned off."""
    if not _enabled:
        return None
    if isa is not None:
        _check_isa(isa)
        return _load(isa)
    if not _resolved:
        _resolve()
    return _lib


def active_isa() -> str | None:
    """The ISA whose build the functions of this module call (its library may still be unavailable: see
    :func:`why_unavailable`); None when no build runs here."""
    _resolve()
    return _active


def set_isa(isa: str | None) -> None:
    """Choose the build every function here calls, process-wide (None: back to the default, ``$ERNIE45_ISA`` or
    the first of :data:`ISAS` that works). Raises ValueError for an unknown name, RuntimeError for a build that
    cannot run here (with the reason)."""
    global _chosen, _resolved
    if isa is not None:
        why = isa_why_not(isa)
        if why:
            raise RuntimeError(f"the {isa} kernels cannot run here: {why}")
    with _lock:
        _chosen, _resolved = isa, False
        _resolve()


@contextlib.contextmanager
def use_isa(isa: str | None) -> Iterator[None]:
    """:func:`set_isa` inside a block (tests and the per-CPU calibration run any function on either build)."""
    global _chosen, _resolved
    old = _chosen
    set_isa(isa)
    try:
        yield
    finally:
        with _lock:
            _chosen, _resolved = old, False
            _resolve()


def _need() -> ctypes.CDLL:
    """The library, or RuntimeError saying why it is unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {why_unavailable()}")
    return lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str:
    """Empty when the active ISA's kernels run; else the reason (turned off, CPU, compiler output)."""
    if not _enabled:
        return "turned off (ERNIE45_KERNELS=0 or use_kernels(False))"
    library()
    return _why_not


@contextlib.contextmanager
def use_kernels(flag: bool) -> Iterator[None]:
    """Turn the native kernels on or off inside a block (for comparisons and tests)."""
    global _enabled
    old, _enabled = _enabled, flag
    try:
        yield
    finally:
        _enabled = old


# ------------------------------------------------------------------------------------------ layouts
SPAN_TILE = 16
"""Weight rows per tile of the 8-, 4- and 2-bit span layouts (:func:`to_span`): such a weight's rows must be a
multiple."""
TILED = (8, 4, 2)
"""The bit widths whose span layout holds rows in tiles of ``SPAN_TILE`` (:func:`to_span`); 6 bits go row by row."""


def span_ok(k: int, bits: int, group: int, n: int) -> bool:
    """Whether an [.., n, k] weight at ``bits`` with this group size fits the span layout of :func:`qgemm`."""
    span = 256 if bits == 6 else 64 * 8 // bits
    group_ok = group > 0 and (group % 64 == 0 or group in (16, 32) if bits == 6 else group % 32 == 0)
    return (bits in (2, 4, 6, 8) and group_ok and k % group == 0 and k % span == 0
            and (bits not in TILED or n % SPAN_TILE == 0))


def xblock(k: int, group: int, bits: int) -> int:
    """Columns per activation scale in :func:`qgemm` (the C side's ``ernie45_qgemm_xblock``): 128 when the groups
    allow it, else 64; 32 for groups of an odd multiple of 32 at 8, 4 and 2 bits (a tile's int32 lanes are its rows,
    so a block lies in one group). 6 bits keep 64 for groups of 16 and 32: their lanes are columns, each scaled by
    its own group."""
    if group % 128 == 0 and k % 128 == 0:
        return 128
    return 64 if group % 64 == 0 or bits == 6 else 32


def _to_planes(codes_NK: torch.Tensor, bits: int) -> torch.Tensor:
    """The 6-bit layout's parts (bits 4 and 2): per span of 64 * (8/bits) columns, byte j holds column j + 64 p in
    bits [p * bits, (p + 1) * bits)."""
    per = 8 // bits
    *lead, n, k = codes_NK.shape
    c = codes_NK.to(torch.uint8).reshape(*lead, n, k // (64 * per), per, 64)
    out = c[..., 0, :].clone()
    for p in range(1, per):
        out |= c[..., p, :] << (bits * p)
    return out.reshape(*lead, n, k * bits // 8)


def _from_planes(packed_NP: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, 2**bits - 1
    *lead, n, p = packed_NP.shape
    s = packed_NP.reshape(*lead, n, p // 64, 1, 64)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed_NP.device).reshape(per, 1)
    return ((s >> shifts) & mask).reshape(*lead, n, p * per)


def to_span(codes_NK: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack unsigned codes [.., N, K] into the span layout [.., N, K * bits / 8]; with ``out`` (a uint8 tensor of
    that shape, such as a slice of whole tiles of a weight's buffer) into it, at 8, 4 and 2 bits without a packed
    temporary (``out`` contiguous), at 6 bits by a copy.

    6 bits, row by row: per 256 columns, the low 4 bits in 128 bytes, then the high 2 bits in 64 bytes, each as a
    span (per span of 64 * (8/bits) columns, byte j holds column j + 64 p in bits [p * bits, (p + 1) * bits): one
    shift and one mask give 64 consecutive columns).

    8, 4 and 2 bits, tiles of 16 rows (``SPAN_TILE``; N % 16 == 0): the tile of rows 16t .. 16t+15 fills the bytes
    those rows would fill (so a tile is a slice of rows), as chunks of 64 bytes, each holding 4P columns of the 16
    rows (P = 8 / bits planes); chunk c's byte 4l + b holds column 4Pc + 4p + b of row 16t + l in bits
    [p * bits, (p + 1) * bits). Unpacked with one shift and one mask, a plane is four consecutive columns of each of
    16 rows per int32 lane: VPDPBUSD against four broadcast activation bytes gives 16 rows' partial sums, so 16
    outputs accumulate in one register with no per-row reduction. Their scales and zeros are tiled the same way
    (:func:`span_scales`)."""
    if bits == 6:
        c = codes_NK.to(torch.uint8)
        *lead, n, k = c.shape
        lo = _to_planes(c & 15, 4).reshape(*lead, n, k // 256, 128)
        hi = _to_planes(c >> 4, 2).reshape(*lead, n, k // 256, 64)
        packed = torch.cat((lo, hi), dim=-1).reshape(*lead, n, k * 3 // 4)
        return packed if out is None else out.copy_(packed)
    if bits not in TILED:
        raise ValueError(f"to_span: {bits}-bit codes have no span layout (8, 6, 4 or 2 bits)")
    *lead, n, k = codes_NK.shape
    t, p = SPAN_TILE, 8 // bits
    if n % t:
        raise ValueError(f"to_span: a {bits}-bit weight's rows come in tiles of {t}; {n} rows is not a multiple")
    c = codes_NK.to(torch.uint8).reshape(*lead, n // t, t, k // (4 * p), p, 4)
    if out is None:
        out = torch.empty(*lead, n, k * bits // 8, dtype=torch.uint8, device=c.device)
    elif out.shape != (*lead, n, k * bits // 8) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"to_span: out must be a contiguous uint8 {[*lead, n, k * bits // 8]}, got "
                         f"{out.dtype} {list(out.shape)}")
    view = out.view(*lead, n // t, k // (4 * p), t, 4).transpose(-3, -2)  # [.., N/16, 16 rows, chunks, 4]: in place
    torch.bitwise_left_shift(c[..., p - 1, :], bits * (p - 1), out=view)
    for q in range(p - 1):
        view.bitwise_or_(c[..., q, :] << (bits * q) if q else c[..., q, :])
    return out


def from_span(packed_NP: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`to_span`: [.., N, K * bits / 8] -> [.., N, K] uint8 codes."""
    if bits == 6:
        *lead, n, p = packed_NP.shape
        s = packed_NP.reshape(*lead, n, p // 192, 192)
        lo = _from_planes(s[..., :128].reshape(*lead, n, p * 2 // 3), 4)
        return lo | (_from_planes(s[..., 128:].reshape(*lead, n, p // 3), 2) << 4)
    if bits not in TILED:
        raise ValueError(f"from_span: {bits}-bit codes have no span layout (8, 6, 4 or 2 bits)")
    *lead, n, nbytes = packed_NP.shape
    t, p, mask = SPAN_TILE, 8 // bits, 2**bits - 1
    b = packed_NP.reshape(*lead, n // t, nbytes // 4, t, 4).transpose(-3, -2)  # [.., N/16, 16 rows, chunks, 4]
    c = torch.stack([(b >> (bits * q)) & mask for q in range(p)], dim=-2)  # [.., N/16, 16, chunks, P, 4]
    return c.reshape(*lead, n, nbytes * p)


def span_scales(s_NG: torch.Tensor, bits: int) -> torch.Tensor:
    """Scales (or zeros) [.., N, G] in the order the span layout's kernels read them: 8, 4 and 2 bits, per tile of
    16 rows [G, 16] (group g of the tile's 16 rows side by side) in the tile's rows' place; other bits unchanged."""
    if bits not in TILED:
        return s_NG
    *lead, n, g = s_NG.shape
    if n % SPAN_TILE:
        raise ValueError(f"span_scales: a {bits}-bit weight's rows come in tiles of {SPAN_TILE}; {n} is not a "
                         "multiple")
    return s_NG.reshape(*lead, n // SPAN_TILE, SPAN_TILE, g).transpose(-2, -1).contiguous().reshape(*lead, n, g)


def from_span_scales(s_NG: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`span_scales`."""
    if bits not in TILED:
        return s_NG
    *lead, n, g = s_NG.shape
    return s_NG.reshape(*lead, n // SPAN_TILE, g, SPAN_TILE).transpose(-2, -1).contiguous().reshape(*lead, n, g)


# ------------------------------------------------------------------------------------------ compute
_OUT_DTYPES = (torch.bfloat16, torch.float32)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def qgemm(x_MK: torch.Tensor, codes_NP: torch.Tensor, bits: int, scales_NG: torch.Tensor,
          zeros_NG: torch.Tensor | None, group: int) -> torch.Tensor:
    """x [M, K] (bf16/fp32) @ W^T for W = (code - 2**(bits-1)) * scale + zero, codes in the span layout
    (:func:`to_span`) and scales / zeros [N, G] in its order (:func:`span_scales`: tiled but for 6 bits).
    ``zeros`` None means all zero (symmetric). Returns [M, N] in x's dtype. Needs :func:`available`."""
    lib = _need()
    m, k = x_MK.shape
    n = codes_NP.shape[0]
    if x_MK.dtype not in _OUT_DTYPES or scales_NG.dtype not in _OUT_DTYPES:
        raise TypeError(f"qgemm takes bf16/fp32 activations and scales, got {x_MK.dtype} and {scales_NG.dtype}")
    if codes_NP.shape != (n, k * bits // 8) or not span_ok(k, bits, group, n):
        raise ValueError(f"qgemm: codes {tuple(codes_NP.shape)} do not hold a [{n}, {k}] {bits}-bit weight "
                         f"in groups of {group} in the span layout")
    x = x_MK.contiguous()
    sc = scales_NG.contiguous()
    z = None if zeros_NG is None else zeros_NG.to(sc.dtype).contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    rc = lib.ernie45_qgemm(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, n, codes_NP.contiguous().data_ptr(),
                           bits, sc.data_ptr(), _ptr(z), int(sc.dtype == torch.bfloat16), group, out.data_ptr(),
                           int(out.dtype == torch.bfloat16), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_qgemm rejected its arguments (code {rc})")
    return out


def qgemm_ptrs(x_MK: torch.Tensor, n: int, codes: int, bits: int, scales: int, zeros: int | None, scales_bf16: int,
               group: int) -> torch.Tensor:
    """:func:`qgemm` for callers that own a checked span-layout weight (``QWeight``): raw addresses, no checks.
    x must be a contiguous bf16/fp32 [M, K] CPU tensor with 0 < M."""
    m, k = x_MK.shape
    out = torch.empty(m, n, dtype=x_MK.dtype)
    xb = int(x_MK.dtype == torch.bfloat16)
    rc = _lib.ernie45_qgemm(x_MK.data_ptr(), xb, m, k, n, codes, bits, scales, zeros, scales_bf16, group,
                            out.data_ptr(), xb, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_qgemm rejected its arguments (code {rc})")
    return out


def fused_linears(mods: tuple, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs of several quantized linears that read the same x (q/k/v, gate/up) from one native call: x is
    quantized once and one parallel region covers all their rows. x must be a CPU bf16/fp32 inference input; each
    module offers ``fused_args(x)`` (its (rows, codes, scales, zeros, (bits, group, scales bf16)) when it can take
    x, else None). Returns None, and the caller runs the modules one by one, when x or any module cannot or their
    schemes differ."""
    if x.device.type != "cpu" or x.dtype not in _OUT_DTYPES or needs_grad(x) or library() is None:
        return None
    args = tuple(getattr(m, "fused_args", _no_args)(x) for m in mods)
    if any(a is None for a in args) or len({a[4] for a in args}) != 1:
        return None
    packed = _MULTI_ARGS.get(args)
    if packed is None:  # the weights' addresses as one int64 array, built once per group of weights
        if len(_MULTI_ARGS) > 4096:  # models loaded again and again: drop the stale entries
            _MULTI_ARGS.clear()
        packed = _MULTI_ARGS[args] = (ctypes.c_int64 * (4 * len(args)))(*(a[j] for j in range(4) for a in args))
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m * sum(a[0] for a in args), dtype=x.dtype)  # the outputs one after another
    bits, group, sb = args[0][4]
    xb = int(x.dtype == torch.bfloat16)
    rc = _need().ernie45_qgemm_multi(x2.data_ptr(), xb, m, k, len(args), packed, bits, sb, group, out.data_ptr(), xb,
                                     torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_qgemm_multi rejected its arguments (code {rc})")
    lead, outs, at = x.shape[:-1], [], 0
    for a in args:
        outs.append(out[at:at + m * a[0]].view(*lead, a[0]))
        at += m * a[0]
    return outs


_MULTI_ARGS: dict[tuple, ctypes.Array] = {}
"""fused_linears' argument arrays by the weights' (rows, addresses, scheme) tuples."""


def _no_args(x: torch.Tensor) -> None:
    return None


def qmoe(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, bits: int,
         gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int],
         down: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int], dn_bits: int | None = None) -> torch.Tensor:
    """The routed experts of a MoE layer in one call (decode sizes): for each token, the sum over its experts in
    ascending order of ``w * down(silu(gate(x)) * up(x))``, rounded where the torch path in x's dtype rounds.
    ``gate_up`` / ``down``: (codes [E, N, K*bits/8] span layout, scales [E, N, G] in its order
    (:func:`span_scales`), zeros likewise or None, group). ``bits``: gate_up's; ``dn_bits``: down's when they
    differ (GGUF's Q4_K_M: Q6_K down in some layers). Returns [T, H] in x's dtype. Needs :func:`available`."""
    lib = _need()
    t, h = x_TH.shape
    gu_w, gu_s, gu_z, gu_g = gate_up
    dn_w, dn_s, dn_z, dn_g = down
    e, two_i = gu_w.shape[0], gu_w.shape[1]
    if x_TH.dtype not in _OUT_DTYPES or gu_s.dtype not in _OUT_DTYPES or dn_s.dtype != gu_s.dtype:
        raise TypeError(f"qmoe takes bf16/fp32 activations and scales, got {x_TH.dtype}, {gu_s.dtype}, {dn_s.dtype}")
    x = x_TH.contiguous()
    idx = idx_TK.to(torch.int64).contiguous()
    w = w_TK.float().contiguous()
    out = torch.empty(t, h, dtype=torch.float32)
    sb = int(gu_s.dtype == torch.bfloat16)
    rc = lib.ernie45_qmoe(x.data_ptr(), int(x.dtype == torch.bfloat16), t, h, two_i // 2, idx.shape[1], idx.data_ptr(),
                          w.data_ptr(), e, bits, sb, gu_w.data_ptr(), gu_s.data_ptr(), _ptr(gu_z), gu_g,
                          dn_w.data_ptr(), dn_s.data_ptr(), _ptr(dn_z), dn_g, bits if dn_bits is None else dn_bits,
                          int(x.dtype == torch.bfloat16),
                          out.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_qmoe rejected its arguments (code {rc}: "
                           f"{'an expert index out of range' if rc == -4 else 'shapes or groups'})")
    return out.to(x.dtype)


MOE_MAX_TOKENS = 16
"""Tokens up to which :func:`qmoe` / :func:`bmoe` run a MoE layer's experts (decode batches)."""


def bmoe(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, gate_up_EIH: torch.Tensor,
         down_EHI: torch.Tensor) -> torch.Tensor:
    """:func:`qmoe` for bf16 expert stacks ``gate_up [E, 2I, H]`` and ``down [E, H, I]``: one call, the
    per-expert path's bf16 roundings, ascending-expert fp32 sum. Returns [T, H] bf16."""
    lib = _need()
    t, h = x_TH.shape
    e, two_i, _ = gate_up_EIH.shape
    if {x_TH.dtype, gate_up_EIH.dtype, down_EHI.dtype} != {torch.bfloat16}:
        raise TypeError("bmoe takes bf16 activations and expert stacks")
    x, gu, dn = x_TH.contiguous(), gate_up_EIH.contiguous(), down_EHI.contiguous()
    idx = idx_TK.to(torch.int64).contiguous()
    w = w_TK.float().contiguous()
    out = torch.empty(t, h, dtype=torch.float32)
    rc = lib.ernie45_bmoe(x.data_ptr(), t, h, two_i // 2, idx.shape[1], idx.data_ptr(), w.data_ptr(), e,
                          gu.data_ptr(), dn.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_bmoe rejected its arguments (code {rc}: "
                           f"{'an expert index out of range' if rc == -4 else 'shapes'})")
    return out.to(torch.bfloat16)


def decode_attention_ok(q_SND: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` takes these (bf16 on CPU, head_dim a multiple of 16 up to 128, at most 8
    query heads per kv head) and the kernels are available."""
    n, d = q_SND.shape[1], q_SND.shape[2]
    kv = k_cache.shape[2]
    return (q_SND.dtype == k_cache.dtype == torch.bfloat16 and q_SND.device.type == "cpu" and d % 16 == 0
            and d <= 128 and n % kv == 0 and n // kv <= 8 and library() is not None)


def decode_attention(q_SND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables_SB: torch.Tensor,
                     lens_S: torch.Tensor, scale: float, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One query per sequence over its paged cache ``[blocks, block_size, kv_heads, D]``, read in place through
    the block table (no gathered copy of the keys), fp32 softmax; returns [S, N, D] in ``out_dtype`` (fp32, or
    bf16 rounded once at the end). Check :func:`decode_attention_ok` first."""
    s, n, d = q_SND.shape
    q = q_SND.contiguous()
    tables = tables_SB.to(torch.int64).contiguous()
    lens = lens_S.to(torch.int64).contiguous()
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"decode_attention writes fp32 or bf16, not {out_dtype}")
    out = torch.empty(s, n, d, dtype=out_dtype)
    rc = _lib.ernie45_decode_attn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                  tables.shape[1], lens.data_ptr(), s, n, k_cache.shape[2], d, k_cache.shape[1],
                                  scale, out.data_ptr(), int(out_dtype == torch.bfloat16), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_decode_attn rejected its arguments (code {rc}: a context length outside "
                           f"its block table, or the head shape)")
    return out


def bgemm(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T, both bf16, fp32 accumulation, bf16 out. Needs :func:`available`, K % 32 == 0."""
    lib = _need()
    m, k = x_MK.shape
    n = w_NK.shape[0]
    if x_MK.dtype != torch.bfloat16 or w_NK.dtype != torch.bfloat16 or w_NK.shape[1] != k or k % 32:
        raise ValueError(f"bgemm takes bf16 x [M, K] and w [N, K] with K % 32 == 0, got {tuple(x_MK.shape)} "
                         f"{x_MK.dtype} and {tuple(w_NK.shape)} {w_NK.dtype}")
    x, w = x_MK.contiguous(), w_NK.contiguous()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.ernie45_bgemm(x.data_ptr(), m, k, n, w.data_ptr(), out.data_ptr(), 1, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_bgemm rejected its arguments (code {rc})")
    return out


def needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = BF16_MAX_ROWS) -> torch.Tensor:
    """``F.linear``, with bf16 inference on CPU of at most ``max_rows`` rows run by :func:`bgemm` (same math, fp32
    accumulation)."""
    k = weight.shape[-1]
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and k % 32 == 0 and weight.dim() == 2 and weight.is_contiguous() and x.shape[-1] == k
            and x.numel() <= max_rows * k and x.numel() > 0 and not needs_grad(x, weight)
            and library() is not None):
        x2 = x.reshape(-1, k).contiguous()
        n = weight.shape[0]
        y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
        _lib.ernie45_bgemm(x2.data_ptr(), x2.shape[0], k, n, weight.data_ptr(), y.data_ptr(), 1,
                           torch.get_num_threads())  # arguments checked above
        y = y.reshape(*x.shape[:-1], n)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------ small decode ops
SMALL_MAX_ROWS = 16
"""Rows (tokens) up to which the per-layer elementwise ops of a decode step run natively: each is one call
instead of 8-15 torch ops, which at batch 1 cost more than the matmuls of a small layer's norms and rotations."""


def small_ok(x: torch.Tensor, *params: torch.Tensor, max_rows: int = SMALL_MAX_ROWS) -> bool:
    """Whether a bf16 CPU tensor of at most ``max_rows`` rows of its last dim can take the small native ops below:
    inference only (no autograd through x or ``params``), kernels available."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and 0 < x.numel() <= max_rows * x.shape[-1]
            and not needs_grad(x, *params) and _enabled and library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` of bf16 x with a bf16 weight: ``bf16(w * bf16(x / sqrt(mean(x^2) + eps)))`` per row (the module's
    roundings; the sum of squares in another order). Check :func:`small_ok` first; needs hidden % 16 == 0."""
    h = x.shape[-1]
    if weight.dtype != torch.bfloat16 or weight.shape != (h,) or h % 16:
        raise ValueError(f"rms_norm takes a bf16 weight of shape ({h},) with {h} % 16 == 0, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    _need().ernie45_rmsnorm(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), x.numel() // h, h, eps)
    return out


def rope_(x_TND: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE in place on a contiguous bf16 ``x [T, N, D]`` (pairs (2i, 2i+1)) with fp32 ``cos/sin
    [T, D/2]``; the same bits as ``model.layers.apply_rope``. Returns x."""
    t, n, d = x_TND.shape
    if (not x_TND.is_contiguous() or x_TND.dtype != torch.bfloat16 or d % 2 or cos_TF.shape != (t, d // 2)
            or sin_TF.shape != (t, d // 2) or cos_TF.dtype != torch.float32 or sin_TF.dtype != torch.float32):
        raise ValueError(f"rope_ takes a contiguous bf16 x [T, N, D] and fp32 cos/sin [T, D/2]; got x "
                         f"{tuple(x_TND.shape)} {x_TND.dtype}, cos {tuple(cos_TF.shape)} {cos_TF.dtype} (D even)")
    c, s = cos_TF.contiguous(), sin_TF.contiguous()
    _need().ernie45_rope(x_TND.data_ptr(), t, n, d, c.data_ptr(), s.data_ptr())
    return x_TND


def router(x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor, k: int, norm_min: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE router (``model.moe.Router.forward``) in one call: fp32 logits and softmax, top-k of probs + bias,
    weights renormalised over the k and returned in x's dtype. Returns (probs_TE fp32, w_TK, idx_TK int64)."""
    t, h = x_TH.shape
    e = weight_EH.shape[0]
    if (x_TH.dtype not in _OUT_DTYPES or weight_EH.dtype != torch.float32 or bias_E.dtype != torch.float32
            or weight_EH.shape != (e, h) or bias_E.shape != (e,) or h % 16 or not 0 < k <= e):
        raise ValueError(f"router takes x [T, H] bf16/fp32, an fp32 weight [E, H] and bias [E], H % 16 == 0, "
                         f"0 < k <= E; got x {tuple(x_TH.shape)} {x_TH.dtype}, weight {tuple(weight_EH.shape)} "
                         f"{weight_EH.dtype}, bias {tuple(bias_E.shape)}, k={k}")
    x, w, b = x_TH.contiguous(), weight_EH.contiguous(), bias_E.contiguous()
    probs = torch.empty(t, e, dtype=torch.float32)
    idx = torch.empty(t, k, dtype=torch.int64)
    wk = torch.empty(t, k, dtype=x.dtype)
    _need().ernie45_router(x.data_ptr(), int(x.dtype == torch.bfloat16), w.data_ptr(), b.data_ptr(), t, h, e, k,
                        norm_min, probs.data_ptr(), idx.data_ptr(), wk.data_ptr(), int(wk.dtype == torch.bfloat16),
                        torch.get_num_threads())
    return probs, wk, idx


def kv_write(k_TKD: torch.Tensor, v_TKD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots_T: torch.Tensor) -> None:
    """``cache.view(-1, K, D)[slots] = k/v`` for bf16 tensors (the caches contiguous, slots int64)."""
    if not (k_TKD.dtype == v_TKD.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
            and k_cache.is_contiguous() and v_cache.is_contiguous() and slots_T.dtype == torch.int64
            and k_TKD.shape == v_TKD.shape and k_TKD.shape[1:] == k_cache.shape[2:] and v_cache.shape == k_cache.shape
            and slots_T.shape == k_TKD.shape[:1]):
        raise ValueError(f"kv_write takes bf16 k/v [T, K, D] matching caches [blocks, P, K, D] and int64 slots [T]; "
                         f"got k {tuple(k_TKD.shape)} {k_TKD.dtype}, cache {tuple(k_cache.shape)} {k_cache.dtype}, "
                         f"slots {tuple(slots_T.shape)} {slots_T.dtype}")
    k, v, s = k_TKD.contiguous(), v_TKD.contiguous(), slots_T.contiguous()
    row = k.shape[1] * k.shape[2]
    rc = _need().ernie45_kv_write(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), s.data_ptr(),
                               k.shape[0], row, k_cache.numel() // row)
    if rc:
        raise IndexError(f"kv_write: a slot in {s.tolist()} is outside the cache's {k_cache.numel() // row} slots")


def argmax(x_SV: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for a bf16/fp32 CPU [S, V] (first index on ties, NaN counts as largest), vectorised: torch's
    is ~10x slower over a 103k vocabulary. Returns int64 [S]."""
    s, v = x_SV.shape
    if x_SV.dtype not in _OUT_DTYPES or x_SV.device.type != "cpu" or v < 1:
        raise ValueError(f"argmax takes a bf16/fp32 CPU [S, V] with V > 0, got {tuple(x_SV.shape)} {x_SV.dtype}")
    x = x_SV.contiguous()
    out = torch.empty(s, dtype=torch.int64)
    _need().ernie45_argmax(x.data_ptr(), int(x.dtype == torch.bfloat16), s, v, out.data_ptr())
    return out


def stream_read(buf: torch.Tensor) -> int:
    """Read every byte of a contiguous CPU tensor once (a plain streaming read, all threads) and return the wrap-around
    int32 sum of its 4-byte words: the bandwidth ceiling the decode matmuls are measured against
    (benchmarks/bench_int4_bw.py). Its size in bytes must be a multiple of 256."""
    nbytes = buf.numel() * buf.element_size()
    if buf.device.type != "cpu" or not buf.is_contiguous() or nbytes % 256:
        raise ValueError(f"stream_read takes a contiguous CPU tensor of a multiple of 256 bytes, got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device} ({nbytes} bytes)")
    out = ctypes.c_int64(0)
    rc = _need().ernie45_stream_read(buf.data_ptr(), nbytes, ctypes.byref(out), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_stream_read rejected its arguments (code {rc})")
    return out.value


# ------------------------------------------------------------------------------------ a whole decoder layer
class QSet(ctypes.Structure):
    """Quantized span-layout weights that read one input (``ernie45_qgemm_multi``'s arguments, with each weight's
    bits and group: a run of one scheme is one call)."""
    _fields_ = [("nw", ctypes.c_int64), ("bits", ctypes.c_int64), ("s_bf16", ctypes.c_int64),
                ("args", ctypes.c_int64 * 16), ("wbits", ctypes.c_int64 * 4),
                ("wgroup", ctypes.c_int64 * 4)]


class LayerPlan(ctypes.Structure):
    """One decoder layer for ``ernie45_decode_layer``: shapes and the addresses of its weights (the C struct)."""
    _fields_ = [(f, ctypes.c_int64) for f in ("H", "NQ", "NKV", "D", "E", "K", "I", "W")] + [
        (f, ctypes.c_float) for f in ("eps", "scale", "norm_min", "unused")] + [
        (f, ctypes.c_void_p) for f in ("in_norm", "post_norm", "router_w", "router_b")] + [
        (f, QSet) for f in ("qkv", "o", "gate_up", "down")] + [
        ("ebits", ctypes.c_int64), ("es_bf16", ctypes.c_int64), ("egu", ctypes.c_int64 * 4),
        ("edn", ctypes.c_int64 * 4), ("edn_bits", ctypes.c_int64)]


def qset(weights: list[tuple | None]) -> QSet | None:
    """A :class:`QSet` from up to four weights' ``span_args`` (rows, codes, scales, zeros, (bits, group, scales
    bf16)); their bits and groups may differ (each run of one scheme is one call); None when one is missing, their
    scales' dtypes differ, or bf16 weights (bits 16) are mixed with quantized ones."""
    if not 0 < len(weights) <= 4 or any(w is None for w in weights) or len({w[4][2] for w in weights}) != 1:
        return None
    if len({w[4][0] == 16 for w in weights}) != 1 or (weights[0][4][0] == 16 and len({w[4] for w in weights}) != 1):
        return None
    bits, _, sb = weights[0][4]
    flat = [w[j] for j in range(4) for w in weights]
    pad = [0] * (4 - len(weights))
    return QSet(len(weights), bits, sb, (ctypes.c_int64 * 16)(*flat),
                (ctypes.c_int64 * 4)(*[w[4][0] for w in weights], *pad),
                (ctypes.c_int64 * 4)(*[w[4][1] for w in weights], *pad))


class DecodeStep:
    """The paged cache's side of a decode-only step for :func:`decode_layer`: the slots, block tables and context
    lengths (int64, contiguous; kept alive here), the cache geometry and each layer's K/V cache addresses."""

    def __init__(self, slots_T: torch.Tensor, tables_SB: torch.Tensor, lens_S: torch.Tensor, num_slots: int,
                 block_size: int, k_ptrs: list[int], v_ptrs: list[int]) -> None:
        self.slots, self.tables, self.lens = slots_T.contiguous(), tables_SB.contiguous(), lens_S.contiguous()
        self.k, self.v = k_ptrs, v_ptrs
        self.args = (self.slots.data_ptr(), num_slots, block_size, self.tables.data_ptr(), self.tables.shape[1],
                     self.lens.data_ptr())


def decode_layer(plan: LayerPlan, h_TH: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor, step: DecodeStep,
                 layer_idx: int) -> None:
    """Run one decoder layer on the hidden states ``h [T, H]`` (bf16, contiguous; updated in place) of a decode-only
    step: T tokens, token t the next one of sequence t of ``step``. cos/sin: fp32 [T, D/2]. The caller owns the
    checks (``model.native``); the C side still rejects a slot or a context length outside the cache."""
    slots, num_slots, block_size, tables, width, lens = step.args
    rc = _lib.ernie45_decode_layer(ctypes.byref(plan), h_TH.data_ptr(), h_TH.shape[0], cos_TF.data_ptr(),
                                   sin_TF.data_ptr(), step.k[layer_idx], step.v[layer_idx], slots, num_slots,
                                   block_size, tables, width, lens, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ernie45_decode_layer (layer {layer_idx}) rejected its arguments (code {rc}: "
                           f"{'a slot or context length outside the cache' if rc == -4 else 'shapes or memory'})")
