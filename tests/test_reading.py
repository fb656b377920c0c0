"""Version or date reading (bugscope.data.reading, bugscope.model.steering): the families' prompts on
the real tokenizer, the closeness probe on made-up activations, the decision-column steering on the
real model, the summaries on made-up scores, the two ledger rules on made-up tables, and the ci run's
tables."""

import datetime

import numpy as np
import polars as pl
import pytest
import torch

from bugscope.data.prompts import ALL, BUG_PAIR_KIND, DECIMAL, build_prompt_table
from bugscope.data.reading import (
    NONE,
    RANDOM,
    READING,
    TEST,
    TRAIN,
    build_reading_table,
    closeness_predictions,
    closeness_summary,
    reading_directions,
    steering_summary,
)

BOOT = dict(n_resamples=500, confidence=0.95, seed=0)


@pytest.fixture(scope="module")
def tables_of(ci_config, embedded):
    analysis = pl.from_arrow(build_prompt_table(ci_config, embedded[1]))
    return analysis, pl.from_arrow(build_reading_table(ci_config, embedded[1], analysis))


def test_every_family_is_answered_by_its_own_reading_and_keeps_out_of_the_analysis_ids(tables_of, ci_config, embedded):
    analysis, reading = tables_of
    tok = embedded[1]
    assert reading["prompt_id"].min() == analysis["prompt_id"].max() + 1
    assert reading["pair_id"].min() == analysis["pair_id"].max() + 1
    assert set(reading["family"]) == set(ci_config["reading"]["families"])
    assert set(reading["wording"]) == {TRAIN, TEST} and set(analysis["family"]) == {DECIMAL}
    taken = {tuple(sorted(p)) for p in zip(analysis["correct"], analysis["wrong"])}
    for family, rows in reading.group_by("family"):
        pairs = set(zip(rows["correct"], rows["wrong"]))
        assert len(pairs) == ci_config["reading"]["n_pairs"] and not {tuple(sorted(p)) for p in pairs} & taken
        style = ci_config["reading"]["families"][family[0]]["numbers"]
        for right, other in pairs:
            if style == "date":  # a valid date, the later day right
                month, day = right.split()
                assert other.split()[0] == month and int(day) > int(other.split()[1])
                datetime.datetime.strptime(f"{month} {day} 2025", "%B %d %Y")
            else:  # the same numbers as a decimal pair: right by decimal or by version order
                assert (float(right) > float(other)) == (style == "decimal")
                assert (int(right.split(".")[1]) > int(other.split(".")[1])) == (style != "decimal")
    for row in reading.iter_rows(named=True):
        # the decision is the first token where the two answers part; the numbers token is in the question
        assert tok.decode([row["correct_token"]]) != tok.decode([row["wrong_token"]])
        assert row["numbers_pos"] < row["decision_pos"] and row["numbers_pos"] in row["aligned_positions"]
        second = row["wrong"] if row["order"] == "correct_first" else row["correct"]
        assert second.split()[-1].split(".")[-1][-1] in tok.decode([row["input_ids"][row["numbers_pos"]]])


def _meta(n_pairs=12, families=("decimal", "versions", "dates")):
    rows, pair = [], 100
    for family in families:
        for _ in range(n_pairs):
            for wording in (TRAIN, TEST):
                for order in ("correct_first", "wrong_first"):
                    for fmt in ("qa", "simple"):
                        rows.append({"prompt_id": len(rows), "pair_id": pair, "pair_kind": BUG_PAIR_KIND,
                                     "order": order, "format": fmt, "family": family, "wording": wording})
            pair += 1
    for pair in range(16):  # the analysis prompts
        for order in ("correct_first", "wrong_first"):
            for fmt in ("qa", "simple"):
                rows.append({"prompt_id": len(rows), "pair_id": pair, "pair_kind": BUG_PAIR_KIND, "order": order,
                             "format": fmt, "family": DECIMAL, "wording": "analysis"})
    return pl.DataFrame(rows)


