#!/bin/bash
for i in 1 2 3; do
  for v in base main; do
    if [ $v = base ]; then d=/tmp/base; else d=/work/main; fi
    (cd $d && PYTHONPATH=$d /work/main/.venv/bin/python benchmarks/backends_qdecode.py $d int4 2>/dev/null | tail -1 | sed "s/^/$v $i /")
  done
done
