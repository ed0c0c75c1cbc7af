"""Write data/corpus/en_kjv.jsonl: the King James Bible, one record per chapter, from Debian's `bible-kjv`.

    apt-get install bible-kjv          # the `bible` program and its data package bible-kjv-text
    python3 scripts/corpus_kjv.py      # -> data/corpus/en_kjv.jsonl (atomic write)

`bible -l0 gen1:1-rev22:21` prints every chapter as a heading line ("Genesis 1"), a blank line, then one
verse a line ("  1 In the beginning ..."). A record is the heading, a blank line and the chapter's verses
as running prose (verse numbers dropped, verses joined by a space), so the demo model learns sentences
rather than numbered lines. Licence and provenance: data/SOURCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ernie45.utils import atomic_write_text  # noqa: E402

VERSE = re.compile(r"^\s+(\d+) (.*)$")


def chapters(text: str) -> list[dict]:
    out: list[dict] = []
    heading, verses = None, []

    def close() -> None:
        if heading is not None:
            out.append({"text": f"{heading}\n\n{' '.join(verses)}", "source": "kjv"})

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m:
            if heading is None:
                raise ValueError(f"line {n}: a verse before any chapter heading: {line!r}")
            if int(m.group(1)) != len(verses) + 1:
                raise ValueError(f"line {n}: {heading} verse {m.group(1)} follows verse {len(verses)}")
            verses.append(m.group(2).strip())
            continue
        close()
        heading, verses = line.strip(), []
    close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/corpus/en_kjv.jsonl")
    ap.add_argument("--from-file", help="read `bible -l0` output from this file instead of running `bible`")
    args = ap.parse_args(argv)
    if args.from_file:
        with open(args.from_file, encoding="utf-8") as f:
            text = f.read()
    else:
        if shutil.which("bible") is None:
            print("corpus_kjv: the `bible` program is missing; install it with `apt-get install bible-kjv`",
                  file=sys.stderr)
            return 2
        text = subprocess.run(["bible", "-l0", "gen1:1-rev22:21"], check=True, capture_output=True,
                              text=True).stdout
    records = chapters(text)
    if len(records) != 1189:   # the Protestant canon's chapter count: anything else means a bad dump
        print(f"corpus_kjv: {len(records)} chapters parsed, expected 1189; check `bible -l0` output",
              file=sys.stderr)
        return 1
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    words = sum(len(r["text"].split()) for r in records)
    print(f"{args.out}: {len(records)} chapters, {words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
