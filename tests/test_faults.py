"""Fault injection and determinism: SIGKILL the ci.yaml workflow inside its model-running rules,
resume with --rerun-incomplete, and compare every table with an uninterrupted run byte for byte.

The uninterrupted run is the session's `ci_workflow`; the resumed run is a second, independent run
of the same config, so the comparison is also the determinism test.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bugscope.io import TMP_MARKER
from tests.conftest import REPO, run_snakemake

# Fixed seeds: each gives one kill point (target rule, delay after the rule starts).
KILL_SEEDS = list(range(12))
RESULT_SUFFIXES = (".parquet", ".safetensors")


def model_rules_in_run_order(workdir: Path, finished_run: Path) -> list[str]:
    """Rules that run the model or an SAE (they declare cpus_per_task), in the order a finished run started them."""
    dry = run_snakemake(workdir, "-n", "--forceall").stdout
    model_rules, current = set(), None
    for line in dry.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            current = m.group(1)
        elif current and line.strip().startswith("resources:") and "cpus_per_task=" in line:
            model_rules.add(current)
    order = []
    for log in sorted((finished_run / ".snakemake" / "log").glob("*.snakemake.log")):
        for line in log.read_text().splitlines():
            m = re.match(r"^(?:local)?rule (\w+):", line.strip())
            if m and m.group(1) in model_rules and m.group(1) not in order:
                order.append(m.group(1))
    return order


def run_until_killed(workdir: Path, rule: str, delay: float, timeout: float = 600) -> str:
    """Run the workflow up to `rule` (--until); SIGKILL its process group `delay` s after a `rule` job starts.

    Returns 'killed', 'finished' (the rule finished first) or 'not started' (it was already done).
    """
    # A SIGKILLed Snakemake leaves its lock behind; a user then runs --unlock, and so does this test.
    run_snakemake(workdir, "--unlock")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config" / "ci.yaml"), "--cores", "2", "--rerun-incomplete",
           "--until", rule]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = threading.Event()

    def watch():
        for line in proc.stdout:
            if re.match(rf"^(?:local)?rule {rule}:", line.strip()):
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not started.is_set() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not started.is_set():
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.wait()
        return "finished" if proc.returncode == 0 else "not started"
    time.sleep(delay)
    if proc.poll() is not None:
        return "finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "killed"


def result_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "results").rglob("*"))
            if p.is_file() and p.suffix in RESULT_SUFFIXES and "model" not in p.relative_to(root).parts[:2]}


@pytest.fixture(scope="module")
def resumed_workflow(tmp_path_factory, ci_workflow):
    """A second ci.yaml run, SIGKILLed at every kill point, then resumed to completion."""
    workdir = tmp_path_factory.mktemp("killed_workflow")
    rules = model_rules_in_run_order(workdir, ci_workflow)
    assert len(rules) >= 3, f"expected several model-running rules, found {rules}"
    # Kill points go through the rules in run order, each rule hit about equally often. Delays stay
    # under the ~3 s a job spends importing torch and loading the model, so each kill lands in its job.
    targets = sorted(KILL_SEEDS, key=lambda seed: (seed % len(rules), seed))
    log = []
    for seed in targets:
        rule, delay = rules[seed % len(rules)], random.Random(seed).uniform(0.3, 1.5)
        log.append((rule, round(delay, 2), run_until_killed(workdir, rule, delay)))
    run_snakemake(workdir, "--unlock")
    final = run_snakemake(workdir, "--rerun-incomplete")
    return workdir, log, final


def test_kills_landed_inside_model_rules(resumed_workflow):
    _, log, _ = resumed_workflow
    killed = [entry for entry in log if entry[2] == "killed"]
    print("kill points (rule, delay s, outcome):", *log, sep="\n  ")
    assert len(killed) >= 10, log
    assert {rule for rule, _, outcome in killed} == {rule for rule, _, _ in log}, "some model rule was never hit"


def test_resumed_run_completes_without_leftovers(resumed_workflow):
    workdir, _, final = resumed_workflow
    assert final.returncode == 0
    leftovers = [p for p in workdir.rglob(f"*{TMP_MARKER}*")]
    assert leftovers == [], leftovers


def test_resumed_run_equals_uninterrupted_run_byte_for_byte(resumed_workflow, ci_workflow):
    """Also the determinism test: two independent runs of one config give byte-identical tables."""
    workdir, _, _ = resumed_workflow
    expected, got = result_files(ci_workflow), result_files(workdir)
    assert sorted(got) == sorted(expected)
    assert len(expected) >= 5
    differing = [name for name in expected if expected[name] != got[name]]
    assert differing == [], f"tables differ between runs: {differing}"
