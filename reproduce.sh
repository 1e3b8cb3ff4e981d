#!/usr/bin/env bash
# The commands that produced results/*.csv on the CPU machine. Run alone: any other load on
# the machine moves the speed figures (rows record it: columns other_cpu_share and busy).
# Every variant row times the unpatched model in the same process, interleaved, so its
# ratios do not depend on other rows.
#
# bitsandbytes computes NF4 on a CPU in one of two ways (README "NF4 on the two CPU kinds"):
# with AVX512-BF16 through a fused kernel, without it by dequantising every weight for every
# forward, several times slower. The rows' cpu_isa column says which ran. The script defaults
# are the quick main job (32 new tokens, 2,048 perplexity tokens); the headline rows use the
# full protocol, spelled out below (FULL: 64 new tokens, 8,192 wiki tokens of perplexity).
#
#   bash reproduce.sh                # everything below, in order
#   bash reproduce.sh --quickstart   # only the quick start's captures (results/quickstart.txt, device_budget.txt),
#                                    # then python report.py
#                                    # copies it into README.md: run it alone on the machine, the model converted
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") QUICK=0 ;;
  --quickstart) QUICK=1 ;;
  *) echo "reproduce.sh: error: unknown argument '$1' (use --quickstart or nothing)" >&2; exit 2 ;;
esac
FULL="--max-new-tokens 64 --ppl-max-tokens 8192"
QWEN="--max-new-tokens 16"
NO_PPL="--ppl-max-tokens 0"

# --- The quick start's output (README), captured with the runtime the user waits ------------
TIMEFORMAT='runtime: %R s'; { time python run_kvcache.py 2>/dev/null; } 2>&1 | tee results/quickstart.txt
# and the plan a device budget gets (README's quick start shows what it prints)
python run_diskoffload.py --device-budget 80MB --ppl-max-tokens 0 2>/dev/null | tee results/device_budget.txt
if [ "$QUICK" = 1 ]; then python report.py; exit 0; fi
# How long a user waits on this machine as it is (README's "how long" line): results/timings.csv
python timings.py main-job
python timings.py tests

# --- Qwen2.5-Coder-1.5B (the reference architecture; even layers 2..24 = 12 of 28) ---------
M=qwen2.5-coder-1.5b
python run_baseline.py --model $M $QWEN --ppl-max-tokens 8192
python run_kvcache.py --model $M $QWEN $NO_PPL
python run_diskoffload.py --model $M $QWEN --prefetch 0 $NO_PPL
python run_diskoffload.py --model $M --max-new-tokens 8 --prefetch 1 $NO_PPL
python run_baseline.py --model $M $QWEN --quant bf16 $NO_PPL         # NF4 vs bf16 decode on this CPU
python check_exact.py --model $M --window-tokens 256 --greedy-tokens 16

# --- Qwen2.5-Coder-0.5B (even layers 2..20 = 10 of 24) --------------------------------------
M=qwen2.5-coder-0.5b
python run_kvcache.py --model $M $FULL
python run_baseline.py --model $M $QWEN --ppl-max-tokens 8192
python run_diskoffload.py --model $M $QWEN --prefetch 0 --ppl-max-tokens 8192
python run_diskoffload.py --model $M $QWEN --prefetch 2 $NO_PPL
python check_exact.py --model $M --greedy-tokens 32

# --- SmolLM2-135M (Llama; even layers 2..26 = 13 of 30) --------------------------------------
python run_baseline.py $FULL
python run_kvcache.py $FULL
python run_diskoffload.py $FULL
python check_exact.py

# Not run yet (each session had other work for its time):
#   python eval_ppl.py --model qwen2.5-coder-1.5b --variant diskoffload --ppl-max-tokens 8192
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
Q="--model qwen2.5-coder-0.5b --quant bf16 --cpu-read copy --max-new-tokens 16 --repeats 3 --ppl-max-tokens 0 --out results/cold.csv"
for p in 0 1 2 3; do python run_diskoffload.py $Q --cold --prefetch $p; done
for p in 0 2; do python run_diskoffload.py $Q --prefetch $p; done
B="--max-new-tokens 16 --ppl-max-tokens 0 --out results/batch.csv"
for b in 1 4 16; do
  python run_kvcache.py $B --batch-size $b --repeats 5
  python run_diskoffload.py $B --batch-size $b --repeats 5 --prefetch 0
done
python run_diskoffload.py $B --batch-size 16 --repeats 9 --prefetch 0
for b in 1 16; do python profile_step.py --batch-size $b --prefetch 0 --max-new-tokens 8 --repeats 3; done

# --- On a CPU, a streamed layer mapped or copied (results/README.md "Mapped or copied") -------
python sweep.py cpu_read
for r in copy map; do
  python run_peers.py --model smollm2-135m --prefetch 0 --repeats 5 --max-new-tokens 32 --peers accelerate-disk --cpu-read $r
done

# --- Speculative decoding over stream residency (results/README.md "Speculative decoding") -----
# Qwen2.5-Coder-1.5B bf16 and NF4, drafts: the 0.5B sibling, self substitutes (NF4, HQQ 3/2-bit), prompt lookup
python sweep.py speculative

# --- Beyond the layers: embedding rows from disk, NF4 head (results/README.md "Beyond the layers") ---
python sweep.py beyond

# --- Models larger than the device: load peaks, the offloaded layers stored one at a time
# before the rest loads (results/README.md "Models larger than the device") ---
python sweep.py load

python estimate.py --check results
python report.py
