#!/usr/bin/env bash
# Rebuild the bundled demo model (ernie45/assets/demo/) from the corpus in data/:
#   1. a 6144-piece byte-fallback BPE SentencePiece tokenizer with ERNIE's special tokens,
#   2. `ernie45 train pretrain` on data/corpus (English fortunes + Chinese Tang/Song poems),
#   3. `ernie45 train sft` on data/sft_demo.jsonl,
#   3b. its MTP head (speculative decoding) on the corpus with the model frozen (recipes/demo_mtp.yaml),
#   4. copy the exported bf16 HF checkpoint + tokenizer into the package.
# Heavy (minutes of CPU): run it under the shared lock, e.g.
#   flock /tmp/ernie45-heavy.lock scripts/build_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
# One thread: on the shared 2-core machine two OpenMP threads spin at barriers while the other core is
# busy, and a step takes ~10x longer (measured). Set OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m ernie45.train.spm runs/demo_tokenizer data/corpus/en_fortunes.jsonl data/corpus/zh_poems.jsonl \
  --vocab-size 6144 --model-max-length 4096
python3 -m ernie45.cli train pretrain --config recipes/demo_pretrain.yaml
python3 -m ernie45.cli train sft --config recipes/demo_sft.yaml
python3 -m ernie45.cli train pretrain --config recipes/demo_mtp.yaml   # the MTP head, model frozen
rm -rf ernie45/assets/demo.tmp
cp -r runs/demo_mtp/final ernie45/assets/demo.tmp
cp runs/demo_pretrain/metrics.jsonl ernie45/assets/demo.tmp/pretrain_metrics.jsonl
cp runs/demo_sft/metrics.jsonl ernie45/assets/demo.tmp/sft_metrics.jsonl
cp runs/demo_mtp/metrics.jsonl ernie45/assets/demo.tmp/mtp_metrics.jsonl
cp scripts/demo_README.md ernie45/assets/demo.tmp/README.md
chmod 644 ernie45/assets/demo.tmp/*
rm -rf ernie45/assets/demo && mv ernie45/assets/demo.tmp ernie45/assets/demo
du -sh ernie45/assets/demo
