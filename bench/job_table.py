"""Per-rule wall time and peak memory of a finished run, as a Markdown table.

    python bench/job_table.py WORKDIR [--stats JOBSTATS.jsonl]
    python bench/job_table.py WORKDIR --update-doc docs/benchmarks.md [--label "what run this was"]

WORKDIR is Snakemake's working directory (-d): every rule with a `benchmark:` writes
WORKDIR/benchmarks/**/<rule>.tsv (columns `s` = wall seconds, `max_rss` = peak resident memory in
MB, of the job's process tree). With --stats (the file `BUGSCOPE_JOB_STATS` pointed at during the
run, see bugscope.run.jobstats) the table adds each job's peak GPU memory and matmul TFLOP/s.

--update-doc writes the per-job wall seconds and peak memory of every benchmark file (one row per file,
named by its path under benchmarks/, so the jobs of two SAE sets stay apart) into the Markdown file
between the lines DOC_BEGIN and DOC_END, replacing what was there; the rest of the file is kept.

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
    return {Path(job).name: row for job, row in benchmark_files(workdir).items()}


DOC_BEGIN = "<!-- job_table.py --update-doc: begin (generated, do not edit) -->"
DOC_END = "<!-- job_table.py --update-doc: end -->"


def benchmark_files(workdir: str | Path) -> dict[str, dict]:
    """benchmark path under benchmarks/ without .tsv -> {"s", "max_rss"} (the last line of each TSV)."""
    root = Path(workdir, "benchmarks")
    out = {}
    for tsv in sorted(root.rglob("*.tsv")):
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            out[tsv.relative_to(root).with_suffix("").as_posix()] = {
                "s": float(rows[-1]["s"]), "max_rss": float(rows[-1]["max_rss"])}
    return out


def doc_table(workdir: str | Path, label: str | None = None) -> str:
    """The generated block of docs/benchmarks.md: wall seconds and max_rss per benchmarked job."""
    bench = benchmark_files(workdir)
    lines = [DOC_BEGIN, ""]
    if label:
        lines += [label, ""]
    lines += [f"{len(bench)} benchmarked jobs, slowest first; sum {sum(b['s'] for b in bench.values()):,.0f} s.", "",
              "| job (`benchmarks/<job>.tsv`) | wall s | max_rss MB |", "|---|---:|---:|"]
    for job in sorted(bench, key=lambda j: (-bench[j]["s"], j)):
        lines.append(f"| `{job}` | {bench[job]['s']:.1f} | {bench[job]['max_rss']:.0f} |")
    lines += ["", DOC_END]
    return "\n".join(lines)


def update_doc(doc: str | Path, workdir: str | Path, label: str | None = None) -> None:
    """Replace the generated block of `doc` (or append one) with the table of `workdir`'s run."""
    doc = Path(doc)
    text = doc.read_text() if doc.is_file() else ""
    block = doc_table(workdir, label)
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = head + block + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    doc.write_text(text)


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
    rules.sort(key=lambda r: (-(bench.get(r, {}).get("s") or stats[r].get("seconds") or 0), r))
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
    ap.add_argument("--update-doc", metavar="MARKDOWN", default=None,
                    help="write the per-job table between the generated markers of this file (docs/benchmarks.md)")
    ap.add_argument("--label", default=None, help="with --update-doc: a line saying which run the table is from")
    args = ap.parse_args()
    if args.update_doc:
        if not Path(args.workdir, "benchmarks").is_dir():
            ap.error(f"{args.workdir}/benchmarks does not exist: give the run's working directory")
        update_doc(args.update_doc, args.workdir, args.label)
        print(f"updated {args.update_doc} from {Path(args.workdir, 'benchmarks')}")
    else:
        print(table(args.workdir, args.stats))


if __name__ == "__main__":
    main()
