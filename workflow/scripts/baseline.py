import polars as pl

from bugscope import tables
from bugscope.data.baseline import accuracy_by_format, format_contrast, greedy_check, scores_frame
from bugscope.data.lens import lens_rows, lens_summary
from bugscope.model.capture import decision_lens
from bugscope.model.load import ModelManifest, load_model
from bugscope.run.script import log, run


def main(smk):
    cfg = smk.config
    manifest = ModelManifest.load(smk.input.manifest)
    prompts = tables.frame(tables.PROMPTS, smk.config, smk.input.prompts)
    model, tokenizer = load_model(manifest, cfg["device"])
    rows = prompts.to_dicts()
    # one forward per batch scores every prompt and reads the lens at every layer
    lens = decision_lens(model, rows, batch_size=cfg["cache"]["batch_size"], pad_token_id=tokenizer.pad_token_id)
    scores = scores_frame(lens.prompt_ids, lens.logit_diff)
    scores = prompts.select("prompt_id", "question_id", "pair_id", "pair_kind", "order", "format").join(scores, on="prompt_id")
    boot = cfg["bootstrap"]
    accuracy = accuracy_by_format(scores, n_resamples=boot["n_resamples"], confidence=boot["confidence"], seed=cfg["seed"])
    contrast = format_contrast(scores, buggy_format=cfg["prompts"]["buggy_format"],
                               correct_format=cfg["prompts"]["correct_format"], n_resamples=boot["n_resamples"],
                               confidence=boot["confidence"], seed=cfg["seed"])

    lens_prompts = lens_rows(lens, prompts)
    lens_table = lens_summary(lens_prompts, buggy_format=cfg["prompts"]["buggy_format"],
                        correct_format=cfg["prompts"]["correct_format"], n_resamples=boot["n_resamples"],
                        confidence=boot["confidence"], seed=cfg["seed"])

    # Greedy generation on the first prompts of each format, as a second opinion on the logit metric.
    n = cfg["baseline"]["generation_sample"]
    generated = []
    for fmt_name, fmt in cfg["prompts"]["formats"].items():
        sample = prompts.filter(pl.col("format") == fmt_name).head(n).to_dicts()
        if sample:
            generated.append(greedy_check(model, tokenizer, sample, max_new_tokens=cfg["baseline"]["max_new_tokens"],
                                          batch_size=cfg["cache"]["batch_size"],
                                          add_special_tokens=not fmt["chat_template"]))
    generation = pl.concat(generated).join(scores.select("prompt_id", "format", "is_correct"), on="prompt_id")
    parsed = generation.filter(pl.col("generated_answer") != "other")
    agreement = (parsed["generated_answer"] == "correct").eq(parsed["is_correct"]).mean() if parsed.height else None
    log.info("greedy check: %d of %d parsed, agreement with the logit metric %s",
             parsed.height, generation.height, agreement)

    meta = {"config_hash": smk.params.config_hash, "seed": cfg["seed"], **manifest.provenance()}
    with tables.written_together() as put:
        put(tables.BASELINE_SCORES, scores, smk.output.scores, meta)
        put(tables.BASELINE_ACCURACY, accuracy, smk.output.accuracy, meta)
        put(tables.BASELINE_CONTRAST, contrast, smk.output.contrast, meta)
        put(tables.LENS_PROMPTS, lens_prompts, smk.output.lens_prompts, meta)
        put(tables.LENS, lens_table, smk.output.lens, meta)
        put(tables.BASELINE_GENERATION, generation, smk.output.generation,
            {"n_parsed": parsed.height, "agreement": agreement, **meta})
    log.info("accuracy by format:\n%s\nformat contrast:\n%s", accuracy, contrast)


run(snakemake, main)  # noqa: F821
