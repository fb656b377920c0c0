"""Every light step (a local rule: it runs on the login node) stays under 2 GB at the 8B study's sizes.

The inputs are synthetic tables of config/llama31_8b.yaml's sizes with their writers' schemas
(tests/eightb_tables.py). Each step runs its real workflow script, in a child process of its own,
with a stand-in for the `snakemake` object; the child reports its peak resident memory, VmHWM from
/proc/self/status (ru_maxrss would carry over pytest's own peak across exec on Linux). The peak
counts everything the step does: imports, reading, computing, writing, rendering.
The patching summary's bootstrap alone is also measured in tests/test_stats.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from bugscope import layout
from bugscope.claims.spec import TABLES
from bugscope.config import analysed_layers, layer_groups, primary_sae_set, stage_hash, validate_config
from bugscope.model.sites import hook_name
from tests.conftest import REPO
from tests.eightb_tables import PROBE_LAYERS, build_attribution, build_inputs

LIMIT_MB = 2048
CONFIG = REPO / "config" / "llama31_8b.yaml"

# The child: a `snakemake` stand-in (named lists as Snakemake gives them) and the real script.
RUNNER = textwrap.dedent("""
    import json, os, runpy, sys
    spec = json.loads(sys.argv[1])
    os.chdir(spec["root"])
    from bugscope.config import load_config

    class Named(list):
        def __init__(self, items):
            super().__init__()
            self._names = {}
            for key, value in items.items():
                self._names[key] = value
                self.extend(value) if isinstance(value, list) else self.append(value)
        def __getattr__(self, key):
            try:
                return self.__dict__["_names"][key]
            except KeyError:
                raise AttributeError(key) from None
        def __getitem__(self, key):
            return self._names[key] if isinstance(key, str) else super().__getitem__(key)
        def keys(self):
            return self._names.keys()

    class Snakemake:
        pass
    smk = Snakemake()
    smk.input, smk.output, smk.params = Named(spec["input"]), Named(spec["output"]), Named(spec["params"])
    smk.wildcards, smk.log = Named(spec["wildcards"]), Named({"log": spec["log"]})
    smk.config, smk.rule, smk.threads = load_config(spec["config"]), spec["rule"], 1
    code = 0
    try:
        runpy.run_path(spec["script"], init_globals={"snakemake": smk}, run_name="__main__")
    except SystemExit as exit:
        code = exit.code or 0
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"peak_mb": int(line.split()[1]) / 1024, "code": code}))
""")


def _figure(name: str, **inputs) -> dict:
    return {"script": f"fig_{name}.py", "input": inputs,
            "output": {ext: layout.figure(name, ext) for ext in ("svg", "png", "html")},
            "params": {"png_scale": CFG["figures"]["png_scale"]}, "log": f"{layout.LOGS}/figures/{name}.log"}


def one_set_config() -> dict:
    """config/llama31_8b.yaml with its named ids (on the mlp_out set) moved to the primary set: a light
    step reads one set's tables, so every step is measured on the primary set at the same sizes."""
    raw = yaml.safe_load(CONFIG.read_text())
    sets = raw["sae"]["sets"]
    sets[0]["named"] = next(s["named"] for s in sets if s.get("named"))
    raw["sae"]["sets"] = sets[:1]
    for fs in raw.get("interventions", {}).get("feature_sets", []):  # the seed's ids, on the kept set
        fs["sae_set"] = sets[0]["name"]
    return raw


CFG = validate_config(one_set_config())
SET = primary_sae_set(CFG)
LAYERS = analysed_layers(CFG)
HOOKS = [hook_name(layer, CFG["sae"]["sets"][0]["site"]) for layer in LAYERS]
NAMED_LAYERS = sorted(int(layer) for layer in CFG["sae"]["sets"][0]["named"])
FEATURES = [layout.per_set(layout.FEATURES, SET, hook=hook) for hook in HOOKS]
FEATURE_HASH = stage_hash(CFG, "features")


def per_set(template: str) -> str:
    return layout.per_set(template, SET)

