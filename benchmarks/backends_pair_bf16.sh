#!/bin/bash
# issue 22 speed check: bf16 mid-4L batch-1 decode, the commit before the backends work (ec7ab50) against main, alternating
for i in 1 2 3; do
  for v in base main; do
    if [ $v = base ]; then d=/tmp/base; else d=/work/main; fi
    (cd $d && PYTHONPATH=$d /work/main/.venv/bin/python benchmarks/bench_generate.py --batch-sizes 1 --rounds 2 --skip-hf --new-tokens 96 2>/dev/null | grep "^ours" | sed "s/^/$v $i /")
  done
done
