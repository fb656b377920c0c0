"""The resources each model rule asks for under a config, as the Markdown table of docs/cluster.md.

    python bench/resource_table.py [CONFIG]            # default config/llama31_8b.yaml
    python bench/resource_table.py --write-doc         # regenerate the table in docs/cluster.md

The numbers come from bugscope.run.resources.job_resources, the function workflow/rules/common.smk
calls, so they are what Snakemake requests on the first attempt (a retry doubles runtime and mem_mb).
tests/test_resources.py checks that the doc's table is this script's output.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bugscope.config import load_config
from bugscope.run.resources import d_model, d_sae, rule_table, sae_mb, weights_mb

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cluster.md"
DEFAULT_CONFIG = REPO / "config" / "llama31_8b.yaml"
BEGIN, END = "<!-- resource table: begin -->", "<!-- resource table: end -->"


def markdown(config_path: str | Path = DEFAULT_CONFIG) -> str:
    config = load_config(config_path)
    name = Path(config_path).resolve().relative_to(REPO) if Path(config_path).resolve().is_relative_to(REPO) \
        else Path(config_path)
    lines = [
        f"`{name}`: {config['model']['name']}, {config['model']['size_b']} B parameters in "
        f"{config['model']['dtype']} ({weights_mb(config):,} MB), d_model {d_model(config):,}, d_sae "
        f"{d_sae(config):,} (one SAE {sae_mb(config):,.0f} MB in {config['sae']['dtype']}).",
        "",
        "| rule | gpu | runtime (min) | mem_mb | cpus_per_task |",
        "|---|---|---|---|---|",
    ]
    for rule, res in rule_table(config):
        lines.append(f"| {rule} | {res['gpu']} | {res['runtime']} | {res['mem_mb']:,} | {res['cpus_per_task']} |")
    return "\n".join(lines) + "\n"


def doc_table(doc: str) -> str:
    """The table between the markers of docs/cluster.md."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), doc, flags=re.S)
    if not match:
        raise ValueError(f"{DOC} lacks the markers {BEGIN} ... {END}")
    return match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("--write-doc", action="store_true", help="replace the table in docs/cluster.md")
    args = parser.parse_args()
    table = markdown(args.config)
    if args.write_doc:
        doc = DOC.read_text()
        doc_table(doc)  # the markers are there
        start, end = doc.index(BEGIN) + len(BEGIN) + 1, doc.index(END)
        DOC.write_text(doc[:start] + table + doc[end:])
    print(table, end="")


if __name__ == "__main__":
    main()