def _vectors(meta, *, reading_axis: float, template_axis: float, qa_shift: float, seed=0):
    """Made-up residuals: the reading along axis 0, each wording's template along axis 1 (a cue that
    does not transfer), and the qa format of the analysis prompts pushed towards the reading by qa_shift."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(meta.height, 16))
    reading = (meta["family"] != DECIMAL).to_numpy()
    x[:, 0] += np.where(reading, reading_axis, -reading_axis)
    train = (meta["wording"] == TRAIN).to_numpy()
    x[:, 1] += np.where(train & reading, template_axis, np.where(train, -template_axis, 0.0))
    qa_analysis = ((meta["wording"] == "analysis") & (meta["format"] == "qa")).to_numpy()
    x[qa_analysis, 0] += qa_shift
    return x


def _closeness(meta, x):
    pred = closeness_predictions({(5, "decision"): x}, meta, alphas=[0.1, 1.0, 10.0, 100.0])
    summary = closeness_summary(pred, buggy_format="qa", correct_format="simple", min_accuracy=0.75, **BOOT)
    return {(r["measure"], r["family"], r["format"]): r
            for r in summary.filter(pl.col("variant") == "all_pairs", pl.col("pair_kind").is_in([BUG_PAIR_KIND]))
            .iter_rows(named=True)}


def test_the_closeness_probe_reads_a_reading_that_transfers_and_places_the_formats():
    meta = _meta()
    out = _closeness(meta, _vectors(meta, reading_axis=3.0, template_axis=0.0, qa_shift=3.0))
    assert out[("transfer_accuracy", ALL, ALL)]["value"] >= 0.9
    assert out[("version_rate", DECIMAL, "qa")]["value"] > 0.3 > out[("version_rate", DECIMAL, "simple")]["value"]
    gap = out[("buggy_minus_correct", DECIMAL, "qa-simple")]
    assert gap["value_low"] > 0.1 and gap["n_pairs"] == 16


def test_a_template_cue_alone_does_not_transfer_to_the_held_out_wording():
    meta = _meta()
    out = _closeness(meta, _vectors(meta, reading_axis=0.0, template_axis=4.0, qa_shift=0.0))
    held_out = out[("transfer_accuracy", ALL, ALL)]
    assert held_out["value_low"] < 0.75  # what reading_probe requires: the precondition would fail
    gap = out[("buggy_minus_correct", DECIMAL, "qa-simple")]
    assert gap["value_low"] <= 0 <= gap["value_high"]


def test_the_reading_direction_is_the_difference_of_the_family_means():
    x = np.array([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [0, 0, 4.0]])
    family = np.array([DECIMAL, DECIMAL, "versions", "dates"])
    # readings' mean of means (0, 1, 2) minus decimal's (2, 0, 0)
    assert reading_directions(x, family) == pytest.approx(np.array([-2.0, 1.0, 2.0]) / 3.0)


def test_the_no_op_steering_leaves_the_logits_unchanged_and_a_projection_removes_its_direction(embedded, tables_of):
    from bugscope.data.baseline import score_prompts
    from bugscope.model.steering import Steer, reading_pass

    model, tok = embedded
    _, reading = tables_of
    rows = [{**r, "positions": [r["decision_pos"]]} for r in reading.head(12).to_dicts()]
    d = model.config.hidden_size
    zero = {layer: torch.zeros(d) for layer in (3, 7)}
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    out = reading_pass(model, rows, capture_layers=[3], conditions=[Steer(zero), Steer({3: u})], batch_size=8,
                       pad_token_id=tok.pad_token_id)
    own = score_prompts(model, rows, batch_size=8, pad_token_id=tok.pad_token_id)
    expected = dict(zip(own["prompt_id"].to_list(), own["logit_diff"].to_list()))
    base = np.array([expected[int(i)] for i in out.prompt_ids])
    # unsteered: the model's own scores (float32 values); the no-op rerun of one column: to the
    # float32 rounding of 30 layers of d_model sums
    scale = np.abs(base).max()
    assert np.abs(out.logit_diff[:, 0] - base).max() <= 1e-6 * scale * 30
    assert np.abs(out.logit_diff[:, 1] - out.logit_diff[:, 0]).max() <= np.finfo(np.float32).eps * scale * 30 * 64
    assert not np.allclose(out.logit_diff[:, 2], out.logit_diff[:, 0])  # removing a direction moves something
    assert out.vectors[3].shape == (12, d)


def test_projecting_out_at_a_layer_leaves_no_component_along_the_direction(embedded, tables_of):
    from bugscope.model.capture import recorded_output
    from bugscope.model.forward import KVRecorder, LayerRunner, iter_batches
    from bugscope.model.sites import decoder_layers, output_tensor, site_writer_hook
    from bugscope.model.steering import Steer, _writer

    model, tok = embedded
    _, reading = tables_of
    d = model.config.hidden_size
    units = torch.nn.functional.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(1)), dim=1)
    batch = next(iter_batches(reading.head(4).to_dicts(), 4, tok.pad_token_id, "cpu"))
    runner = LayerRunner(model)
    with torch.inference_mode():
        hidden, ctx = runner.begin(batch)
        rec = KVRecorder()
        entering = None
        for layer in range(runner.n_layers):
            entering = hidden if layer == 5 else entering
            hidden = runner.layer(layer, hidden, ctx, rec)
        handle = site_writer_hook(model, 5, "resid_post", _writer([Steer({5: units[0]}), Steer({5: units[1]})], 5, d))
        try:  # registered after the write, the recorder sees the written output
            with recorded_output(decoder_layers(model)[5]) as seen:
                runner.rerun_last_column(5, entering, ctx, rec.kv, replicas=2)
        finally:
            handle.remove()
        with recorded_output(decoder_layers(model)[5]) as plain:
            runner.rerun_last_column(5, entering, ctx, rec.kv, replicas=2)
    written, unwritten = output_tensor(seen["output"]), output_tensor(plain["output"])
    along = (written.reshape(2, 4, d) * units[:, None, :]).sum(-1)
    assert along.abs().max() <= 1e-5 * written.abs().max()
    assert (unwritten.reshape(2, 4, d) * units[:, None, :]).sum(-1).abs().max() > 1e-2


def _steered(meta, right, *, reading, random, source_right=True):
    """Scores of made-up prompts: `right[prompt]` unsteered; the reading and random conditions add
    their own rights."""
    rows = []
    for pid in meta["prompt_id"].to_list():
        rows.append({"prompt_id": pid, "condition": NONE, "draw": 0, "logit_diff": 1.0 if right[pid] else -1.0})
        rows.append({"prompt_id": pid, "condition": READING, "draw": 0, "logit_diff": 1.0 if reading[pid] else -1.0})
        for draw in range(2):
            rows.append({"prompt_id": pid, "condition": RANDOM, "draw": draw,
                         "logit_diff": 1.0 if random[pid] else -1.0})
    return pl.DataFrame(rows)


def test_the_steering_summary_measures_lift_against_random_damage_and_the_families():
    meta = _meta(n_pairs=12).with_columns(question_id=pl.col("prompt_id") // 2)
    qa = meta.filter(pl.col("format") == "qa")
    analysis = (pl.col("wording") == "analysis")
    # the analysis prompts: kinds alternate bug / control by pair
    meta = meta.with_columns(pl.when(analysis & (pl.col("pair_id") % 4 == 3)).then(pl.lit("same_length"))
                             .otherwise(pl.col("pair_kind")).alias("pair_kind"))
    kind = dict(zip(meta["prompt_id"], meta["pair_kind"]))
    family = dict(zip(meta["prompt_id"], meta["family"]))
    is_analysis = dict(zip(meta["prompt_id"], meta["wording"] == "analysis"))
    right = {p: (kind[p] != BUG_PAIR_KIND) if is_analysis[p] else True for p in meta["prompt_id"]}
    # the reading fixes every bug prompt, leaves the controls, breaks the families; random does nothing
    reading = {p: True if is_analysis[p] else family[p] == DECIMAL for p in meta["prompt_id"]}
    scores = _steered(qa, right, reading=reading, random=right)
    baseline = meta.select("prompt_id", logit_diff=pl.lit(1.0))  # every correct-format source right
    out = steering_summary(scores, meta, baseline, buggy_format="qa", correct_format="simple", **BOOT)
    get = {(r["condition"], r["subject"], r["pair_kind"], r["measure"]): r for r in out.iter_rows(named=True)}
    assert get[(READING, DECIMAL, BUG_PAIR_KIND, "accuracy_change")]["value"] == 1.0
    assert get[(READING, DECIMAL, BUG_PAIR_KIND, "change_vs_random")]["value"] == 1.0
    assert get[(READING, DECIMAL, "controls", "accuracy_change")]["value"] == 0.0
    assert get[(RANDOM, DECIMAL, BUG_PAIR_KIND, "accuracy_change")]["value"] == 0.0
    assert get[(READING, "eligible", BUG_PAIR_KIND, "success_rate")]["value"] == 1.0
    assert get[(READING, "eligible", BUG_PAIR_KIND, "recovery")]["value"] == pytest.approx(1.0)
    assert get[(READING, "versions", BUG_PAIR_KIND, "accuracy_change")]["value"] == -1.0


# --- the two ledger rules on made-up tables ---------------------------------------------------------


def _closeness_table(gap, gap_ci, transfer_ci):
    key = {"variant": "heldout_selected", "layer": 7, "position": "numbers", "pair_kind": BUG_PAIR_KIND,
           "n_prompts": 64, "n_pairs": 32, "confidence": 0.95}
    return pl.DataFrame([
        {**key, "measure": "buggy_minus_correct", "family": DECIMAL, "format": "qa-simple", "value": gap,
         "value_low": gap_ci[0], "value_high": gap_ci[1]},
        {**key, "measure": "transfer_accuracy", "family": ALL, "format": ALL, "value": sum(transfer_ci) / 2,
         "value_low": transfer_ci[0], "value_high": transfer_ci[1]},
    ])


@pytest.mark.parametrize("gap, gap_ci, transfer_ci, verdict", [
    (0.3, (0.18, 0.42), (0.85, 0.97), "holds"),        # the buggy format read as a version far more often
    (0.0, (-0.05, 0.04), (0.85, 0.97), "fails"),       # both formats read alike
    (0.12, (-0.02, 0.26), (0.85, 0.97), "inconclusive"),
    (0.3, (0.18, 0.42), (0.55, 0.8), "not testable"),  # the probe does not tell the families apart
])
def test_the_buggy_format_read_as_version_claim(gap, gap_ci, transfer_ci, verdict):
    result = _evaluate("buggy_format_read_as_version", {"reading_closeness": _closeness_table(gap, gap_ci, transfer_ci)})
    assert result["verdict"].startswith(verdict), result["detail"]


def _steering_table(lift_ci, damage_ci):
    key = {"condition": READING, "subject": DECIMAL, "n_prompts": 64, "n_pairs": 32, "confidence": 0.95}
    return pl.DataFrame([
        {**key, "pair_kind": BUG_PAIR_KIND, "measure": "change_vs_random", "value": sum(lift_ci) / 2,
         "value_low": lift_ci[0], "value_high": lift_ci[1]},
        {**key, "pair_kind": "controls", "measure": "accuracy_change", "value": sum(damage_ci) / 2,
         "value_low": damage_ci[0], "value_high": damage_ci[1]},
    ])


def _contrast(low):
    return pl.DataFrame([{"pair_kind": BUG_PAIR_KIND, "n_pairs": 64, "accuracy_gap": low + 0.1,
                          "accuracy_gap_low": low, "accuracy_gap_high": low + 0.2}])


@pytest.mark.parametrize("lift_ci, damage_ci, premise_low, verdict", [
    ((0.2, 0.4), (-0.05, 0.05), 0.3, "holds"),         # fixes the bug beyond random, controls intact
    ((-0.05, 0.04), (-0.05, 0.05), 0.3, "fails"),      # no lift beyond random directions
    ((0.2, 0.4), (-0.5, -0.3), 0.3, "fails"),          # lifts the bug by breaking the controls
    ((0.05, 0.3), (-0.05, 0.05), 0.3, "inconclusive"),
    ((0.2, 0.4), (-0.05, 0.05), -0.05, "not testable"),  # no bug to fix
])
def test_the_removing_the_reading_fixes_the_bug_claim(lift_ci, damage_ci, premise_low, verdict):
    result = _evaluate("removing_the_reading_fixes_the_bug",
                       {"reading_steering": _steering_table(lift_ci, damage_ci), "baseline_contrast": _contrast(premise_low)})
    assert result["verdict"].startswith(verdict), result["detail"]


def _evaluate(claim_id, tables):
    from bugscope.claims.evaluate import evaluate_claim
    from bugscope.claims.spec import load_ledger
    from tests.conftest import REPO
    from tests.test_claims import ctx

    claim = next(c for c in load_ledger(REPO / "config" / "claims.yaml") if c["id"] == claim_id)
    return evaluate_claim(claim, tables, ctx())


# --- the ci run --------------------------------------------------------------------------------------


def test_the_ci_run_reads_every_family_and_steers_against_random_directions(ci_workflow, ci_config):
    from bugscope import layout, tables
    from bugscope.config import steer_layers

    accuracy = tables.frame(tables.READING_ACCURACY, ci_config, ci_workflow / layout.READING_ACCURACY)
    assert set(accuracy["family"]) == set(ci_config["reading"]["families"])
    assert accuracy["accuracy"].is_between(0, 1).all()
    scores = tables.frame(tables.READING_SCORES, ci_config, ci_workflow / layout.READING_SCORES)
    draws = scores.filter(pl.col("condition") == RANDOM)["draw"].unique().sort().to_list()
    assert draws == list(range(ci_config["reading"]["steer"]["random_directions"]))
    closeness = tables.frame(tables.READING_CLOSENESS, ci_config, ci_workflow / layout.READING_CLOSENESS)
    assert closeness.filter(pl.col("variant") == "heldout_selected").height > 0
    steering = tables.frame(tables.READING_STEERING, ci_config, ci_workflow / layout.READING_STEERING)
    assert {READING, RANDOM} <= set(steering["condition"])  # and the reading features, where the SAEs find some
    assert steer_layers(ci_config)
    for name in ("reading", "reading_steering"):
        assert (ci_workflow / layout.figure(name, "svg")).stat().st_size > 1000
    # the organism reads the same family prompts, bit for bit
    assert (ci_workflow / layout.organism(layout.READING_PROMPTS)).read_bytes() == \
        (ci_workflow / layout.READING_PROMPTS).read_bytes()


# --- the reading features ----------------------------------------------------------------------------


def test_reading_features_are_shared_by_every_reading_family_not_one_familys_tokens():
    from bugscope.features.reading import select_reading_features

    family = np.array([DECIMAL] * 4 + ["versions"] * 4 + ["dates"] * 4)
    acts = np.zeros((12, 6))
    acts[4:, 1] = 2.0          # every reading family: the shared reading
    acts[8:, 2] = 9.0          # the dates' own tokens: large, but only one family
    acts[:4, 3] = 1.0          # a decimal feature
    acts[[0, 5], 4] = 0.5      # active somewhere: a candidate for the random sets
    chosen, randoms, score = select_reading_features(acts, family, top_n=2, random_sets=3, seed=0, layer=4)
    assert chosen == [1]  # feature 2 scores 0 on versions: its smallest margin is 0
    assert score[2] == 0.0 and score[1] == 2.0
    assert all(len(r) == 1 and r[0] in {2, 3, 4} for r in randoms)  # drawn from the active ones, chosen left out


def test_ablating_sae_features_removes_their_decoded_contribution():
    from sae_lens import StandardSAE, StandardSAEConfig

    from bugscope.model.steering import Steer, _writer

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    h = torch.randn(2 * 3, 1, 16)  # 2 replicas of a batch of 3, the decision column
    write = _writer([Steer(features={7: [1, 4]}), Steer()], 7, 16, sae)
    out = write(h.clone())
    f = sae.encode(h[:3])
    expected = h[:3] - (f[..., [1, 4]] @ sae.W_dec[[1, 4]])
    assert torch.allclose(out[:3], expected, atol=1e-5)
    assert torch.equal(out[3:], h[3:])  # the replica without features is left exactly as it was


def test_the_feature_summary_asks_whether_the_buggy_format_fires_them_more():
    from bugscope.features.reading import feature_summary

    meta = _meta(n_pairs=8)
    reading = meta.filter(pl.col("wording") != "analysis").with_columns(
        layer=pl.lit(4), activation=pl.when(pl.col("family") == DECIMAL).then(0.0).otherwise(3.0))
    analysis = meta.filter(pl.col("wording") == "analysis").with_columns(
        layer=pl.lit(4), question_id=pl.col("prompt_id") // 2,
        activation=pl.when(pl.col("format") == "qa").then(2.0).otherwise(0.5))
    out = feature_summary(reading, analysis, buggy_format="qa", correct_format="simple", test="wilcoxon", **BOOT)
    get = {(r["measure"], r["family"], r["format"], r["pair_kind"]): r for r in out.iter_rows(named=True)}
    assert get[("heldout_activation", "versions", ALL, BUG_PAIR_KIND)]["value"] == 3.0
    assert get[("heldout_activation", DECIMAL, ALL, BUG_PAIR_KIND)]["value"] == 0.0
    assert get[("heldout_activation", "versions", ALL, BUG_PAIR_KIND)]["n_pairs"] == 4  # the odd pair ids
    assert get[("buggy_minus_correct", DECIMAL, "qa-simple", BUG_PAIR_KIND)]["value"] == pytest.approx(1.5)
    assert get[("buggy_minus_correct", DECIMAL, "qa-simple", BUG_PAIR_KIND)]["p_value"] < 0.01
    assert get[("reading_over_decimal", ALL, ALL, BUG_PAIR_KIND)]["p_value"] < 0.01


def test_a_probe_that_calls_everything_a_version_is_at_chance_and_is_not_chosen():
    from bugscope.data.reading import balanced_accuracy_row

    is_decimal = np.array([True] * 8 + [False] * 24)
    row = balanced_accuracy_row(~is_decimal, is_decimal, np.arange(32) // 2, BOOT)  # right on readings only
    assert row["value"] == 0.5  # the pooled accuracy would be 0.75
    meta = _meta(n_pairs=12)
    reading = (meta["family"] != DECIMAL).to_numpy()
    qa = ((meta["format"] == "qa") & (meta["wording"] == "analysis")).to_numpy()
    frames = []
    for layer, says in ((3, np.ones(meta.height, bool)),      # everything a version; qa - simple gap 0
                        (5, reading | qa)):                   # right on the families; the buggy format read as one
        says = says.copy()
        if layer == 3:
            says[((meta["format"] == "simple") & (meta["wording"] == "analysis")).to_numpy()] = False  # gap 1
        frames.append(meta.with_columns(layer=pl.lit(layer, pl.Int32), position=pl.lit("numbers"),
                                        score=pl.Series(np.where(says, 1.0, -1.0)), read_as_version=pl.Series(says),
                                        trained_on=pl.lit(False)))
    summary = closeness_summary(pl.concat(frames), buggy_format="qa", correct_format="simple", min_accuracy=0.75, **BOOT)
    chosen = summary.filter(pl.col("variant") == "heldout_selected")
    assert set(chosen["layer"]) == {5}  # layer 3's larger gap is read by a probe at chance
    transfer = summary.filter(pl.col("variant") == "all_pairs", pl.col("layer") == 3,
                              pl.col("measure") == "transfer_accuracy", pl.col("family") == ALL).row(0, named=True)
    assert transfer["value"] == 0.5 and transfer["value_high"] < 0.75
