"""The pipeline on a real, throw-away SLURM cluster (tests/slurm/run_slurm_test.sh).

Opt-in: it needs root on Debian (it installs slurm-wlm and writes /etc/slurm), so it runs only with
BUGSCOPE_SLURM=1, or in CI (CI=true, where .ci/run runs the README's plain test command). The local reference is this session's ci_workflow run, so the pipeline
is not run locally a second time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "slurm" / "run_slurm_test.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BUGSCOPE_SLURM", "1" if os.environ.get("CI") == "true" else "0") != "1",
                       reason="set BUGSCOPE_SLURM=1 (root on Debian) to run the pipeline on a throw-away SLURM cluster"),
]


def test_pipeline_on_slurm_matches_local_run(ci_workflow):
    # BUGSCOPE_SLURM_TARGETS (space-separated) limits the SLURM runs to some targets, to keep CI short.
    targets = os.environ.get("BUGSCOPE_SLURM_TARGETS", "").split()
    proc = subprocess.run([str(SCRIPT), "--reference", str(ci_workflow), *targets], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHON": sys.executable})
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"the SLURM test failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "complete phase: ok" in proc.stdout
