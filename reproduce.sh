#!/usr/bin/env bash
# The commands that produced results/*.csv on the CPU machine (embedded SmolLM2-135M NF4,
# even layers). Run alone: any other load on the machine moves the speed figures.
set -euo pipefail
cd "$(dirname "$0")"
SWEEP="--ppl-max-tokens 0 --repeats 5"
SLOW="--io-bandwidth 1.5G"   # 13 layers x 1.88 MB = 24.5 MB per token: ~16 ms, about one resident token

python run_baseline.py                                   # resident, measured before ...
python run_kvcache.py                                    # session residency (the original's main job)
python run_diskoffload.py                                # stream residency, CPU default read-ahead

for depth in 0 1 2 3; do python run_diskoffload.py --prefetch $depth $SWEEP; done
for depth in 0 1 2 3; do python run_diskoffload.py --prefetch $depth $SLOW $SWEEP; done
python run_diskoffload.py --prefetch 0 --budget 12M $SWEEP       # half the offloaded layers stay resident
python run_diskoffload.py --prefetch 2 --budget 12M $SLOW $SWEEP
python run_diskoffload.py --prefetch 0 --no-kv-cache --ppl-max-tokens 0   # the original's slow variant

python eval_ppl.py --variant baseline --ppl-dataset short          # the original's kind of figure
python eval_ppl.py --variant kvcache --ppl-dataset short
python eval_ppl.py --variant baseline --ppl-ctx 2048               # longer contexts
python eval_ppl.py --variant diskoffload --ppl-ctx 2048
python eval_ppl.py --variant baseline --ppl-ctx 8192 --ppl-max-tokens 16384
python eval_ppl.py --variant diskoffload --ppl-ctx 8192 --ppl-max-tokens 16384
python eval_ppl.py --variant diskoffload --alpha 0                 # plain layer removal
python eval_ppl.py --variant diskoffload --layers 2-5 --alpha 0.5  # parallel residuals, scaled

python run_baseline.py                                   # ... and after
python check_exact.py                                   # alpha = 1 against the original, per weight format

# Gemma 3 270M (sliding-window and full-attention layers, 18 layers: 7 offloaded)
python run_baseline.py --model gemma3-270m
python run_kvcache.py --model gemma3-270m
python run_diskoffload.py --model gemma3-270m
python check_exact.py --model gemma3-270m
python estimate.py --check results
python report.py
