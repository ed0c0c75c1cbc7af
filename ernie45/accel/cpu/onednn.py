"""Which oneDNN implementation torch's bf16 matmul runs on this CPU (AMX tiles, AVX-512 BF16, ...).

ernie45 reaches AMX through oneDNN inside torch, not through its own tile code: on the AMX Xeons these machines
come as, oneDNN's ``brg_matmul:avx512_core_amx`` reaches ~1.7 TFLOP/s on 2 cores for bf16 and is what the CPU
backend's calibration (``choice.py``) measures as the torch side of each kernel family. Owning tile code would
also mean owning the Linux tile-permission request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), whose absence is what
crashes llama.cpp's AMX path on these VMs (``ldtilecfg``); oneDNN requests it itself.

``matmul_impl(max_isa)`` runs one small bf16 ``F.linear`` in a child process with ``ONEDNN_VERBOSE=1`` (and
``ONEDNN_MAX_CPU_ISA`` to cap the instruction set, which oneDNN reads once per process) and returns the
implementation oneDNN logged, with the largest error of the product against an fp64 reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache

_PROBE = r"""
import json, torch, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
a = torch.randn(64, 512, generator=g).bfloat16()
w = torch.randn(256, 512, generator=g).bfloat16()
y = F.linear(a, w)
ref = a.double() @ w.double().t()
err = float(((y.double() - ref).abs() / ref.abs().max()).max())
print("ERNIE45_PROBE " + json.dumps({"max_rel_err": err}), flush=True)
"""

#: oneDNN's names for the instruction-set caps (``ONEDNN_MAX_CPU_ISA``).
MAX_ISA = {"amx": "AVX512_CORE_AMX", "avx512_bf16": "AVX512_CORE_BF16", "avx512": "AVX512_CORE", "avx2": "AVX2"}


@cache
def matmul_impl(max_isa: str | None = None, timeout: float = 120.0) -> dict:
    """``{"impl": "brg_matmul:avx512_core_amx" | ... | None, "max_rel_err": float, "max_isa": ...}``.
    ``impl`` is None where torch's bf16 matmul does not go through oneDNN (e.g. a CPU without AVX-512 BF16 or a
    cap below it: torch then uses its own kernels). ``max_isa``: a key of ``MAX_ISA`` or oneDNN's own name."""
    env = dict(os.environ, ONEDNN_VERBOSE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if max_isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = MAX_ISA.get(max_isa, max_isa)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the oneDNN probe did not finish in {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"the oneDNN probe failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    impl, result = None, None
    for line in proc.stdout.splitlines():
        # onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16...
        parts = line.split(",")
        if len(parts) > 6 and parts[0] == "onednn_verbose" and "exec" in parts and "matmul" in parts:
            impl = parts[parts.index("matmul") + 1]
        elif line.startswith("ERNIE45_PROBE "):
            result = json.loads(line.split(" ", 1)[1])
    if result is None:
        raise RuntimeError(f"the oneDNN probe printed no result: {proc.stdout[-500:]}")
    return {"impl": impl, "max_rel_err": result["max_rel_err"], "max_isa": env.get("ONEDNN_MAX_CPU_ISA")}
