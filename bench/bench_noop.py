"""Wall time of the workflow's start-up: parsing the Snakefile and building the DAG, with no job run.

Run: python bench/bench_noop.py [--repeats 5] [--run-dir DIR [--run-config config/ci.yaml]]
                                [--repo OTHER_CHECKOUT [--run-dir ITS_DIR]] ...

Each repeat times, as subprocesses, one after the other:
- `python -c "import snakemake"`: the interpreter and Snakemake's package (the floor of any call);
- `snakemake --version`: Snakemake's command line with its plugins, no workflow;
- `snakemake -n --quiet --configfile C` in an empty directory, for each config C (default
  config/ci.yaml and config/llama31_8b.yaml): parse, validate the config, build the whole DAG;
- with --run-dir, `snakemake --cores 1 --quiet` in that finished run's directory: the no-op rerun
  (parse, DAG, and the mtime / code / params checks of every output; nothing to be done). The
  directory must hold a complete run of --run-config (`snakemake --cores all --configfile
  config/ci.yaml` there, ~8 min on 2 cores); the bench refuses it if the rerun would run a job.
  One --run-dir per checkout, in the order of the checkouts: a run's metadata names the checkout's
  own files (the claims ledger's path), so a finished run of one checkout is not one of another.

Every workflow command runs this checkout's Snakefile with PYTHONPATH=<checkout>/src; each extra
--repo (another checkout, e.g. `git archive` of an older commit) is timed the same way, interleaved,
so that the two are measured under the same load. Prints the median of the repeats and its ratio
to the `snakemake --version` median of the same run (1.0 would be a workflow that costs nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


def env_for(repo: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=["config/ci.yaml", "config/llama31_8b.yaml"],
                    help="configs for the dry runs, relative to each checkout")
    ap.add_argument("--run-dir", type=Path, action="append", default=[],
                    help="a finished run's directory, for the no-op rerun (one per checkout, in their order)")
    ap.add_argument("--run-config", default="config/ci.yaml", help="the config of --run-dir's run")
    ap.add_argument("--repo", type=Path, action="append", default=[],
                    help="another checkout to time beside this one (repeatable)")
    args = ap.parse_args()

    snakemake = str(Path(sys.executable).with_name("snakemake"))
    repos = [REPO, *[r.resolve() for r in args.repo]]
    if args.run_dir and len(args.run_dir) != len(repos):
        ap.error(f"--run-dir: give one per checkout ({len(repos)}), in their order")
    run_dirs = dict(zip(repos, args.run_dir))
    cases: dict[str, list] = {
        'python -c "import snakemake"': [None, [sys.executable, "-c", "import snakemake"], REPO],
        "snakemake --version": [None, [snakemake, "--version"], REPO],
    }
    with tempfile.TemporaryDirectory(prefix="bench_noop_") as tmp:
        for repo in repos:
            for config in args.configs:
                empty = tempfile.mkdtemp(dir=tmp)
                cmd = [snakemake, "-s", str(repo / "Snakefile"), "-d", empty, "--configfile", str(repo / config),
                       "-n", "--quiet"]
                cases[f"[{repo}] snakemake -n, empty dir, {config}"] = [repo, cmd, empty]
            if repo in run_dirs:
                run_dir = run_dirs[repo].resolve()
                cmd = [snakemake, "-s", str(repo / "Snakefile"), "-d", str(run_dir),
                       "--configfile", str(repo / args.run_config), "--cores", "1", "--quiet"]
                check = subprocess.run([*cmd[:-3], "-n"], env=env_for(repo), capture_output=True,
                                       text=True, cwd=str(run_dir))
                if check.returncode or "Nothing to be done" not in check.stdout + check.stderr:
                    sys.exit(f"{run_dir} is not a finished run of {args.run_config} for {repo} "
                             f"(the rerun would run jobs):\n{check.stdout[-2000:]}{check.stderr[-2000:]}")
                cases[f"[{repo}] no-op rerun (--cores 1), {args.run_config}"] = [repo, cmd, str(run_dir)]

        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (repo, cmd, cwd) in cases.items():
                times[name].append(timed(cmd, env_for(repo or REPO), cwd))

    floor = statistics.median(times["snakemake --version"])
    print(f"{args.repeats} repeats, {os.cpu_count()} CPUs; median wall time [min-max], ratio to `snakemake --version`")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {med:6.2f} s [{min(ts):.2f}-{max(ts):.2f}]  x{med / floor:4.2f}  {name}")


if __name__ == "__main__":
    main()
