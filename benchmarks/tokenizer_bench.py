"""Tokenizer speed: ernie45.tokenizer vs transformers' LlamaTokenizer (how transformers serves ERNIE's
tokenizer, spec §4), on the same SentencePiece model, in the same process.

The real ERNIE tokenizer.model is not available here, so a byte-fallback BPE model (vocab 16k) is trained
on the repo's corpus (data/corpus: English fortunes + Chinese poems) with ERNIE's special-token files.
Measured: load time, encode and decode throughput over every corpus document, and streaming
detokenization of one long generation, token by token: ours (IncrementalDetokenizer, bytes + incremental
UTF-8) against transformers' TextStreamer way (decode all tokens so far at each step) and against the
offset-window way of vLLM and TGI (decode the last few ids twice per step) on transformers' tokenizer.

    python benchmarks/tokenizer_bench.py [--vocab 16000] [--stream-tokens 4096]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import median_range, paired_ratios  # noqa: E402
from ernie45.tokenizer import Tokenizer  # noqa: E402
from ernie45.utils import atomic_write_text  # noqa: E402
from tests.test_tokenizer import OFFICIAL, OFFICIAL_FIRST_ADDED_ID  # noqa: E402


def corpus_texts() -> list[str]:
    texts = []
    for name in ("en_fortunes.jsonl", "zh_poems.jsonl"):
        with open(os.path.join(ROOT, "data", "corpus", name), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return texts


def build_tokenizer(folder: str, texts: list[str], vocab: int) -> None:
    import shutil

    import sentencepiece as spm

    with open(os.path.join(OFFICIAL, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    specials = [cfg[k] for k in ("cls_token", "sep_token", "mask_token", "sys_start_token", "sys_end_token",
                                 "header_start_token", "header_end_token")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(folder, "tokenizer"), model_type="bpe",
        vocab_size=vocab, byte_fallback=True, character_coverage=0.9995, user_defined_symbols=specials,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, minloglevel=2, num_threads=2)
    with open(os.path.join(OFFICIAL, "added_tokens.json"), encoding="utf-8") as f:
        added = {t: i - OFFICIAL_FIRST_ADDED_ID + vocab for t, i in json.load(f).items()}
    with open(os.path.join(folder, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(OFFICIAL, name), folder)


def seconds(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(ours, theirs, rounds: int = 5) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """``rounds`` timings of each, alternating ours then theirs, so machine noise hits both sides of a pair."""
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(seconds(ours))
        t_theirs.append(seconds(theirs))
    return t_ours, t_theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--stream-tokens", type=int, default=4096)
    args = ap.parse_args()
    import transformers

    texts = corpus_texts()
    nbytes = sum(len(t.encode()) for t in texts)
    rows: list[tuple[str, list[float], list[float], str]] = []  # (what, ours, transformers, unit)
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        build_tokenizer(folder, texts, args.vocab)
        train_s = time.perf_counter() - t

        ours_load, hf_load = paired(lambda: Tokenizer.from_pretrained(folder), lambda: transformers.LlamaTokenizer
                                    .from_pretrained(folder, legacy=True, add_bos_token=False, add_prefix_space=False))
        rows.append(("load (s)", ours_load, hf_load, "s"))
        ours = Tokenizer.from_pretrained(folder)
        hf = transformers.LlamaTokenizer.from_pretrained(folder, legacy=True, add_bos_token=False,
                                                         add_prefix_space=False)

        ours_ids = [ours.encode(x) for x in texts]
        hf_ids = [hf.encode(x, add_special_tokens=False) for x in texts]
        mismatches = sum(a != b for a, b in zip(ours_ids, hf_ids))
        ntok = sum(map(len, ours_ids))
        def mbs(ts: list[float]) -> list[float]:
            return [nbytes / t / 1e6 for t in ts]

        t_ours, t_hf = paired(lambda: [ours.encode(x) for x in texts],
                              lambda: [hf.encode(x, add_special_tokens=False) for x in texts])
        rows.append(("encode, one doc per call (MB/s)", mbs(t_ours), mbs(t_hf), "MB/s"))
        t_ours, t_hf_batch = paired(lambda: [ours.encode(x) for x in texts],
                                    lambda: hf(texts, add_special_tokens=False)["input_ids"])
        rows.append(("encode, transformers batched call (MB/s)", mbs(t_ours), mbs(t_hf_batch), "MB/s"))
        t_ours, t_hf = paired(lambda: [ours.decode(x) for x in ours_ids],
                              lambda: [hf.decode(x, skip_special_tokens=True) for x in ours_ids])
        rows.append(("decode, one doc per call (Mtok/s)", [ntok / t / 1e6 for t in t_ours],
                     [ntok / t / 1e6 for t in t_hf], "Mtok/s"))
        dec_mismatch = sum(ours.decode(x) != hf.decode(x, skip_special_tokens=True) for x in ours_ids)

        # One long "generation": corpus tokens back to back, detokenized one token per step.
        stream = [i for ids in ours_ids for i in ids][: args.stream_tokens]

        def ours_stream() -> str:
            det = ours.detokenizer()
            for i in stream:
                det.step([i])
            return det.text

        def hf_stream() -> str:  # transformers' TextStreamer: decode the whole cache at every put()
            cache: list[int] = []
            printed = 0
            text = ""
            for i in stream:
                cache.append(i)
                text = hf.decode(cache, skip_special_tokens=True)
                if not text.endswith("\ufffd"):
                    printed = len(text)
            return text[:printed]

        def window_stream() -> str:  # vLLM / TGI: decode a short window of ids twice, emit the difference
            ids: list[int] = []
            prefix, read, text = 0, 0, ""
            for i in stream:
                ids.append(i)
                before = hf.decode(ids[prefix:read], skip_special_tokens=True)
                after = hf.decode(ids[prefix:], skip_special_tokens=True)
                if len(after) > len(before) and not after.endswith("\ufffd"):
                    text += after[len(before):]
                    prefix, read = read, len(ids)
            return text

        assert ours_stream() == hf_stream() == window_stream() and ours.decode(stream).startswith(ours_stream())
        n = len(stream)

        def us(ts: list[float]) -> list[float]:
            return [t / n * 1e6 for t in ts]

        t_ours, t_hf = paired(ours_stream, hf_stream, 3)  # TextStreamer takes ~12 s a run
        rows.append((f"streaming detok, {n} tokens, vs TextStreamer (us/token)", us(t_ours), us(t_hf), "us/token"))
        t_ours, t_win = paired(ours_stream, window_stream)
        rows.append((f"streaming detok, {n} tokens, vs vLLM/TGI offset window (us/token)", us(t_ours), us(t_win),
                     "us/token"))

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cmd = "python " + " ".join(sys.argv)
    lines = [
        f"# Tokenizer benchmark ({datetime.date.today()})", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; transformers {transformers.__version__}",
        f"- command: `{cmd}`; commit {commit}",
        f"- model: SentencePiece BPE + byte fallback, vocab {args.vocab} + 1009 added tokens, trained in "
        f"{train_s:.1f} s on data/corpus ({len(texts)} docs, {nbytes / 1e6:.2f} MB, {ntok} tokens)",
        f"- encode parity with transformers: {len(texts) - mismatches}/{len(texts)} docs identical; "
        f"decode parity: {len(texts) - dec_mismatch}/{len(texts)}", "",
        "- method: each figure is timed in 5 rounds (3 against TextStreamer), ours then transformers back to back; "
        "the figures are the median round's with the range over rounds in brackets, the ratio is the median of the "
        "per-round ratios with its range", "",
        "| work | ernie45 | transformers | ratio (higher = ours better), median of paired rounds (range) |",
        "|---|---|---|---|",
    ]
    for what, a, b, unit in rows:
        ratios = paired_ratios(a, b, higher_is_better=unit not in ("s", "us/token"))
        lines.append(f"| {what} | {median_range(a, '{:.3g}')} | {median_range(b, '{:.3g}')} | "
                     f"{median_range(ratios, unit='x')} |")
    report = "\n".join(lines) + "\n"
    print(report)
    out = os.path.join(ROOT, "benchmarks", "results", f"{datetime.date.today()}-tokenizer.md")
    atomic_write_text(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