# rule: (the steps whose outputs it reads, how the rule calls its script); the rules of workflow/rules/*.smk.
STEPS = {
    "head_patching_summary": ([], {
        "script": "head_patching_summary.py",
        "input": {"sweep": [layout.PATCHING_SWEEP_GROUP.format(group=g) for g in
                            layer_groups(LAYERS, CFG["resources"]["layers_per_job"])],
                  "subsets": layout.PATCHING_SUBSETS_PROMPTS, "scores": layout.BASELINE_SCORES},
        "output": {"prompts": layout.PATCHING_PROMPTS, "summary": layout.PATCHING_SUMMARY},
        "params": {"config_hash": stage_hash(CFG, "patching_summary")}}),
    "feature_overlap": ([], {
        "script": "feature_overlap.py", "input": {"prompts": layout.PROMPTS, "features": FEATURES},
        "output": {"overlap": per_set(layout.FEATURE_OVERLAP), "pairs": per_set(layout.FEATURE_OVERLAP_PAIRS)},
        "params": {"sae_set": SET, "layers": LAYERS, "config_hash": FEATURE_HASH}}),
    "discriminative_features": ([], {
        "script": "discriminative_features.py",
        "input": {"prompts": layout.PROMPTS, "scores": layout.BASELINE_SCORES, "features": FEATURES},
        "output": {"discriminative": per_set(layout.DISCRIMINATIVE_FEATURES)},
        "params": {"sae_set": SET, "layers": LAYERS, "config_hash": FEATURE_HASH}}),
    "named_features": (["discriminative_features"], {
        "script": "named_features.py",
        "input": {"prompts": layout.PROMPTS,
                  "features": [layout.per_set(layout.FEATURES, SET, hook=hook_name(la)) for la in NAMED_LAYERS],
                  "discriminative": per_set(layout.DISCRIMINATIVE_FEATURES)},
        "output": {"named": per_set(layout.NAMED_FEATURES)},
        "params": {"sae_set": SET, "layers": NAMED_LAYERS, "config_hash": FEATURE_HASH}}),
    "aggregate_sae_quality": ([], {
        "script": "aggregate_sae_quality.py",
        "input": {"quality": [layout.per_set(layout.SAE_QUALITY_LAYER, SET, hook=hook) for hook in HOOKS]},
        "output": {"quality": layout.SAE_QUALITY},
        "params": {"config_hash": stage_hash(CFG, "sae")}}),
    "fig_baseline_accuracy": ([], _figure("baseline_accuracy", accuracy=layout.BASELINE_ACCURACY)),
    "fig_lens": ([], _figure("lens", lens=layout.LENS)),
    "probes": ([], {
        "script": "probes.py",
        "input": {"prompts": layout.PROMPTS, "scores": layout.BASELINE_SCORES,
                  "activations": [layout.activations("prompts", hook_name(layer)) for layer in PROBE_LAYERS]},
        "output": {"predictions": layout.PROBE_PROMPTS, "summary": layout.PROBES},
        "params": {"config_hash": stage_hash(CFG, "probes")}}),
    "fig_probes": (["probes"], _figure("probes", probes=layout.PROBES)),
    "reading_summary": ([], {
        "script": "reading_summary.py",
        "input": {"prompts": layout.PROMPTS, "reading_prompts": layout.READING_PROMPTS, "scores": layout.READING_SCORES,
                  "baseline": layout.BASELINE_SCORES,
                  "activations": [layout.activations("prompts", hook_name(layer)) for layer in PROBE_LAYERS],
                  "reading_activations": [layout.activations("reading", hook_name(layer)) for layer in PROBE_LAYERS],
                  "features": layout.READING_FEATURES, "feature_prompts": layout.READING_FEATURE_PROMPTS,
                  "feature_codes": FEATURES},
        "output": {"accuracy": layout.READING_ACCURACY, "closeness_prompts": layout.READING_CLOSENESS_PROMPTS,
                   "closeness": layout.READING_CLOSENESS, "steering": layout.READING_STEERING,
                   "feature_summary": layout.READING_FEATURE_SUMMARY},
        "params": {"config_hash": stage_hash(CFG, "reading")}}),
    "fig_reading": (["reading_summary"], _figure("reading", accuracy=layout.READING_ACCURACY,
                                                 closeness=layout.READING_CLOSENESS)),
    "fig_reading_steering": (["reading_summary"], _figure("reading_steering", steering=layout.READING_STEERING)),
    "fig_feature_overlap": (["feature_overlap"], _figure("feature_overlap", overlap=per_set(layout.FEATURE_OVERLAP))),
    "fig_amplification": (["feature_overlap"], _figure("amplification", overlap=per_set(layout.FEATURE_OVERLAP))),
    "fig_format_features": (["discriminative_features", "named_features"], _figure(
        "format_features", discriminative=per_set(layout.DISCRIMINATIVE_FEATURES), named=per_set(layout.NAMED_FEATURES))),
    "fig_head_attribution": (["attribution"], _figure("head_attribution",
                                                      attribution=per_set(layout.HEAD_FEATURE_ATTRIBUTION))),
    "fig_sae_quality": (["aggregate_sae_quality"], _figure("sae_quality", quality=layout.SAE_QUALITY)),
    "fig_head_sweep": (["head_patching_summary"], _figure("head_sweep", summary=layout.PATCHING_SUMMARY)),
    "fig_head_subsets": (["head_patching_summary"], _figure("head_subsets", summary=layout.PATCHING_SUMMARY)),
    "fig_original_method": ([], _figure("original_method", comparison=layout.PATCHING_ORIGINAL_METHOD)),
    "fig_interventions": ([], _figure("interventions", summary=layout.INTERVENTIONS)),
    "fig_head_set_features": ([], _figure("head_set_features", summary=layout.HEAD_SET_FEATURES)),
    "fig_replacement": ([], _figure("replacement", summary=layout.PATCHING_REPLACEMENT)),
    "fig_residual_map": ([], _figure("residual_map", summary=layout.PATCHING_RESIDUAL_MAP)),
    "fig_subsets_exhaustive": ([], _figure("subsets_exhaustive", summary=layout.PATCHING_EXHAUSTIVE)),
    "fig_original_decomposition": ([], _figure("original_decomposition",
                                                decomposition=layout.PATCHING_ORIGINAL_DECOMPOSITION)),
    **{f"report_table_{name}": ([producer] if producer else [], {
        "script": "report_table.py", "input": {"table": path}, "output": {"html": layout.REPORT_TABLE.format(name=name)},
        "params": {}, "wildcards": {"name": name}})
       for name, path, producer in (("baseline_accuracy", layout.BASELINE_ACCURACY, None),
                                    ("feature_overlap", per_set(layout.FEATURE_OVERLAP), "feature_overlap"),
                                    ("named_features", per_set(layout.NAMED_FEATURES), "named_features"),
                                    ("sae_quality", layout.SAE_QUALITY, "aggregate_sae_quality"))},
    "claims_ledger": (["head_patching_summary", "feature_overlap", "named_features", "aggregate_sae_quality",
                       "attribution"], {
        "script": "claims_ledger.py",
        "input": {"ledger": str(REPO / "config" / "claims.yaml"), "prompts": layout.PROMPTS,
                  **{name: per_set(spec.path) for name, spec in TABLES.items()}},
        "output": {"claims": layout.CLAIMS, "truth": layout.CLAIMS_TRUTH, "markdown": layout.CLAIMS_MARKDOWN,
                   "html": layout.CLAIMS_HTML},
        "params": {"table_sets": {name: [SET] if "{sae_set}" in spec.path else [None]
                                  for name, spec in TABLES.items()}}}),
}


