"""The package's shape: one boundary around transformers internals, modules a reader can hold in mind."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "bugscope"
BOUNDARY = {"forward.py", "sites.py"}
# Attributes and keywords of Hugging Face decoder internals (docstrings and comments may name them).
INTERNAL_ATTRIBUTES = {"self_attn", "o_proj", "mlp", "input_layernorm", "post_attention_layernorm", "layers",
                       "embed_tokens", "rotary_emb", "past_key_values"}
INTERNAL_KEYWORDS = {"past_key_values", "cache"}
MAX_LINES = 500


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def internal_uses(source: str) -> list[str]:
    """`x.self_attn`-style attribute reads and `past_key_values=` keywords in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.keyword) and node.arg in INTERNAL_KEYWORDS:
            found.append(f"line {node.lineno}: {node.arg}=")
    return found


def test_the_scanner_sees_internals_but_not_prose():
    assert internal_uses("def f(m):\n    return m.model.layers[0].self_attn.o_proj\n") == [
        "line 2: .o_proj", "line 2: .self_attn", "line 2: .layers"]
    assert internal_uses("m(x, past_key_values=kv)") == ["line 1: past_key_values="]
    assert internal_uses('"""the input of self_attn.o_proj"""\n# block.mlp\n') == []


@pytest.mark.parametrize("path", [p for p in modules() if p.name not in BOUNDARY], ids=lambda p: p.name)
def test_only_forward_and_sites_touch_model_internals(path):
    uses = internal_uses(path.read_text())
    assert not uses, (f"{path.relative_to(PACKAGE)} reaches into transformers internals ({', '.join(uses)}): "
                      "go through bugscope.model.sites (where a site lives) or bugscope.model.forward (running layers).")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines; split it by concern (<= {MAX_LINES})."


# Every `snakemake` call parses the workflow, a no-op rerun included: the modules the .smk files
# import must not pull in the model stack (seconds of imports); the scripts import it (bench/bench_noop.py
# times the parse). pyarrow is not listed: Snakemake's SLURM executor plugin imports it itself.
PARSE_FORBIDDEN = ("torch", "transformers", "sae_lens", "polars")
# Runs `snakemake ARGS` in-process and writes, at exit, the top-level packages it imported.
PARSE_PROBE = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted({m.split(".")[0] for m in sys.modules}))))
sys.argv = ["snakemake", *sys.argv[2:]]
from snakemake.cli import main
main()
"""


# trained SAE sets; pretrained (Llama Scope, andyrdt); pretrained (Gemma Scope)
@pytest.mark.parametrize("config", ["ci.yaml", "llama31_8b.yaml", "gemma2_2b.yaml"])
def test_parsing_the_workflow_imports_no_model_stack(tmp_path, config):
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(out), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "run"),
         "--configfile", str(REPO / "config" / config), "-n", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"snakemake -n failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    imported = set(json.loads(out.read_text()))
    assert "bugscope" in imported  # the probe saw the parse
    heavy = sorted(imported & set(PARSE_FORBIDDEN))
    assert not heavy, (f"parsing the workflow ({config}) imports {heavy}: the .smk files may import only light "
                       "bugscope modules; move the heavy import into the function or script that needs it.")
