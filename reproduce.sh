#!/usr/bin/env bash
# The commands that produced results/*.csv on the CPU machine. Run alone: any other load on
# the machine moves the speed figures (rows record it: columns other_cpu_share and busy).
# Every variant row times the unpatched model in the same process, interleaved, so its
# ratios do not depend on other rows.
#
# On a 2-core CPU without AVX512-BF16, bitsandbytes computes NF4 by dequantising every
# weight to bf16 for every forward (no fused kernel): Qwen2.5-Coder-1.5B decodes at about
# 0.6 tok/s and one 512-token perplexity window takes about 1.5 minutes. Hence the short
# decodes (--max-new-tokens 16) and perplexity (8,192 tokens, ~24 min) only where it is
# the point of the row; alpha = 1 equality is shown for every format by check_exact.py.
set -euo pipefail
cd "$(dirname "$0")"
QWEN="--max-new-tokens 16"
NO_PPL="--ppl-max-tokens 0"

# --- Qwen2.5-Coder-1.5B (the reference architecture; even layers 2..24 = 12 of 28) ---------
M=qwen2.5-coder-1.5b
python run_baseline.py --model $M $QWEN                              # PPL on 8,192 wiki tokens
OFFLOAD_SKIP_CACHE=$(mktemp -d) python run_kvcache.py --model $M $QWEN $NO_PPL   # a first run: fetch + conversion included
python run_diskoffload.py --model $M $QWEN --prefetch 0 $NO_PPL
python run_diskoffload.py --model $M --max-new-tokens 8 --prefetch 1 $NO_PPL
python run_baseline.py --model $M $QWEN --quant bf16 $NO_PPL         # NF4 vs bf16 decode on this CPU
python check_exact.py --model $M --window-tokens 256 --greedy-tokens 16

# --- Qwen2.5-Coder-0.5B (even layers 2..20 = 10 of 24) --------------------------------------
M=qwen2.5-coder-0.5b
python run_kvcache.py --model $M                                     # the main job, defaults
python run_baseline.py --model $M $QWEN
python run_diskoffload.py --model $M $QWEN --prefetch 0
python run_diskoffload.py --model $M $QWEN --prefetch 2 $NO_PPL
python check_exact.py --model $M --greedy-tokens 32

# --- SmolLM2-135M (Llama; even layers 2..26 = 13 of 30) --------------------------------------
python run_baseline.py
python run_kvcache.py
python run_diskoffload.py
# python check_exact.py    # SmolLM2's exactness rows: not re-run on this machine yet (shown before on an AVX512 EPYC)

# Not run yet on this machine (no time left in the session that made these rows):
#   python eval_ppl.py --model qwen2.5-coder-1.5b --variant diskoffload     # ~24 min here
#   python run_kvcache.py --model qwen2.5-coder-1.5b --quant bf16 $QWEN $NO_PPL   # pairs without
#   python run_diskoffload.py --model qwen2.5-coder-1.5b --quant bf16 $QWEN --prefetch 0 $NO_PPL   # NF4 dequantisation
# alpha = 1 equality of the 1.5B's logits is shown by check_exact.py above.

# --- The study (results/README.md "Findings: the study"): perplexity sweeps, fp32, one eval_ppl.py process per case --
# results/<suite>.csv; a case already in its CSV is skipped. The planner needs importance first.
for suite in alpha importance planner distance patterns context; do
  python sweep.py $suite
done

# --- Streaming against its peers, cold reads, batches (results/README.md "Streaming against its peers") ---
python run_peers.py --model smollm2-135m --prefetch 0 --repeats 5 --max-new-tokens 32        # needs: pip install airllm
python run_peers.py --model smollm2-135m --quant nf4 --peers none --prefetch 0 --repeats 5 --max-new-tokens 32
Q="--model qwen2.5-coder-0.5b --quant bf16 --max-new-tokens 16 --repeats 3 --ppl-max-tokens 0 --out results/cold.csv"
for p in 0 1 2 3; do python run_diskoffload.py $Q --cold --prefetch $p; done
for p in 0 2; do python run_diskoffload.py $Q --prefetch $p; done
B="--max-new-tokens 16 --ppl-max-tokens 0 --out results/batch.csv"
for b in 1 4 16; do
  python run_kvcache.py $B --batch-size $b --repeats 5
  python run_diskoffload.py $B --batch-size $b --repeats 5 --prefetch 0
done
python run_diskoffload.py $B --batch-size 16 --repeats 9 --prefetch 0
for b in 1 16; do python profile_step.py --batch-size $b --prefetch 0 --max-new-tokens 8 --repeats 3; done

# --- Beyond the layers: embedding rows from disk, NF4 head (results/README.md "Beyond the layers") ---
python sweep.py beyond

# --- Models larger than the device: load peaks, the offloaded layers stored one at a time
# before the rest loads (results/README.md "Models larger than the device") ---
python sweep.py load

python estimate.py --check results
python report.py
