#!/usr/bin/env bash
# The pipeline on a real SLURM cluster: the ci.yaml config through workflow/profiles/slurm.
#
#   tests/slurm/run_slurm_test.sh [--reference DIR] [--keep] [TARGET...]
#
# Needs root on Debian (installs slurm-wlm). Steps, each checked by check_slurm_run.py:
#   1. start a one-node cluster with four fake GPUs (cluster.sh), stopped by pid on any exit;
#   2. copy the SLURM profile and edit exactly its two placeholder lines, as a user would;
#   3. run the pipeline with BUGSCOPE_FAIL_RULE=baseline: the GPU job fails on the cluster, is
#      retried once with doubled runtime and memory, and Snakemake stops naming the rule;
#   4. rerun without the fault: it completes; every GPU job ran as its own SLURM job with a GPU
#      (CUDA_VISIBLE_DEVICES in the rule's log, gres/gpu in scontrol), local rules stayed local;
#   5. the Parquet tables equal those of a local run of the same config: DIR if given (a finished
#      local run of config/ci.yaml, e.g. the tests' ci_workflow), else one run here first.
# TARGETs (default: the whole pipeline) limit every run to those outputs or rules, e.g. to keep CI
# short; the tables made are then compared with those of the reference.
# Each Snakemake run is under `timeout -s INT -k 15` (a hung Snakemake ignores SIGTERM), of
# $BUGSCOPE_SLURM_RUN_TIMEOUT seconds (default 1200).
# The scratch folder is removed on success, kept on failure (or with --keep).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
PYTHON=${PYTHON:-$([[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
RUN_TIMEOUT=${BUGSCOPE_SLURM_RUN_TIMEOUT:-1200}
FAIL_RULE=baseline
MODEL_CACHE=${BUGSCOPE_TEST_CACHE:-$REPO/.pytest_cache/bugscope}
reference="" keep=0 targets=()
while (($#)); do
    case $1 in
        --reference) reference=$(cd "$2" && pwd -P); shift 2 ;;
        --keep) keep=1; shift ;;
        -*) echo "usage: $0 [--reference DIR] [--keep] [TARGET...]" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

# slurmd runs the jobs as root on this machine: the work folders must be real local paths.
scratch=$(mktemp -d /tmp/bugscope-slurm.XXXXXX)
start=$SECONDS
status=1
finish() {
    "$REPO/tests/slurm/cluster.sh" stop "$scratch/cluster" || true
    if ((status == 0 && keep == 0)); then rm -rf "$scratch"; else echo "slurm test: files kept in $scratch" >&2; fi
    echo "slurm test: $([[ $status == 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - start)) s" >&2
}
trap finish EXIT
trap 'exit 130' INT TERM

say() { echo "slurm test [$((SECONDS - start)) s]: $*" >&2; }

seed_model() {  # the converted embedded checkpoint, when the tests have cached one (saves ~40 s)
    if [[ -f $MODEL_CACHE/checkpoint/model.safetensors ]]; then
        mkdir -p "$1/results/model"
        cp -r "$MODEL_CACHE/checkpoint" "$1/results/model/"
    fi
}

snakemake_run() {  # snakemake_run WORKDIR LOG ARGS...: the ci.yaml pipeline, under a hard timeout
    local workdir=$1 log=$2
    shift 2
    local rc=0
    timeout -s INT -k 15 "$RUN_TIMEOUT" "$PYTHON" -m snakemake -s "$REPO/Snakefile" -d "$workdir" \
        --configfile "$REPO/config/ci.yaml" "$@" >"$log" 2>&1 || rc=$?
    if ((rc == 124 || rc == 137)); then
        say "snakemake timed out after $RUN_TIMEOUT s; the end of $log:"
        tail -n 40 "$log" >&2
        exit 1
    fi
    return $rc
}

say "starting the cluster"
"$REPO/tests/slurm/cluster.sh" start "$scratch/cluster"
partition=${BUGSCOPE_SLURM_PARTITION:-bugscope}

# The user's edit: partition and account, nothing else.
cp -r "$REPO/workflow/profiles/slurm" "$scratch/profile"
sed -i -e "s/^\(  slurm_partition: \).*/\1\"$partition\"/" -e "s/^\(  slurm_account: \).*/\1\"bugscope\"/" \
    "$scratch/profile/config.yaml"
changed=$(diff "$REPO/workflow/profiles/slurm/config.yaml" "$scratch/profile/config.yaml" | grep -c '^>' || true)
[[ $changed == 2 ]] || { say "expected to edit 2 lines of the SLURM profile, edited $changed"; exit 1; }

if [[ -z $reference ]]; then
    reference=$scratch/local
    say "local reference run (default profile)"
    seed_model "$reference"
    snakemake_run "$reference" "$scratch/local.log" --cores 2 "${targets[@]}" || { say "the local run failed:"; tail -n 40 "$scratch/local.log" >&2; exit 1; }
fi

work=$scratch/slurm
seed_model "$work"
slurm_args=(--workflow-profile "$scratch/profile" --verbose "${targets[@]}")

say "SLURM run with an injected failure in rule $FAIL_RULE"
rc=0
BUGSCOPE_FAIL_RULE=$FAIL_RULE snakemake_run "$work" "$scratch/run1.log" "${slurm_args[@]}" || rc=$?
if ((rc == 0)); then say "the run with an injected failure succeeded"; exit 1; fi
"$PYTHON" "$REPO/tests/slurm/check_slurm_run.py" failed "$work" "$scratch/run1.log" "$FAIL_RULE"

say "SLURM rerun after the fix"
snakemake_run "$work" "$scratch/run2.log" "${slurm_args[@]}" || { say "the rerun failed:"; tail -n 60 "$scratch/run2.log" >&2; exit 1; }
subset=$( ((${#targets[@]})) && echo --subset || true)
"$PYTHON" "$REPO/tests/slurm/check_slurm_run.py" complete $subset "$work" "$reference" "$scratch/run1.log" "$scratch/run2.log"

status=0
