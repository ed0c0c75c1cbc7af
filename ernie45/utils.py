"""Small shared helpers: atomic file writes, dtype names, logging setup, huge pages for weights."""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterable, Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept a torch dtype or its common names ('bf16', 'bfloat16', 'fp32', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(set(DTYPES))}")
    return DTYPES[key]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    A crash mid-write leaves the old file (or nothing), never a half-written one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any saved file
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo field in bytes ("MemTotal", "MemAvailable"); None where there is no /proc."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def advise_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Ask Linux to back the large CPU tensors with 2 MiB pages (``madvise(MADV_HUGEPAGE)`` on the aligned interior of
    each). Call it before the memory is first written: the pages come huge as they fault in. Decode streams every
    weight once a step, and on 4 KiB pages the hardware prefetchers stop at each page edge: here a batch-1 matmul
    over many layer-sized weights reads 6-18% faster on 2 MiB pages. Where THP is off (``never``) or the call is
    unavailable nothing happens. Returns the bytes advised."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return 0
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        start = s.data_ptr()
        if s.nbytes() < 2 * HUGE_PAGE or start in seen:
            continue
        seen.add(start)
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + s.nbytes()) // HUGE_PAGE * HUGE_PAGE
        if hi > lo and _libc.madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            total += hi - lo
    return total
