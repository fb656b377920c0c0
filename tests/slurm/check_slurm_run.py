"""Checks of a pipeline run through snakemake-executor-plugin-slurm (called by run_slurm_test.sh).

    check_slurm_run.py failed   WORKDIR RUN_LOG RULE     the run failed cleanly at RULE, after a retry
    check_slurm_run.py complete [--subset] WORKDIR REFERENCE RUN_LOG...
                                                          every GPU job ran as its own SLURM job with
                                                          a GPU, local rules stayed local, and the
                                                          tables equal those of the local REFERENCE run
                                                          (--subset: the run made only some targets; the
                                                          reference may hold more tables)

RUN_LOG is Snakemake's output of one run with --verbose (the plugin logs its sbatch calls at debug
level). Each phase asks `scontrol show job` about the jobs of its own runs, so call it right after the
run (the test cluster forgets finished jobs after MinJobAge=3600 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HEADER = re.compile(r"^(localrule|rule) (\w+):$")
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
SBATCH = re.compile(r"^sbatch call: (sbatch .*?) --wrap=")
SBATCH_OUTPUT = re.compile(r"--output '?([^' ]+)'?")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")
JOB_ENV = re.compile(r"job environment: host=\S+ SLURM_JOB_ID=(\S+) CUDA_VISIBLE_DEVICES=(\S+)")


@dataclass
class Job:
    rule: str
    local: bool
    jobid: str
    log: list[str]
    gpu: bool
    slurm_ids: list[str] = field(default_factory=list)  # one per attempt
    sbatch: list[str] = field(default_factory=list)
    finished: bool = False


def parse_run(text: str) -> list[Job]:
    """The jobs one Snakemake run started, with their SLURM submissions, in order."""
    jobs: list[Job] = []
    current: dict | None = None
    pending_sbatch: dict[str, str] = {}
    by_id: dict[str, Job] = {}
    lines = text.splitlines()

    def close():
        nonlocal current
        if current is not None:
            job = Job(rule=current["rule"], local=current["local"], jobid=current.get("jobid", "?"),
                      log=current.get("log", []), gpu=bool(re.search(r"\bgpu=1\b", current.get("resources", ""))))
            if job.jobid in by_id and by_id[job.jobid].rule == job.rule:
                prev = by_id[job.jobid]  # a retry of the same job: same block again
                prev.gpu = prev.gpu or job.gpu
            else:
                jobs.append(job)
                by_id[job.jobid] = job
            current = None

    for line in lines:
        if m := HEADER.match(line):
            close()
            current = {"rule": m.group(2), "local": m.group(1) == "localrule"}
            continue
        if current is not None:
            stripped = line.strip()
            if line.startswith("    ") and ": " in stripped:
                key, _, value = stripped.partition(": ")
                if key == "log":
                    current["log"] = [p.strip() for p in value.split(",")]
                elif key in ("jobid", "resources"):
                    current[key] = value
                continue
            close()
        if m := SBATCH.match(line):
            # Keyed by the job's SLURM log path (…/%j.log), which the submission line repeats.
            call = m.group(1)
            output = SBATCH_OUTPUT.search(call)
            pending_sbatch[output.group(1) if output else "?"] = call
        elif m := SUBMITTED.match(line):
            job = by_id.get(m.group(1))
            assert job is not None, f"submission of an unknown job: {line}"
            job.slurm_ids.append(m.group(2))
            template = re.sub(rf"/{m.group(2)}\.log$", "/%j.log", m.group(3))
            job.sbatch.append(pending_sbatch.pop(template, ""))
        elif m := FINISHED.match(line):
            job = by_id.get(m.group(1))
            if job is not None and job.rule == m.group(2):
                job.finished = True
    close()
    return jobs


def scontrol(slurm_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", slurm_id], capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def check_jobs(jobs: list[Job], workdir: Path, problems: list[str]) -> None:
    """Local rules stayed local; every other job was a GPU job submitted to SLURM with a GPU."""
    for job in jobs:
        name = f"{job.rule} (log {', '.join(job.log) or '-'})"
        if job.local:
            if job.gpu:
                problems.append(f"{name} needs a GPU but ran as a local rule")
            if job.slurm_ids:
                problems.append(f"local rule {name} was submitted to SLURM")
            continue
        if not job.gpu:
            problems.append(f"{name} went to SLURM without gpu=1: a light rule without `localrule: True`?")
        if not job.slurm_ids:
            problems.append(f"{name} was never submitted to SLURM")
        for slurm_id, call in zip(job.slurm_ids, job.sbatch):
            if "--gpus=1" not in call:
                problems.append(f"{name}: SLURM job {slurm_id} was submitted without --gpus=1: {call}")
            info = scontrol(slurm_id)
            if not info:
                problems.append(f"{name}: scontrol does not know SLURM job {slurm_id}")
                continue
            if "gpu:1" not in info.get("TresPerJob", ""):
                problems.append(f"{name}: SLURM job {slurm_id} has no GPU allocated ({info.get('TresPerJob')})")
            if not info.get("Comment", "").startswith(f"rule_{job.rule}"):
                problems.append(f"{name}: SLURM job {slurm_id} is named {info.get('Comment')}")
        if job.finished and job.slurm_ids:
            last = job.slurm_ids[-1]
            if scontrol(last).get("JobState") != "COMPLETED":
                problems.append(f"{name}: Snakemake finished it but SLURM job {last} is {scontrol(last).get('JobState')}")
            envs = [JOB_ENV.search(line) for p in job.log if (workdir / p).is_file()
                    for line in (workdir / p).read_text(errors="replace").splitlines()]
            envs = [m.groups() for m in envs if m]
            if not any(jid == last and cvd not in ("-", "") for jid, cvd in envs):
                problems.append(f"{name}: its log does not show SLURM job {last} with CUDA_VISIBLE_DEVICES set "
                                f"(found {envs or 'no job-environment line'})")


def describe(jobs: list[Job]) -> str:
    rows = []
    for job in jobs:
        where = "local" if job.local else f"SLURM {','.join(job.slurm_ids)}"
        rows.append(f"  {job.rule:<24} {where}{'' if job.finished or job.local else ' (not finished)'}")
    return "\n".join(rows)


def phase_failed(workdir: Path, run_log: Path, rule: str) -> list[str]:
    text = run_log.read_text(errors="replace")
    jobs = parse_run(text)
    print(f"failure run: jobs\n{describe(jobs)}")
    problems: list[str] = []
    check_jobs([j for j in jobs if j.rule != rule], workdir, problems)
    if f"Error in rule {rule}:" not in text:
        problems.append(f"Snakemake's output does not name the failed rule ('Error in rule {rule}:')")
    if "Exiting because a job execution failed" not in text:
        problems.append("Snakemake did not end with 'Exiting because a job execution failed'")
    failed = [j for j in jobs if j.rule == rule]
    if not failed:
        return problems + [f"rule {rule} never ran"]
    job = failed[0]
    if job.finished:
        problems.append(f"rule {rule} finished despite the injected failure")
    if len(job.slurm_ids) != 2:
        problems.append(f"rule {rule} ran {len(job.slurm_ids)} times on SLURM; the profile's retries: 1 means 2")
    else:
        first, second = job.sbatch
        for flag in ("-t", "--mem"):
            a = re.search(rf" {flag} (\d+)", first)
            b = re.search(rf" {flag} (\d+)", second)
            if not (a and b and int(b.group(1)) == 2 * int(a.group(1))):
                problems.append(f"the retry of {rule} did not double {flag}: {first!r} then {second!r}")
        for slurm_id in job.slurm_ids:
            if (state := scontrol(slurm_id).get("JobState")) != "FAILED":
                problems.append(f"SLURM job {slurm_id} of {rule} is {state}, not FAILED")
    rule_log = "\n".join((workdir / p).read_text(errors="replace") for p in job.log if (workdir / p).is_file())
    if f"bugscope: rule {rule} failed: injected failure" not in rule_log:
        problems.append(f"the log of {rule} does not explain the failure:\n{rule_log[-2000:]}")
    if job.sbatch:
        print(f"sbatch flags of the first attempt of {rule}: {job.sbatch[0]}")
        print(f"sbatch flags of its retry:                 {job.sbatch[-1]}")
    return problems


def read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def compare_results(workdir: Path, reference: Path, problems: list[str], subset: bool = False) -> int:
    import polars as pl
    from polars.testing import assert_frame_equal

    ours = {p.relative_to(workdir) for p in (workdir / "results").rglob("*.parquet")}
    theirs = {p.relative_to(reference) for p in (reference / "results").rglob("*.parquet")}
    if not ours:
        problems.append("the SLURM run made no tables")
    if ours - theirs or (theirs - ours and not subset):
        problems.append(f"tables differ from the local run: only on SLURM {sorted(map(str, ours - theirs))}, "
                        f"only local {sorted(map(str, theirs - ours))}")
    for rel in sorted(ours & theirs):
        a, b = read_parquet(workdir / rel), read_parquet(reference / rel)
        if a.schema.metadata != b.schema.metadata:
            problems.append(f"{rel}: Parquet metadata differs from the local run")
        if a.equals(b):
            continue
        da, db = pl.from_arrow(a), pl.from_arrow(b)
        try:
            assert_frame_equal(da, db, check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
            print(f"  {rel}: equal within 1e-5 (not bit for bit)")
            continue
        except AssertionError as err:
            mismatch = str(err)
        # The same rows in another order: reported (the writer does not fix its row order), not failed.
        try:
            sortable = [c for c, t in da.schema.items() if not t.is_nested()]
            assert_frame_equal(da.sort(sortable), db.sort(sortable), check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
            print(f"  WARNING {rel}: the same rows as the local run, in another order")
        except Exception:  # noqa: BLE001 - unsortable or really different: report the first mismatch
            problems.append(f"{rel}: contents differ from the local run: {mismatch}")
    return len(ours & theirs)


def phase_complete(workdir: Path, reference: Path, run_logs: list[Path], subset: bool = False) -> list[str]:
    problems: list[str] = []
    *earlier, last = run_logs
    jobs = parse_run(last.read_text(errors="replace"))
    print(f"completing run: jobs\n{describe(jobs)}")
    check_jobs(jobs, workdir, problems)
    text = last.read_text(errors="replace")
    if "Finished jobid: 0 " not in text and "Nothing to be done" not in text:
        problems.append("the completing run did not finish its target")
    # Every GPU job of the workflow, over all runs, finished once as a SLURM job.
    all_jobs = [j for log in run_logs for j in parse_run(log.read_text(errors="replace"))]
    gpu_jobs = {(j.rule, tuple(j.log)) for j in all_jobs if not j.local}
    done = {(j.rule, tuple(j.log)) for j in all_jobs if not j.local and j.finished and j.slurm_ids}
    if missing := gpu_jobs - done:
        problems.append(f"GPU jobs that never completed on SLURM: {sorted(missing)}")
    if not gpu_jobs:
        problems.append("no job went to SLURM at all")
    print(f"GPU jobs completed on SLURM: {len(done)} ({', '.join(sorted({r for r, _ in done}))}); "
          f"local rules: {', '.join(sorted({j.rule for j in all_jobs if j.local}))}")
    n = compare_results(workdir, reference, problems, subset)
    print(f"compared {n} Parquet tables with the local run")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "failed":
        problems = phase_failed(Path(argv[1]), Path(argv[2]), argv[3])
    elif len(argv) >= 4 and argv[0] == "complete":
        subset = "--subset" in argv
        args = [a for a in argv[1:] if a != "--subset"]
        problems = phase_complete(Path(args[0]), Path(args[1]), [Path(p) for p in args[2:]], subset)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print(f"{argv[0]} phase: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
