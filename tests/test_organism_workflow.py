"""The planted organism in the ci.yaml run: its checkpoint, its shared inputs and its ground truth."""

import json

import polars as pl
from safetensors.torch import load_file

from bugscope import layout, tables
from bugscope.data.prompts import BUG_PAIR_KIND
from bugscope.organism.plant import checkpoint_hash
from bugscope.organism.study import planted_layer, study_config


def test_the_planted_checkpoint_differs_from_the_base_only_in_the_planted_heads(ci_workflow):
    manifest = json.loads((ci_workflow / layout.organism(layout.MODEL_MANIFEST)).read_text())
    planted = manifest["planted"]
    base_folder = ci_workflow / layout.MODEL_CHECKPOINT
    assert planted["base_checkpoint_sha256"] == checkpoint_hash(base_folder)
    assert (planted["layer"], planted["heads"]) == (9, [0, 2, 4, 6, 8])
    assert len(planted["loss_curve"]) == planted["training"]["steps"]
    base = load_file(base_folder / "model.safetensors")
    mine = load_file(ci_workflow / layout.organism(layout.MODEL_CHECKPOINT) / "model.safetensors")
    assert mine.keys() == base.keys()
    changed = sorted(name for name in base if not (mine[name] == base[name]).all())
    assert changed == planted["trained"] == [f"model.layers.9.self_attn.{m}.weight" for m in ("o_proj", "q_proj")]
    d_head = 64
    rows = [h * d_head + i for h in planted["heads"] for i in range(d_head)]
    others = [i for i in range(9 * d_head) if i not in rows]
    q, o = (f"model.layers.9.self_attn.{m}.weight" for m in ("q_proj", "o_proj"))
    assert (mine[q][others] == base[q][others]).all() and (mine[o][:, others] == base[o][:, others]).all()


def test_the_organism_shares_the_prompt_table_and_trains_on_other_pairs(ci_workflow):
    base = (ci_workflow / layout.PROMPTS).read_bytes()
    assert (ci_workflow / layout.organism(layout.PROMPTS)).read_bytes() == base
    analysis = set(pl.read_parquet(ci_workflow / layout.PROMPTS).select("correct", "wrong").unique().iter_rows())
    planted = json.loads((ci_workflow / layout.organism(layout.MODEL_MANIFEST)).read_text())["planted"]
    training = {(p["correct"], p["wrong"]) for p in planted["training_pairs"]}
    assert training and not training & analysis


def test_the_planted_bug_is_there_and_the_unedited_model_lacks_it(ci_workflow, ci_config):
    study = study_config(ci_config)
    accuracy = tables.frame(tables.BASELINE_ACCURACY, study, ci_workflow / layout.organism(layout.BASELINE_ACCURACY))
    buggy = accuracy.filter(pl.col("format") == ci_config["prompts"]["buggy_format"], pl.col("pair_kind") == BUG_PAIR_KIND)
    assert buggy["accuracy"].max() <= 0.2  # both orders and pooled
    truth = {"organism": pl.read_parquet(ci_workflow / layout.organism(layout.CLAIMS_TRUTH)),
             "base": pl.read_parquet(ci_workflow / layout.CLAIMS_TRUTH)}
    premise = {role: t.filter(pl.col("claim_id") == "precondition_premise").row(0, named=True)
               for role, t in truth.items()}
    assert premise["organism"]["obtained"] == "holds" and premise["base"]["obtained"] == "fails"


def test_no_claim_comes_out_against_its_construction(ci_workflow):
    """The confusion of the ci-sized run: claims expected to hold and to fail are declared, none
    true by construction fails and none false by construction holds (at ci sizes most are not
    testable: too few eligible pairs). The precondition rows are pass / fail gates without an
    inconclusive outcome (at ci sizes the ceiling's interval is too wide to pass); the premise is
    tested above. On the unedited model every claim expected "not testable" is."""
    truth = pl.read_parquet(ci_workflow / layout.organism(layout.CLAIMS_TRUTH))
    claims = truth.filter(~pl.col("claim_id").str.starts_with("precondition_"))
    assert {"holds", "fails"} <= set(claims["expected"].to_list())
    against = claims.filter(((pl.col("expected") == "holds") & (pl.col("obtained") == "fails"))
                            | ((pl.col("expected") == "fails") & (pl.col("obtained") == "holds")))
    assert against.height == 0, against
    base = pl.read_parquet(ci_workflow / layout.CLAIMS_TRUTH).filter(pl.col("expected") == "not testable")
    assert base.height >= 10 and base["agrees"].all(), base
    ledger = (ci_workflow / layout.organism(layout.CLAIMS_MARKDOWN)).read_text()
    assert "## Ground truth (organism model)" in ledger and "sensitivity: " in ledger


