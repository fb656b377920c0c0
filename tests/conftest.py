"""Shared fixtures: the real embedded model (converted once per machine) and a workflow runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bugscope.run.boundary import ENV as BOUNDARY_ENV

REPO = Path(__file__).resolve().parents[1]
# The converted embedded checkpoint is cached across test sessions (conversion takes ~40 s).
MODEL_CACHE = Path(os.environ.get("BUGSCOPE_TEST_CACHE", REPO / ".pytest_cache" / "bugscope"))


@pytest.fixture(scope="session")
def embedded_manifest():
    from bugscope.config import load_config
    from bugscope.model.load import prepare_model

    cfg = load_config(REPO / "config" / "ci.yaml")
    return prepare_model(cfg["model"], MODEL_CACHE / "checkpoint", MODEL_CACHE / "model.json")


@pytest.fixture(scope="session")
def embedded(embedded_manifest):
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU, float32."""
    import torch

    from bugscope.model.load import load_model

    torch.set_num_threads(2)
    return load_model(embedded_manifest, "cpu")


@pytest.fixture(scope="session")
def prompts(ci_config, embedded):
    """The prompt table of config/ci.yaml, built with the embedded model's tokenizer."""
    import polars as pl

    from bugscope.data.prompts import build_prompt_table

    return pl.from_arrow(build_prompt_table(ci_config, embedded[1]))


@pytest.fixture(scope="session")
def ci_config():
    from bugscope.config import load_config

    return load_config(REPO / "config" / "ci.yaml")


# A credential-shaped canary set in the environment of the CI workflow run: tests grep every
# output for it. Built at run time so that no token-shaped literal sits in the repository.
CANARY_TOKEN = "hf_" + "bugscopeCanary" * 3


def run_snakemake(workdir: Path, *args: str, configfile: str | Path = REPO / "config" / "ci.yaml",
                  check: bool = True, timeout: int = 1800, env: dict | None = None,
                  seed_model: bool = True) -> subprocess.CompletedProcess:
    """Run the real workflow through the CLI in `workdir`, with the converted embedded model pre-seeded
    (seed_model=False for a config that does not use it)."""
    workdir = Path(workdir)
    seeded = workdir / "results" / "model" / "checkpoint"
    if seed_model and not seeded.exists() and (MODEL_CACHE / "checkpoint" / "model.safetensors").exists():
        seeded.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(MODEL_CACHE / "checkpoint", seeded)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, BOUNDARY_ENV: "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def workflow_rules(workdir: Path, configfile: Path = REPO / "config" / "ci.yaml") -> dict:
    """The workflow's rules as Snakemake parses them, without running anything: {name: (local, resources)}.
    Whether a rule is local is read from the workflow's own register (Snakemake has no public call for it
    outside a cluster executor): `localrule: True`, carried by `use rule` to the organism's copies."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet=True)) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=2),
                                config_settings=ConfigSettings(configfiles=[Path(configfile)]),
                                snakefile=REPO / "Snakefile", workdir=Path(workdir))._workflow
        return {rule.name: (rule.name in workflow._localrules, dict(rule.resources)) for rule in workflow.rules}


@pytest.fixture(scope="session")
def ci_workflow(tmp_path_factory, embedded_manifest):
    """A finished run of the ci.yaml workflow (all default targets); returns its work directory."""
    workdir = tmp_path_factory.mktemp("ci_workflow")
    run_snakemake(workdir, env={"HF_TOKEN": CANARY_TOKEN})
    return workdir


@pytest.fixture(scope="session", autouse=True)
def model_boundary_guard():
    """Hooks, generation and model calls from bugscope outside bugscope.model fail the test
    (bugscope/run/boundary.py)."""
    from bugscope.run.boundary import Guard

    guard = Guard().install()
    yield guard
    guard.uninstall()


@pytest.fixture(autouse=True)
def _no_boundary_violation(model_boundary_guard):
    """Also fails a test whose violation was raised and then caught by the code under test."""
    seen = len(model_boundary_guard.violations)
    yield
    new = model_boundary_guard.violations[seen:]
    assert not new, f"model boundary crossed: {new}"
