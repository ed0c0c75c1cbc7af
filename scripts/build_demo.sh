#!/usr/bin/env bash
# Rebuild the bundled demo model (ernie45/assets/demo/) from the corpus in data/:
#   1. a 6144-piece byte-fallback BPE SentencePiece tokenizer with ERNIE's special tokens,
#   2. `ernie45 train pretrain` on data/corpus (English fortunes, the King James Bible, Chinese Tang/Song poems),
#   3. `ernie45 train sft` on data/sft_demo.jsonl,
#   3b. its MTP head (speculative decoding), the model frozen: the SFT model's own continuations of corpus prompts
#       (scripts/demo_mtp_data.py), then the head trained on them and the corpus (recipes/demo_mtp.yaml),
#   4. copy the exported bf16 HF checkpoint + tokenizer into the package, checking that stage 3b left every
#      non-MTP tensor as SFT made it.
# `scripts/build_demo.sh mtp` runs stage 3b (and 4) alone from runs/demo_sft/final. Without runs/ (a fresh
# checkout), that input is derived from the shipped demo by dropping its model.mtp_* tensors: the shipped demo's
# other weights are runs/demo_sft/final's, bit for bit (stage 3b trains only the MTP block), and the shipped
# pretraining/SFT metrics are kept.
# Heavy (minutes of CPU): run it under the shared lock, e.g.
#   flock /tmp/ernie45-heavy.lock scripts/build_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
# One thread: on the shared 2-core machine two OpenMP threads spin at barriers while the other core is
# busy, and a step takes ~10x longer (measured). Set OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
stage="${1:-all}"
case "$stage" in all | mtp) ;; *) echo "usage: $0 [all|mtp]" >&2; exit 2 ;; esac
if [ "$stage" = all ]; then
  python3 -m ernie45.train.spm runs/demo_tokenizer data/corpus/en_fortunes.jsonl data/corpus/zh_poems.jsonl \
    data/corpus/en_kjv.jsonl \
    --vocab-size 6144 --model-max-length 4096
  python3 -m ernie45.cli train pretrain --config recipes/demo_pretrain.yaml
  python3 -m ernie45.cli train sft --config recipes/demo_sft.yaml
elif [ ! -f runs/demo_sft/final/model.safetensors ]; then
  python3 - <<'EOF'
# runs/demo_sft/final from the shipped demo: every file but the MTP tensors (and the metrics and README).
import json, os, shutil
from safetensors.torch import load_file, save_file
src, dst = "ernie45/assets/demo", "runs/demo_sft/final"
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*_metrics.jsonl", "README.md"))
tensors = {k: v for k, v in load_file(os.path.join(src, "model.safetensors")).items() if ".mtp_" not in k}
save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(dst, "config.json")))
cfg["num_nextn_predict_layers"] = 0
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
print(f"{dst}: {len(tensors)} tensors from {src} (MTP block dropped)")
EOF
fi
python3 scripts/demo_mtp_data.py runs/demo_sft/final runs/demo_mtp_data.jsonl   # the model's own text
python3 -m ernie45.cli train pretrain --config recipes/demo_mtp.yaml   # the MTP head, model frozen
rm -rf ernie45/assets/demo.tmp
cp -r runs/demo_mtp/final ernie45/assets/demo.tmp
python3 - <<'EOF'
# Stage 3b trains only the MTP block: every other tensor must be the SFT model's, bit for bit.
import torch
from safetensors.torch import load_file
sft = load_file("runs/demo_sft/final/model.safetensors")
new = load_file("ernie45/assets/demo.tmp/model.safetensors")
rest = sorted(k for k in new if ".mtp_" not in k)
assert rest == sorted(sft), f"tensor names differ: {sorted(set(rest) ^ set(sft))}"
bad = [k for k in rest if new[k].dtype != sft[k].dtype or not torch.equal(new[k].view(-1).view(torch.uint8),
                                                                          sft[k].view(-1).view(torch.uint8))]
assert not bad, f"the MTP stage changed non-MTP tensors: {bad}"
print(f"{len(rest)} non-MTP tensors bit-identical to runs/demo_sft/final; {len(new) - len(rest)} MTP tensors")
EOF
if [ "$stage" = all ]; then
  cp runs/demo_pretrain/metrics.jsonl ernie45/assets/demo.tmp/pretrain_metrics.jsonl
  cp runs/demo_sft/metrics.jsonl ernie45/assets/demo.tmp/sft_metrics.jsonl
else
  cp ernie45/assets/demo/pretrain_metrics.jsonl ernie45/assets/demo/sft_metrics.jsonl ernie45/assets/demo.tmp/
fi
cp runs/demo_mtp/metrics.jsonl ernie45/assets/demo.tmp/mtp_metrics.jsonl
cp scripts/demo_README.md ernie45/assets/demo.tmp/README.md
chmod 644 ernie45/assets/demo.tmp/*
rm -rf ernie45/assets/demo && mv ernie45/assets/demo.tmp ernie45/assets/demo
du -sh ernie45/assets/demo
