#!/usr/bin/env bash
# The GPU check: the 8B-shaped run (config/llama31_8b_shaped.yaml) in bfloat16 on one CUDA GPU, then
# bench/bench_patching.py and bench/bench_cache.py on its model, printing each rule's wall time,
# peak GPU memory and matmul TFLOP/s. At most 10 minutes, no network.
#
#   bash bench/gpu_check.sh             # from the repository root, with the README's venv (.venv)
#   bash bench/gpu_check.sh --dry-run   # print the steps only (works without a GPU)
#   DEVICE=cpu N_PAIRS=2 bash bench/gpu_check.sh   # the same script on the CPU (a rehearsal: 8 min on 2 cores)
#
# Everything goes under build/gpu_check/ (git-ignored); the model and SAEs under build/8b_shaped/
# (kept: a second run skips the build). Knobs (environment): N_PAIRS (default 31: 192 prompts, against
# 18 in the CPU config), BUDGET_S (default 600, the whole script's deadline; 2400 with DEVICE=cpu),
# DEVICE (default cuda; cpu rehearses every step without a GPU, with 4x the time limits).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done

N_PAIRS=${N_PAIRS:-31}
DEVICE=${DEVICE:-cuda}
if [[ $DEVICE == cuda ]]; then SCALE=1; else SCALE=4; fi
BUDGET_S=${BUDGET_S:-$((600 * SCALE))}
BUILD=$REPO/build/8b_shaped
OUT=$REPO/build/gpu_check
RUN=$OUT/run
CONFIG=$OUT/config.yaml
STATS=$OUT/jobstats.jsonl
DEADLINE=$((SECONDS + BUDGET_S - 15))  # 15 s kept for the summary

# No network: the model is a local folder, the SAEs come from the local hub cache the build writes.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_CACHE=$BUILD/hub
export BUGSCOPE_JOB_STATS=$STATS PYTHONUNBUFFERED=1

if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

# step NAME MAX_SECONDS CMD...: print the command; run it unless --dry-run, within its own limit and
# the script's deadline, and say how long it took. A failed step is recorded and the later steps
# still run (a pipeline cut short still leaves the model and prompts the benchmarks need).
FAILED=()
step() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  echo "== $name (at most ${limit} s): $*"
  [[ $DRY_RUN == 1 ]] && return 0
  local left=$((DEADLINE - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit <= 0)); then
    echo "== $name: FAILED (no time left)" >&2
    FAILED+=("$name")
    return 0
  fi
  local t0=$SECONDS rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" || rc=$?
  if ((rc == 0)); then
    echo "== $name: done in $((SECONDS - t0)) s"
  else
    echo "== $name: FAILED (exit $rc$( ((rc == 124)) && echo ', time limit')) after $((SECONDS - t0)) s" >&2
    FAILED+=("$name")
  fi
}

if [[ $DRY_RUN == 0 && $DEVICE == cuda ]]; then
  python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no CUDA device")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
fi
if [[ $DRY_RUN == 0 ]]; then
  # Every check starts from an empty run folder: each rule's time is then a cold run's, and no lock
  # or half-written output of an earlier, interrupted check is left to trip Snakemake.
  rm -rf "$RUN" "$STATS"
  mkdir -p "$OUT"
fi

# 1. The model (random, Llama-3.1-8B widths, 2 layers, bf16) and the Llama Scope-format SAEs. Built on
#    the CPU (deterministic bytes, the same files as a CPU run); ~30 s on 16 cores.
step "build the 8B-shaped model and SAEs" 120 \
  python bench/make_8b_shaped.py "$BUILD" --threads "$(nproc)"

# 2. The study config for the GPU: the CPU config with device cuda (fail, never fall back to the
#    CPU), the checkpoint's absolute path, more prompts and the real study's head subsets, so that
#    the GPU has work to measure.
step "write $CONFIG" 15 python - "$REPO/config/llama31_8b_shaped.yaml" "$CONFIG" "$BUILD/model" "$N_PAIRS" "$DEVICE" <<'EOF'
import sys
import yaml
from bugscope.config import load_config, validate_config
src, dst, checkpoint, n_pairs, device = sys.argv[1:]
raw = yaml.safe_load(open(src))
raw["device"] = device
raw["model"]["checkpoint"] = checkpoint
raw["prompts"]["n_pairs"] = int(n_pairs)
raw["sae"]["corpus"]["heldout_tokens"] = 20000  # the real study's held-out text
if device == "cuda":
    # The real study's subsets (1,207 head sets at the focus layer, ~77k patched rows): more rows than
    # fit in one forward, so head_subsets' peak GPU memory tests batch_rows: auto at 8B widths.
    raw["patching"]["subsets"] = {"pools": ["even", "odd", "all"], "sizes": None, "samples": 20}
validate_config(raw, source=dst)
with open(dst, "w") as fh:
    yaml.safe_dump(raw, fh, sort_keys=False)
load_config(dst)
print(f"{dst}: device {device}, n_pairs {n_pairs}, checkpoint {checkpoint}")
EOF

# 3. Every rule of the pipeline (model rules one at a time on the GPU: the default profile's gpu=1).
step "the 8B-shaped pipeline on $DEVICE" 300 \
  python -m snakemake -s "$REPO/Snakefile" -d "$RUN" --configfile "$CONFIG" --cores all --quiet rules

echo "== per rule (benchmarks/*.tsv: wall s, max_rss; $STATS: peak GPU memory, matmul TFLOP/s)"
[[ $DRY_RUN == 1 ]] || python bench/job_table.py "$RUN" --stats "$STATS" || FAILED+=("job table")

# 4. The head sweep against the naive loop (one full forward per head set), all 35 head sets of both
#    layers over the run's 64 target prompts.
step "bench_patching" 70 \
  python bench/bench_patching.py --config "$CONFIG" --results "$RUN/results" --layers 0 1 \
    --questions 64 --positions aligned --device "$DEVICE" --threads "$(nproc)"

# 5. Residual caching against a bare forward over the same batches, every prompt of the config.
step "bench_cache" 70 \
  python bench/bench_cache.py --config "$CONFIG" --manifest "$RUN/results/model/model.json" \
    --device "$DEVICE" --prompts 1000 --repeats 5 --threads "$(nproc)"

echo "== gpu_check.sh: finished in ${SECONDS} s (budget ${BUDGET_S} s)"
if ((${#FAILED[@]})); then
  printf '== failed step: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