class Study:
    """The synthetic 8B tables under one folder, and the steps run on them so far (rule: result)."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, dict] = {}
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(one_set_config()))
        build_inputs(CFG, root)

    def run(self, rule: str) -> dict:
        if rule in self.results:
            return self.results[rule]
        if rule == "attribution":  # a model rule: its tables are built, from the discriminative table
            self.run("discriminative_features")
            build_attribution(CFG, self.root)
            self.results[rule] = {}
            return {}
        deps, call = STEPS[rule]
        for dep in deps:
            self.run(dep)
        spec = {"root": str(self.root), "config": str(self.config), "rule": rule, "wildcards": {},
                "log": f"{layout.LOGS}/{rule}.log", **call, "script": str(REPO / "workflow" / "scripts" / call["script"])}
        proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                              timeout=900)
        log = self.root / spec["log"]
        detail = (proc.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else ""))
        assert proc.returncode == 0, detail
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, detail
        missing = [p for p in call["output"].values() if not (self.root / p).exists()]
        assert not missing, f"{rule} did not write {missing}: {detail}"
        self.results[rule] = result
        return result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return Study(tmp_path_factory.mktemp("eightb"))


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(STEPS))
def test_light_step_at_8b_sizes_stays_under_2_gb(study, rule):
    result = study.run(rule)
    print(f"{rule}: peak {result['peak_mb']:.0f} MB")
    assert result["peak_mb"] <= LIMIT_MB, f"{rule} peaked at {result['peak_mb']:.0f} MB (limit {LIMIT_MB} MB)"


def test_every_local_rule_of_the_workflow_is_measured(tmp_path):
    """A new local rule gets a memory test: every `localrule: True` rule but the ones that only prepare
    inputs. The organism's copies (organism_*) run the same scripts as the base rules measured here."""
    from tests.conftest import workflow_rules

    rules = workflow_rules(tmp_path)
    copies = {name for name in rules if name.startswith("organism_") and name.removeprefix("organism_") in rules}
    local = {name for name, (is_local, _) in rules.items() if is_local and name not in copies}
    # all, default: targets; prepare_model, build_prompts, build_reading_prompts, prepare_corpus: they
    # read the tokenizer and the prompt and corpus sources, no table of the study's sizes.
    # organism_prompts copies the prompt table; organism_localisation and fig_organism_comparison
    # read the head-patching summaries (the organism's of 3 layers) and baseline accuracy tables that
    # fig_head_sweep and fig_baseline_accuracy are measured on here (not measured on their own: open).
    unmeasured = local - {"all", "default", "prepare_model", "build_prompts", "build_reading_prompts", "prepare_corpus",
                          "organism_prompts",
                          "organism_localisation", "fig_organism_comparison"}
    measured = {rule.split("_table_")[0] + "_table" if rule.startswith("report_table") else rule for rule in STEPS}
    assert unmeasured <= measured, f"local rules without a memory test: {sorted(unmeasured - measured)}"
