#!/usr/bin/env bash
# On a CUDA GPU, offline: the CUDA test cases, then the rows this project cannot measure itself
# (no GPU here: every row in results/ is a CPU row), in at most 10 minutes of one GPU. Nothing
# is downloaded and nothing comes from a package index:
#   - torch and transformers must meet the repo's floor (check_env.py holds it);
#   - if `import bitsandbytes` fails, it is installed from a wheel in wheels/ (git-ignored: put
#     a bitsandbytes-*.whl there) with pip --no-deps --no-index into wheels/site, leaving the
#     environment as it is; with no wheel the NF4 cases are skipped and one line says so.
#
#   bash gpu_check.sh                          # rows, test report and log go to gpu_check/
#   GPU_CHECK_DIR=/tmp/rows bash gpu_check.sh  # ... or there
#   GPU_CHECK_DRY_RUN=1 bash gpu_check.sh      # print the steps it would run, run none
#   LAYERS14=every:3 bash gpu_check.sh         # the 14B row's offloaded layers (a --layers pattern)
#
# Every step runs under a time limit (the limits sum to 590 s); each prints its wall time and
# where its rows went, a failed or timed-out step does not stop the ones after it, and the exit
# status is 1 if any step failed (2: this machine cannot run the check). Send back the folder:
# every row names the GPU, the library versions and the commit.
set -uo pipefail
cd "$(dirname "$0")"

fail() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
[ $# -eq 0 ] || fail "takes no arguments; its settings are environment variables (see the head of the script)"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # a bare GPU image may have only python3
DIR=${GPU_CHECK_DIR:-gpu_check}
WHEELS=${GPU_CHECK_WHEELS:-$PWD/wheels}
SITE=$WHEELS/site
CACHE=${OFFLOAD_SKIP_CACHE:-$HOME/.cache/offload-skip}
DRY=${GPU_CHECK_DRY_RUN:-0}
# Qwen2.5-14B's even layers 2..44 streamed (22 of 48; no two adjacent, so alpha = 1 stays exact)
# and its input embedding read row by row: the resident part (26 NF4 layers of ~142 MB and the
# 1.56 GB bf16 head) and a stream slot stay within 6 GiB, what a 6 GB card could hold
LAYERS14=${LAYERS14:-even}
REAL=qwen2.5-coder-1.5b  # real weights, used only where the cache already holds them converted
case $DRY in 0|1) ;; *) fail "GPU_CHECK_DRY_RUN must be 0 or 1, got '$DRY'" ;; esac

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network: nothing may ask the hub
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ]; then
  mkdir -p "$DIR" || fail "cannot create $DIR"
  exec > >(tee -a "$DIR/gpu_check.log") 2>&1
fi

STEPS=0
FAILED=()
BEGIN_MS=$(date +%s%3N)
seconds_since() { local ms=$(( $(date +%s%3N) - $1 )); echo "$((ms / 1000)).$(( ms % 1000 / 100 )) s"; }

step() {  # step NAME LIMIT_S WHERE COMMAND...: COMMAND under a LIMIT_S time limit; WHERE: its rows
  local name=$1 limit=$2 where=$3 start status=0 why
  shift 3
  STEPS=$((STEPS + 1))
  echo "== step $STEPS: $name (limit $limit s)"
  echo "\$ $*"
  [ "$DRY" = 0 ] || return 0
  start=$(date +%s%3N)
  timeout --kill-after=5 "$limit" "$@" || status=$?
  if [ "$status" = 0 ]; then
    echo "-- step $STEPS: ok in $(seconds_since "$start"); $where"
    return 0
  fi
  why="exit $status"
  [ "$status" != 124 ] || why="timed out after $limit s"
  echo "-- step $STEPS: FAILED ($why) in $(seconds_since "$start"); $where"
  FAILED+=("step $STEPS: $name")
  return 1
}

skipped() { echo "== skipped: $*"; }

