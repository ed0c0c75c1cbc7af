"""scripts/corpus_kjv.py (the demo corpus's King James Bible) and the file it wrote: chapters as running prose,
verse numbering checked, the shipped file's shape."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.train.conftest import ROOT

DUMP = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Genesis 2

  1 Thus the heavens and the earth were finished.
"""


def _script():
    spec = importlib.util.spec_from_file_location("corpus_kjv", os.path.join(ROOT, "scripts", "corpus_kjv.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chapters_are_heading_then_prose():
    recs = _script().chapters(DUMP)
    assert [r["text"] for r in recs] == [
        "Genesis 1\n\nIn the beginning God created the heaven and the earth. And the earth was without form, and void.",
        "Genesis 2\n\nThus the heavens and the earth were finished."]
    assert {r["source"] for r in recs} == {"kjv"}


def test_a_skipped_verse_or_a_verse_without_heading_is_refused():
    mod = _script()
    with pytest.raises(ValueError, match="Genesis 1 verse 3 follows verse 1"):
        mod.chapters(DUMP.replace("  2 And", "  3 And"))
    with pytest.raises(ValueError, match="a verse before any chapter heading"):
        mod.chapters("  1 In the beginning\n")


def test_a_short_dump_is_not_written(tmp_path):
    dump, out = tmp_path / "dump.txt", tmp_path / "kjv.jsonl"
    dump.write_text(DUMP, encoding="utf-8")
    assert _script().main(["--from-file", str(dump), "--out", str(out)]) == 1   # 2 chapters, not 1,189
    assert not out.exists()


def test_shipped_corpus_file():
    with open(os.path.join(ROOT, "data", "corpus", "en_kjv.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == 1189
    assert recs[0]["text"].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth. And")
    assert recs[-1]["text"].startswith("Revelation 22\n\n") and recs[-1]["text"].endswith("Amen.")
