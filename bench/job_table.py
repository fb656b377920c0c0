"""Per-rule wall time and peak memory of a finished run, as a Markdown table.

    python bench/job_table.py WORKDIR [--stats JOBSTATS.jsonl]

WORKDIR is Snakemake's working directory (-d): every rule with a `benchmark:` writes
WORKDIR/benchmarks/**/<rule>.tsv (columns `s` = wall seconds, `max_rss` = peak resident memory in
MB, of the job's process tree). With --stats (the file `BUGSCOPE_JOB_STATS` pointed at during the
run, see bugscope.run.jobstats) the table adds each job's peak GPU memory and matmul TFLOP/s.

Note on max_rss: the model's safetensors are memory-mapped, so on the CPU only the weight pages a
job touches count (most of the 128,256-row embedding and unembedding never are); on a GPU the
weights live in GPU memory and show up in the peak GPU column instead.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def benchmark_rows(workdir: str | Path) -> dict[str, dict]:
    """rule -> {"s", "max_rss"} (the last line of each benchmark TSV: the latest run)."""
    out = {}
    for tsv in sorted(Path(workdir, "benchmarks").rglob("*.tsv")):
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            out[tsv.stem] = {"s": float(rows[-1]["s"]), "max_rss": float(rows[-1]["max_rss"])}
    return out


def job_stats(path: str | Path | None) -> dict[str, dict]:
    """rule -> the last JSON line bugscope.run.jobstats wrote for it."""
    if not path or not Path(path).is_file():
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["rule"]] = record
    return out


def table(workdir: str | Path, stats_path: str | Path | None = None) -> str:
    bench, stats = benchmark_rows(workdir), job_stats(stats_path)
    # Rules with a benchmark (the model and SAE rules, two feature rules) or with counted FLOPs; the
    # light rules (figures, report tables) are left out.
    rules = [r for r in set(bench) | set(stats) if r in bench or stats[r].get("flops")]
    rules.sort(key=lambda r: -(bench.get(r, {}).get("s") or stats[r].get("seconds") or 0))
    lines = ["| rule | wall s | max_rss MB | peak GPU GiB | matmul TFLOP | TFLOP/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for rule in rules:
        b, s = bench.get(rule, {}), stats.get(rule, {})
        gpu = s.get("peak_gpu_bytes")
        flops = s.get("flops")
        lines.append(" | ".join([
            f"| {rule}", f"{b['s']:.1f}" if b else "-", f"{b['max_rss']:.0f}" if b else "-",
            f"{gpu / 2**30:.2f}" if gpu is not None else "-", f"{flops / 1e12:.3f}" if flops is not None else "-",
            f"{s['tflops_per_s']:.3f}" if s.get("tflops_per_s") is not None else "-"]) + " |")
    total = sum(b["s"] for b in bench.values())
    lines.append(f"| **sum of benchmarked jobs** | {total:.1f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--stats", default=None, help="the BUGSCOPE_JOB_STATS file of the run")
    args = ap.parse_args()
    print(table(args.workdir, args.stats))


if __name__ == "__main__":
    main()
