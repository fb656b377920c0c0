"""The glue every workflow script uses: logging to the rule's log, thread count, clean failures."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from bugscope.config import check_model_geometry
from bugscope.io import DiskFullError
from bugscope.run.boundary import ENV as BOUNDARY_ENV
from bugscope.run.boundary import BoundaryViolation, Guard
from bugscope.run.jobstats import job_stats

log = logging.getLogger("bugscope")

# Errors whose message already says what is wrong, where and how to fix it: shown as one
# paragraph, without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, RuntimeError, FileNotFoundError, DiskFullError)

# Fault injection for tests: `BUGSCOPE_FAIL_RULE=<rule>` makes that rule fail before doing any work.
FAIL_RULE_ENV = "BUGSCOPE_FAIL_RULE"


def run(snakemake, main) -> None:
    """Run `main(snakemake)` with stderr in the rule's log and a one-paragraph error on failure."""
    terminal = sys.stderr
    log_path = snakemake.log[0] if len(snakemake.log) else None
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        sys.stderr = open(log_path, "w", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    _set_up_torch(max(1, snakemake.threads), snakemake.config.get("seed", 0))
    # Where the job ran: the SLURM test (tests/slurm) reads this line to check each GPU job got a card.
    log.info("job environment: host=%s SLURM_JOB_ID=%s CUDA_VISIBLE_DEVICES=%s", os.uname().nodename,
             os.environ.get("SLURM_JOB_ID", "-"), os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
    try:
        if os.environ.get(FAIL_RULE_ENV) == snakemake.rule:
            raise RuntimeError(f"injected failure ({FAIL_RULE_ENV}={snakemake.rule}); unset {FAIL_RULE_ENV} and rerun")
        # BUGSCOPE_JOB_STATS=<file>: wall time, peak GPU memory and matmul FLOPs per job (bench/gpu_check.sh)
        _check_manifest(snakemake)
        guard = _boundary_guard()
        try:
            with job_stats(snakemake.rule):
                main(snakemake)
        finally:
            if guard is not None:
                guard.uninstall()
        if guard is not None and guard.violations:  # raised inside main and caught there
            raise BoundaryViolation(f"model boundary crossed: {guard.violations}")
    except USER_ERRORS as err:
        traceback.print_exc(file=sys.stderr)
        message = f"bugscope: rule {snakemake.rule} failed: {err}"
        print(message, file=sys.stderr)
        print(message, file=terminal)
        sys.exit(1)
    finally:
        if log_path:
            sys.stderr.flush()


def _check_manifest(snakemake) -> None:
    """A job that reads the model manifest checks it against the shape the config declares
    (model.num_layers, model.num_heads: bugscope.config.check_model_geometry) before any work."""
    manifest = getattr(snakemake.input, "manifest", None)
    model_cfg = snakemake.config.get("model")
    if not manifest or not model_cfg:
        return
    with open(manifest) as fh:
        found = json.load(fh)
    check_model_geometry(model_cfg, found, f"the checkpoint recorded in {manifest}")


def _boundary_guard():
    """With BUGSCOPE_BOUNDARY_GUARD=1, a model job (one whose script imported torch) runs under the
    model-boundary guard (bugscope.run.boundary); light jobs never import torch for it."""
    if os.environ.get(BOUNDARY_ENV) != "1" or "torch" not in sys.modules:
        return None
    return Guard().install()


def _set_up_torch(threads: int, seed: int) -> None:
    """The job's thread count and seed for torch. A model job has imported torch with its modules by
    now; a light job (figures, tables, the ledger) never does, and importing it would cost 1.5 s a job:
    it gets the thread count in the environment, which torch reads if anything imports it later."""
    if "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return
    import torch

    from bugscope.model.load import seed_everything

    torch.set_num_threads(threads)
    seed_everything(seed)
