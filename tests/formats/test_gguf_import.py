"""GGUF import internals: our header parser against gguf-py's reader, the direct code paths (file blocks straight
into our codes, a chunk of rows or experts at a time) against gguf-py's dequantization, and the import's memory
pieces (the converter reads and converts one chunk of rows or experts at a time, never a whole tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ernie45.model.checkpoint import CheckpointError
from ernie45.quant.modules import QWeight, quantize_tensor

gguf = pytest.importorskip("gguf")  # the 'gguf' extra; installed with the test extra

from ernie45.formats import ggml  # noqa: E402
from ernie45.formats import gguf as G  # noqa: E402

F16_AT = {ggml.Q8_0: [0], ggml.Q4_0: [0], ggml.Q4_1: [0, 2], ggml.Q5_0: [0], ggml.Q4_K: [0, 2], ggml.Q5_K: [0, 2],
          ggml.Q6_K: [208], 7: [0, 2], 10: [80, 82]}
"""Byte offsets of the f16 fields in a block (7: Q5_1, 10: Q2_K: no exact scheme of ours, requantized)."""


def random_blocks(qtype: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random raw blocks of ``qtype`` for a tensor of torch-order ``shape``, with finite small f16 scales."""
    qk, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    rng = np.random.default_rng(seed)
    *lead, k = shape
    raw = rng.integers(0, 256, size=(*lead, k // qk, nbytes), dtype=np.uint8)
    for off in F16_AT[qtype]:
        raw[..., off:off + 2] = rng.uniform(-0.02, 0.02, (*lead, k // qk)).astype(np.float16).view(np.uint8).reshape(
            *lead, k // qk, 2)
    return raw.reshape(*lead, -1)


def write_raw(path: str, tensors: dict[str, tuple[int, np.ndarray]], **kv) -> None:
    w = gguf.GGUFWriter(path, "test")
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, float):
            w.add_float64(key, value)
        elif isinstance(value, int):
            w.add_int64(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (qtype, raw) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -------------------------------------------------------------------------------------------- header
def test_header_matches_gguf_py(tmp_path):
    """Every metadata value and tensor position our parser reads equals gguf-py's reader, for each value type
    (scalars, strings, numeric / string / bool arrays), a custom alignment and several ggml types."""
    path = str(tmp_path / "h.gguf")
    w = gguf.GGUFWriter(path, "ernie4_5")
    w.add_custom_alignment(64)
    for i, add in enumerate((w.add_uint8, w.add_int8, w.add_uint16, w.add_int16, w.add_uint32, w.add_int32,
                             w.add_uint64, w.add_int64)):
        add(f"k.int{i}", 7 + i)
    w.add_float32("k.f32", 1e-5)
    w.add_float64("k.f64", 0.1)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo 中文")
    w.add_array("k.ints", [1, -2, 3])
    w.add_array("k.floats", [0.5, -1.25])
    w.add_array("k.strs", ["a", "", "ünï", "<0x0A>"] * 50)
    w.add_array("k.bools", [True, False])
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", random_blocks(ggml.Q4_K, (2, 3, 256), 0), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("c", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = G.GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert keys == list(ours.fields)
    for key in keys:
        assert ours.get(key) == ref.fields[key].contents(), key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.start, mine.nbytes, mine.qtype) == (int(t.data_offset), int(t.n_bytes), int(t.tensor_type))
        assert mine.shape == tuple(int(s) for s in reversed(t.shape.tolist()))


def test_bad_headers_are_named(tmp_path):
    good = str(tmp_path / "good.gguf")
    write_raw(good, {"w": (ggml.F32, np.zeros((4, 8), np.float32))}, **{"general.name": "x"})
    data = open(good, "rb").read()
    cases = {"magic.gguf": (b"GGML" + data[4:], "no GGUF magic"),
             "v1.gguf": (data[:4] + (1).to_bytes(4, "little") + data[8:], "version 1"),
             "big.gguf": (data[:4] + (3).to_bytes(4, "big") + data[8:], "big-endian"),
             "head.gguf": (data[:40], "header is truncated"),
             "data.gguf": (data[:-16], "truncated")}
    for name, (blob, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=msg) as e:
            G.GGUFFile(str(p))
        assert name in str(e.value)


def test_header_parse_builds_no_object_per_number(tmp_path):
    """A 100k-entry vocabulary's scores and types stay numpy arrays until asked for (gguf-py builds a numpy view
    per entry); strings are decoded once."""
    path = str(tmp_path / "v.gguf")
    n = 100_000
    write_raw(path, {"w": (ggml.F32, np.zeros((4, 8), np.float32))},
              **{"tokenizer.ggml.tokens": [f"<t{i}>" for i in range(n)], "tokenizer.ggml.scores": [0.5] * n})
    g = G.GGUFFile(path)
    assert isinstance(g.fields["tokenizer.ggml.scores"], np.ndarray)
    assert g.get("tokenizer.ggml.scores")[-1] == 0.5 and g.get("tokenizer.ggml.tokens")[-1] == f"<t{n - 1}>"


# ---------------------------------------------------------------------------------------- direct paths
@pytest.mark.parametrize("qtype", [*sorted(ggml.EXACT), 7, 10])
def test_chunked_conversion_equals_gguf_dequantize(tmp_path, monkeypatch, qtype):
    """A matrix in row blocks and gate / up expert stacks one expert at a time (a chunk small enough for several
    steps each) land in our quantized buffers and in a float parameter equal to gguf-py's dequantization: the
    file's own codes and scales for the exact types (bit for bit with fp32 scales), and for the others exactly
    our requantization of gguf-py's values."""
    k = 512
    mat = random_blocks(qtype, (192, k), 1)
    gate, up = random_blocks(qtype, (3, 64, k), 2), random_blocks(qtype, (3, 64, k), 3)
    path = str(tmp_path / "t.gguf")
    write_raw(path, {"mat": (qtype, mat), "gate": (qtype, gate), "up": (qtype, up)})
    monkeypatch.setattr(G, "CHUNK", 64 * k)  # 64 rows of the matrix, one expert of the stack per step
    g = G.GGUFFile(path)
    ref = {n: torch.from_numpy(gguf.quants.dequantize(a, qtype)).float() for n, a in
           (("mat", mat), ("gate", gate), ("up", up))}
    ref_stack = torch.cat((ref["gate"], ref["up"]), dim=1)
    scheme = ggml.EXACT.get(qtype, G.FALLBACK)
    lin = QWeight((), 192, k, scheme, torch.float32)
    stack = QWeight((3,), 128, k, scheme, torch.float32)
    param, fstack = torch.full((192, k), float("nan")), torch.full((3, 128, k), float("nan"))
    reads = []
    read = G.GGUFFile.read
    monkeypatch.setattr(G.GGUFFile, "read", lambda self, t, f, **kw: reads.append(kw) or read(self, t, f, **kw))
    with open(path, "rb") as f:
        G._fill_quant(lin, [g.tensors["mat"]], g, f)
        G._fill_quant(stack, [g.tensors["gate"], g.tensors["up"]], g, f)
        G._fill_float(param, {None: g.tensors["mat"]}, g, f)
        G._fill_float(fstack, {"gate": g.tensors["gate"], "up": g.tensors["up"]}, g, f)
    assert {"rows": (64, 128)} in reads and {"index": 2, "count": 1} in reads  # it did go in pieces
    assert torch.equal(param, ref["mat"]) and torch.equal(fstack, ref_stack)
    if qtype in ggml.EXACT:
        # K-quants: our middle-code zero (8 d sc - dmin m) reorders ggml's d sc q - dmin m: last-bit differences
        tol = {"rtol": 0, "atol": 1e-6 * float(ref["mat"].abs().max())} if qtype in (ggml.Q4_K, ggml.Q5_K) else \
            {"rtol": 0, "atol": 0}
        torch.testing.assert_close(lin.dequantize(None, torch.float32), ref["mat"], **tol)
        for e in range(3):
            torch.testing.assert_close(stack.dequantize(e, torch.float32), ref_stack[e], **tol)
    else:  # requantized from gguf-py's values with our int8 g32 scheme
        want = QWeight((), 192, k, scheme, torch.float32)
        want.set(None, *quantize_tensor(ref["mat"], scheme))
        assert torch.equal(lin.dequantize(None, torch.float32), want.dequantize(None, torch.float32))
        want = QWeight((3,), 128, k, scheme, torch.float32)
        for e in range(3):
            want.quantize_(e, ref_stack[e])
            assert torch.equal(stack.dequantize(e, torch.float32), want.dequantize(e, torch.float32))


def test_rows_must_start_on_a_block_of_64():
    qw = QWeight((), 128, 64, ggml.EXACT[ggml.Q4_0], torch.float32)
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 64"):
        qw.set_stored(None, codes, torch.ones(32, 2), torch.zeros(32, 2), slice(32, 64))