bitsandbytes_imports() { "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; }

# --- can this machine run the check at all: versions against the floor, a GPU ------------------
step "torch and transformers against the floor, the GPU" 20 "no rows" "$PYTHON" check_env.py --device cuda ||
  fail "this machine cannot run the check (step 1 above says why)"

# --- NF4: bitsandbytes, from wheels/ if it does not import --------------------------------------
NF4=1
if ! bitsandbytes_imports; then
  WHEEL=$(ls "$WHEELS"/bitsandbytes-*.whl 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$WHEEL" ]; then
    NF4=0 WHY="bitsandbytes does not import and $WHEELS holds no bitsandbytes-*.whl"
  elif ! step "install bitsandbytes from its wheel, no index" 30 "into $SITE" \
      "$PYTHON" -m pip install --no-deps --no-index --upgrade --target "$SITE" "$WHEEL"; then
    NF4=0 WHY="installing $WHEEL failed"
  elif [ "$DRY" = 0 ] && ! bitsandbytes_imports; then
    NF4=0 WHY="bitsandbytes from $WHEEL does not import"
  fi
fi
if [ "$NF4" = 1 ]; then
  QUANT=nf4
  echo "NF4: bitsandbytes imports; the NF4 cases run"
else
  QUANT=bf16
  echo "NF4: $WHY: NF4 cases skipped (the 3B rows run --quant bf16, the 14B row does not run)"
fi

# --- (1) the CUDA test cases --------------------------------------------------------------------
step "pytest -m cuda" 120 "no rows; test report $DIR/pytest-cuda.xml" \
  "$PYTHON" -m pytest -m cuda -rs --junitxml="$DIR/pytest-cuda.xml"

# --- (2) a 3B model (dummy weights): the three variants -----------------------------------------
for variant in baseline kvcache diskoffload; do
  step "dummy 3B, $variant ($QUANT)" 55 "rows: $DIR/$variant.csv" \
    "$PYTHON" "run_$variant.py" --model dummy:qwen2.5-3b --quant "$QUANT" --device cuda --ppl-max-tokens 0 \
    --max-new-tokens 32 --out "$DIR/$variant.csv"
done

# --- (3) a 14B model (dummy weights), larger than a small card: stream residency only -----------
if [ "$NF4" = 1 ]; then
  step "dummy 14B, diskoffload (nf4, layers $LAYERS14)" 100 "rows: $DIR/diskoffload.csv" \
    "$PYTHON" run_diskoffload.py --model dummy:qwen2.5-14b --quant nf4 --device cuda --ppl-max-tokens 0 \
    --max-new-tokens 16 --layers "$LAYERS14" --offload-embeddings --out "$DIR/diskoffload.csv"
else
  skipped "dummy 14B, diskoffload: needs NF4 (in bf16 it would stream ~26 GB a token, past the time limit)"
fi

# --- (3b) a device budget: the plan's probe, choice and row on CUDA (the dummy 3B, 1500 MiB) -----
step "dummy 3B, --device-budget 1500MiB ($QUANT)" 50 "rows: $DIR/diskoffload.csv" \
  "$PYTHON" run_diskoffload.py --model dummy:qwen2.5-3b --quant "$QUANT" --device cuda --ppl-max-tokens 0 \
  --max-new-tokens 16 --device-budget 1500MiB --out "$DIR/diskoffload.csv"

# --- (4) real weights, only where the cache holds them (nothing can be fetched here) ------------
if [ -f "$CACHE/hf/$REAL/CONVERSION_COMPLETE" ]; then
  QUANTS=fp32,bf16
  [ "$NF4" = 0 ] || QUANTS=fp32,bf16,nf4
  step "real weights, exactness ($REAL: $QUANTS)" 60 "rows: $DIR/exactness.csv" \
    "$PYTHON" check_exact.py --model "$REAL" --device cuda --quants "$QUANTS" --corpus README.md \
    --window-tokens 256 --greedy-tokens 16 --out "$DIR/exactness.csv"
  step "real weights, diskoffload ($REAL, $QUANT)" 45 "rows: $DIR/diskoffload.csv" \
    "$PYTHON" run_diskoffload.py --model "$REAL" --quant "$QUANT" --device cuda --ppl-max-tokens 0 \
    --max-new-tokens 16 --out "$DIR/diskoffload.csv"
else
  skipped "real-weight rows: $CACHE/hf/$REAL holds no converted checkpoint (no CONVERSION_COMPLETE)"
fi

if [ "$DRY" = 1 ]; then
  echo "== dry run: $STEPS steps listed, none run"
  exit 0
fi
echo "== $STEPS steps in $(seconds_since "$BEGIN_MS"), ${#FAILED[@]} failed; rows, test report and log in $DIR/"
for failed in ${FAILED[@]+"${FAILED[@]}"}; do
  echo "   $failed"
done
[ ${#FAILED[@]} -eq 0 ]