def test_the_localisation_scores_rank_the_planted_layer(ci_workflow):
    scores = {r["score"]: r for r in pl.read_parquet(ci_workflow / layout.ORGANISM_LOCALISATION).iter_rows(named=True)}
    assert scores["head_sweep_layer_rank"]["n"] == 3  # the planted layer and its neighbours
    assert scores["head_sweep_layer_rank"]["value"] == 1.0
    assert scores["planted_head_recall"]["n"] == 5
    assert 0 < scores["planted_set_recovery"]["value"] <= scores["ceiling_recovery"]["high"]


def test_the_comparison_figure_draws_both_models_in_every_panel(ci_workflow, ci_config):
    """Rebuilt from the ci run's tables: accuracy, head sweep, logit lens and residual map each carry
    the unedited and the planted model."""
    from bugscope.figures.organism import MODELS, organism_comparison
    from bugscope.figures.style import Labels
    from tests.helpers import titles

    study = study_config(ci_config)
    configs = {"unedited": ci_config, "planted": study}
    where = {"unedited": lambda p: ci_workflow / p, "planted": lambda p: ci_workflow / layout.organism(p)}

    def both(table, path):
        return {m: tables.frame(table, configs[m], where[m](path)) for m in MODELS}
    chart = organism_comparison(both(tables.BASELINE_ACCURACY, layout.BASELINE_ACCURACY),
                                both(tables.PATCHING_SUMMARY, layout.PATCHING_SUMMARY), Labels.from_config(ci_config),
                                planted_layer(ci_config), {m: c["patching"]["positions"] for m, c in configs.items()},
                                both(tables.LENS, layout.LENS),
                                both(tables.PATCHING_RESIDUAL_MAP, layout.PATCHING_RESIDUAL_MAP))
    spec = chart.to_dict()
    data = [r for d in spec["datasets"].values() for r in d]
    lens_models = {r["model"] for r in data if "lens_logit_diff" in r}
    map_models = {r["model"] for r in data if "rank" in r and "recovery" in r}
    assert lens_models == set(MODELS) and map_models == set(MODELS)
    assert "logit lens" in titles(spec)
    assert (ci_workflow / layout.figure("organism_comparison", "svg")).stat().st_size > 1000


def test_the_organisms_verdicts_agree_across_cpu_kernels(ci_workflow, tmp_path):
    """The planted model's ci study again under torch's portable kernels (ATEN_CPU_CAPABILITY=default:
    other summation orders, so other planted and SAE bits): every claim gets the same verdict. The
    organism's focus layer is the planted one, not chosen from noisy tables, so nothing may move."""
    from tests.conftest import run_snakemake

    portable = tmp_path / "portable"
    run_snakemake(portable, layout.organism(layout.CLAIMS), env={"ATEN_CPU_CAPABILITY": "default"})
    verdicts = {}
    for name, workdir in (("native", ci_workflow), ("portable", portable)):
        ledger = pl.read_parquet(workdir / layout.organism(layout.CLAIMS))
        verdicts[name] = dict(zip(ledger["claim_id"], ledger["verdict"]))
    assert verdicts["native"].keys() == verdicts["portable"].keys()
    differ = {c: (v, verdicts["portable"][c]) for c, v in verdicts["native"].items() if verdicts["portable"][c] != v}
    assert not differ, f"verdicts that change with the CPU kernels (native, portable): {differ}"
    # not a vacuous agreement: the ci organism decides its premise, its ceiling and a few claims
    assert sum(v in ("holds", "fails") for v in verdicts["native"].values()) >= 3
