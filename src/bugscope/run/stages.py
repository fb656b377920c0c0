"""The stage registry: the one place that declares the workflow's stages.

Each `Stage` says, once: its name (a rule's name, or the stem of its per-group rules:
`encode_features` for encode_features_main_L00_03), whether it runs under a config (`when`), the
files it writes (`outputs`, layout templates; `intermediate` are the ones only later stages read,
the rest are default targets) and its resource class (`model`: a job that runs the model or an
SAE, sized by bugscope.run.resources.job_resources and holding a GPU; else a light job).
`per` says how its jobs split: one job (None), one per layer group ("group"), one per SAE set
("set", a `{sae_set}` wildcard rule) or one per set and layer group ("set_group").

From it derive the default targets (`targets`: workflow/rules/common.smk's final_outputs), the
figures and report tables (`figures`, `report_tables`), which tables the claims ledger waits for
(`claims_table_sets`) and the resource table (bugscope.run.resources.rule_table, MODEL_RULES).
The rules themselves (workflow/rules/*.smk) say how each job runs.

Light to import: the workflow imports it while it parses (no torch, no Polars).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from bugscope import layout
from bugscope.config import analysed_layers, head_set_feature_sets, layer_groups, primary_sae_set, sae_sets
from bugscope.model.sites import HEAD_WRITTEN_SITES, hook_name, parse_hook_name


def _always(config: dict) -> bool:
    return True


def _patching_on(key: str) -> Callable[[dict], bool]:
    """On when patching.<key> is true, or its `enabled` for a section."""
    def when(config: dict) -> bool:
        value = config["patching"][key]
        return bool(value["enabled"] if isinstance(value, dict) else value)
    when.__doc__ = f"patching.{key}"
    return when


def _interventions_on(config: dict) -> bool:
    return bool(config["interventions"]["enabled"])


def _head_set_features_on(config: dict) -> bool:
    return bool(head_set_feature_sets(config))


def _probes_on(config: dict) -> bool:
    return bool(config["probes"]["enabled"]) and bool(probe_hooks(config))


def probe_hooks(config: dict) -> list[str]:
    """The cached resid_post hooks of the prompts: the layers the probes read."""
    return [h for h in hooks(config) if parse_hook_name(h)[1] == "resid_post"]


def _reading_on(config: dict) -> bool:
    return bool(config["reading"]["enabled"]) and bool(probe_hooks(config))


def _organism_on(config: dict) -> bool:
    return bool(config["organism"]["enabled"])


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...] = ()
    intermediate: tuple[str, ...] = ()
    model: bool = False
    per: str | None = None
    when: Callable[[dict], bool] = _always
    # The SAE sets a per-set stage runs for, by the set (default: every set).
    for_set: Callable[[dict], bool] = field(default=lambda s: True)

    def sets(self, config: dict) -> list[dict]:
        """The SAE sets (resolved) this stage runs for; [] for a stage that is not per set."""
        return [s for s in sae_sets(config) if self.for_set(s)] if self.per in ("set", "set_group") else []


_PLANTED = (layout.organism(layout.MODEL_MANIFEST), layout.organism(layout.MODEL_CHECKPOINT))
_PROMPT_ACTIVATIONS = layout.ACTIVATIONS.replace("{dataset}", "prompts")
_CORPUS_ACTIVATIONS = layout.ACTIVATIONS.replace("{dataset}", "corpus")
_READING_ACTIVATIONS = layout.ACTIVATIONS.replace("{dataset}", "reading")

_ORGANISM_PROMPTS = (layout.organism(layout.PROMPTS), layout.organism(layout.READING_PROMPTS))

# Workflow order: the model stages in this order are the rows of the resource table (docs/cluster.md).
_WORK_STAGES: tuple[Stage, ...] = (
    # model.smk
    Stage("prepare_model", (layout.MODEL_MANIFEST,), intermediate=(layout.MODEL_MANIFEST,)),
    Stage("build_prompts", (layout.PROMPTS,), intermediate=(layout.PROMPTS,)),
    Stage("baseline", (layout.BASELINE_SCORES, layout.BASELINE_ACCURACY, layout.BASELINE_CONTRAST,
                       layout.BASELINE_GENERATION, layout.LENS_PROMPTS, layout.LENS),
          intermediate=(layout.BASELINE_SCORES, layout.LENS_PROMPTS), model=True),
    Stage("cache_residuals", (_PROMPT_ACTIVATIONS,), model=True),
    Stage("probes", (layout.PROBE_PROMPTS, layout.PROBES), intermediate=(layout.PROBE_PROMPTS,), when=_probes_on),
    # reading.smk
    Stage("build_reading_prompts", (layout.READING_PROMPTS,), intermediate=(layout.READING_PROMPTS,), when=_reading_on),
    Stage("reading", (layout.READING_SCORES, _READING_ACTIVATIONS, layout.READING_FEATURES,
                      layout.READING_FEATURE_PROMPTS),
          intermediate=(layout.READING_SCORES, _READING_ACTIVATIONS, layout.READING_FEATURE_PROMPTS), model=True,
          when=_reading_on),
    Stage("reading_summary", (layout.READING_ACCURACY, layout.READING_CLOSENESS_PROMPTS, layout.READING_CLOSENESS,
                              layout.READING_STEERING, layout.READING_FEATURE_SUMMARY),
          intermediate=(layout.READING_CLOSENESS_PROMPTS,), when=_reading_on),
    # sae.smk
    Stage("prepare_corpus", (layout.CORPUS,), intermediate=(layout.CORPUS,)),
    Stage("cache_corpus", (_CORPUS_ACTIVATIONS,), intermediate=(_CORPUS_ACTIVATIONS,), model=True),
    Stage("train_sae", (layout.SAE_DIR,), intermediate=(layout.SAE_DIR,), model=True, per="set_group",
          for_set=lambda s: s["source"] == "train"),
    Stage("load_pretrained_sae", (layout.SAE_DIR,), intermediate=(layout.SAE_DIR,), model=True, per="set_group",
          for_set=lambda s: s["source"] == "pretrained"),
    Stage("encode_features", (layout.FEATURES,), model=True, per="set_group"),
    Stage("sae_quality", (layout.SAE_QUALITY_LAYER,), intermediate=(layout.SAE_QUALITY_LAYER,), model=True,
          per="set_group"),
    Stage("aggregate_sae_quality", (layout.SAE_QUALITY,)),
    # patching.smk
    Stage("head_sweep", (layout.PATCHING_SWEEP_GROUP,), intermediate=(layout.PATCHING_SWEEP_GROUP,), model=True,
          per="group"),
    Stage("head_subsets", (layout.PATCHING_SUBSETS_PROMPTS,), intermediate=(layout.PATCHING_SUBSETS_PROMPTS,),
          model=True),
    Stage("head_original_method", (layout.PATCHING_ORIGINAL_METHOD_PROMPTS, layout.PATCHING_ORIGINAL_METHOD),
          intermediate=(layout.PATCHING_ORIGINAL_METHOD_PROMPTS,), model=True, when=_patching_on("original_method")),
    Stage("head_patching_summary", (layout.PATCHING_PROMPTS, layout.PATCHING_SUMMARY),
          intermediate=(layout.PATCHING_PROMPTS,)),
    Stage("head_replacement", (layout.PATCHING_REPLACEMENT_PROMPTS, layout.PATCHING_REPLACEMENT),
          intermediate=(layout.PATCHING_REPLACEMENT_PROMPTS,), model=True, when=_patching_on("replacement")),
    Stage("head_subsets_exhaustive", (layout.PATCHING_EXHAUSTIVE_PROMPTS, layout.PATCHING_EXHAUSTIVE),
          intermediate=(layout.PATCHING_EXHAUSTIVE_PROMPTS,), model=True, when=_patching_on("exhaustive")),
    Stage("residual_map", (layout.PATCHING_RESIDUAL_MAP_PROMPTS, layout.PATCHING_RESIDUAL_MAP),
          intermediate=(layout.PATCHING_RESIDUAL_MAP_PROMPTS,), model=True, when=_patching_on("residual_map")),
    Stage("head_bidirectional", (layout.PATCHING_BIDIRECTIONAL_PROMPTS, layout.PATCHING_BIDIRECTIONAL,
                                 layout.PATCHING_LISTED_PAIRS),
          intermediate=(layout.PATCHING_BIDIRECTIONAL_PROMPTS,), model=True, when=_patching_on("bidirectional")),
    Stage("original_decomposition", (layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS,
                                     layout.PATCHING_ORIGINAL_DECOMPOSITION),
          intermediate=(layout.PATCHING_ORIGINAL_DECOMPOSITION_PROMPTS,), model=True,
          when=_patching_on("original_generation")),
    # features.smk: per SAE set; no head attribution on a site heads have no direct path into (mlp_out)
    Stage("feature_overlap", (layout.FEATURE_OVERLAP, layout.FEATURE_OVERLAP_PAIRS), per="set"),
    Stage("discriminative_features", (layout.DISCRIMINATIVE_FEATURES,), per="set"),
    Stage("named_features", (layout.NAMED_FEATURES,), per="set"),
    Stage("head_feature_attribution", (layout.HEAD_FEATURE_ATTRIBUTION, layout.HEAD_PARITY), model=True, per="set",
          for_set=lambda s: s["site"] in HEAD_WRITTEN_SITES),
    Stage("feature_pages", (layout.FEATURE_TOKENS, layout.FEATURE_CONTEXTS, layout.FEATURE_PAGES), model=True,
          per="set"),
    # interventions.smk
    Stage("feature_interventions", (layout.INTERVENTIONS_PROMPTS, layout.INTERVENTIONS), model=True,
          when=_interventions_on),
    Stage("head_set_features", (layout.HEAD_SET_FEATURES_PROMPTS, layout.HEAD_SET_FEATURES), model=True,
          when=_head_set_features_on),
    # organism.smk: the planted model; its own study is this registry again, under results/organism/
    Stage("plant_organism", _PLANTED, intermediate=_PLANTED, model=True, when=_organism_on),
    Stage("organism_prompts", _ORGANISM_PROMPTS, intermediate=_ORGANISM_PROMPTS, when=_organism_on),
    Stage("organism_localisation", (layout.ORGANISM_LOCALISATION, layout.ORGANISM_LOCALISATION_HTML),
          when=_organism_on),
    Stage("fig_organism_comparison", tuple(layout.figure("organism_comparison", ext) for ext in ("svg", "png", "html")),
          when=_organism_on),
)

# The figures (one rule fig_<name> each in workflow/rules/figures.smk), in report order, by the stage
# whose table each draws: a figure is made when that stage runs.
FIGURE_SOURCES: dict[str, str] = {
    "baseline_accuracy": "baseline",
    "lens": "baseline",
    "probes": "probes",
    "reading": "reading_summary",
    "reading_steering": "reading_summary",
    "feature_overlap": "feature_overlap",
    "amplification": "feature_overlap",
    "format_features": "discriminative_features",
    "sae_quality": "aggregate_sae_quality",
    "head_sweep": "head_patching_summary",
    "head_subsets": "head_patching_summary",
    "head_attribution": "head_feature_attribution",
    "original_method": "head_original_method",
    "replacement": "head_replacement",
    "residual_map": "residual_map",
    "subsets_exhaustive": "head_subsets_exhaustive",
    "interventions": "feature_interventions",
    "head_set_features": "head_set_features",
    "original_decomposition": "original_decomposition",
}

# The tables the report shows (rule report_table), by name: per-set ones of the primary set.
REPORT_TABLE_SOURCES: dict[str, str] = {
    "baseline_accuracy": layout.BASELINE_ACCURACY,
    "feature_overlap": layout.FEATURE_OVERLAP,
    "named_features": layout.NAMED_FEATURES,
    "sae_quality": layout.SAE_QUALITY,
}

_BY_NAME = {s.name: s for s in _WORK_STAGES}

STAGES: tuple[Stage, ...] = (
    *_WORK_STAGES,
    # figures.smk
    *(Stage(f"fig_{name}", tuple(layout.figure(name, ext) for ext in ("svg", "png", "html")),
            when=_BY_NAME[source].when) for name, source in FIGURE_SOURCES.items()),
    Stage("report_table", (layout.REPORT_TABLE,)),
    Stage("claims_ledger", (layout.CLAIMS, layout.CLAIMS_TRUTH, layout.CLAIMS_MARKDOWN, layout.CLAIMS_HTML)),
)
STAGE = {s.name: s for s in STAGES}
# The stages that run the model or an SAE (resource class "model"), in workflow order.
MODEL_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.model)


def hooks(config: dict, sae_set: dict | None = None) -> list[str]:
    """The hooks `sae_set` reads at its layers; without one, every hook some set reads (one cache
    job fills them all), by layer."""
    if sae_set is not None:
        return [hook_name(layer, sae_set["site"]) for layer in sae_set["layers"]]
    every = {h for s in sae_sets(config) for h in hooks(config, s)}
    return sorted(every, key=lambda h: (parse_hook_name(h)[0], h))


def report_tables(config: dict) -> dict[str, str]:
    """The report tables by name: the path each shows (per-set tables: the primary set's)."""
    primary = primary_sae_set(config)
    return {name: layout.per_set(path, primary) for name, path in REPORT_TABLE_SOURCES.items()}


def figures(config: dict) -> list[str]:
    """The figures the config makes, in report order."""
    return [name for name in FIGURE_SOURCES if STAGE[f"fig_{name}"].when(config)]


def expand(config: dict, stage: Stage, templates: tuple[str, ...]) -> list[str]:
    """`templates` (outputs of `stage`) with their wildcards filled for every job of the stage."""
    out = []
    for template in templates:
        if "{sae_set}" in template:
            for s in stage.sets(config):
                if "{hook}" in template:
                    out += [layout.per_set(template, s["name"], hook=h) for h in hooks(config, s)]
                else:
                    out.append(layout.per_set(template, s["name"]))
        elif "{hook}" in template:
            out += [template.format(hook=h) for h in hooks(config)]
        elif "{group}" in template:
            groups = layer_groups(analysed_layers(config), config["resources"]["layers_per_job"])
            out += [template.format(group=g) for g in groups]
        elif "{name}" in template:
            out += [template.format(name=name) for name in report_tables(config)]
        else:
            out.append(template)
    return out


def targets(config: dict) -> list[str]:
    """The default target: every output of every stage the config runs, but the intermediate ones."""
    return [path for stage in STAGES if stage.when(config)
            for path in expand(config, stage, tuple(t for t in stage.outputs if t not in stage.intermediate))]


def producer(template: str) -> Stage:
    """The stage that writes the layout template `template`."""
    for stage in STAGES:
        if template in stage.outputs:
            return stage
    raise KeyError(f"no stage of bugscope.run.stages writes {template!r}: declare it in the stage's outputs.")


def set_tables(config: dict, sae_set: str) -> list[str]:
    """The per-set feature-analysis outputs (templates) one SAE set gets, in workflow order."""
    return [t for stage in STAGES if stage.per == "set" and stage.when(config)
            and sae_set in [s["name"] for s in stage.sets(config)] for t in stage.outputs]


def claims_table_sets(config: dict, ledger_tables: Mapping[str, str]) -> dict[str, list[str | None]]:
    """For each table the claims ledger reads (name -> layout template), the SAE sets whose file it
    reads: per-set tables, every set whose stage makes it; others [None] when their stage runs, else []."""
    out = {}
    for name, template in ledger_tables.items():
        stage = producer(template)
        if not stage.when(config):
            out[name] = []
        elif "{sae_set}" in template:
            out[name] = [s["name"] for s in stage.sets(config)]
        else:
            out[name] = [None]
    return out
