#!/usr/bin/env bash
# For a user with a CUDA GPU: check that alpha = 1 is exact on your card, and produce the
# three variants' rows there. Nothing in results/ was measured on a GPU by this project.
#
#   bash gpu_check.sh                          # Qwen2.5-Coder-1.5B (fetched on first use)
#   bash gpu_check.sh Qwen/Qwen2.5-3B-Instruct # the original's model, if you can reach the hub
#   bash gpu_check.sh qwen2.5-coder-1.5b Qwen/Qwen2.5-7B-Instruct
#                                              # and a model larger than the card (NF4 ~5.5 GB)
#
# Send back: the new rows of results/*.csv (each names your GPU, versions and commit) and
# gpu_check.log. Rows are appended: your CPU or GPU rows never change a published ratio,
# since every variant row carries the baseline of its own run.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${1:-qwen2.5-coder-1.5b}
exec > >(tee -a gpu_check.log) 2>&1
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device (CPU build of torch?)'; \
print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
python check_exact.py --model "$MODEL" --device cuda             # logits and greedy tokens, fp32/bf16/nf4
python run_baseline.py --model "$MODEL" --device cuda
python run_kvcache.py --model "$MODEL" --device cuda             # the original's KV-cache variant
python run_diskoffload.py --model "$MODEL" --device cuda         # stream residency, read-ahead 2
python run_diskoffload.py --model "$MODEL" --device cuda --prefetch 0 --ppl-max-tokens 0
python sweep.py load                                             # load peaks (load_peak_bytes), results/load.csv
BIG=${2:-}
if [ -n "$BIG" ]; then
  # Larger than the card: only stream residency runs it (the baseline and a session would need
  # every layer on the device at once); its load stores the offloaded layers one at a time.
  python run_diskoffload.py --model "$BIG" --device cuda --max-new-tokens 16 --ppl-max-tokens 1024 \
    --out results/load.csv
fi
python report.py
