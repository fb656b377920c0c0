
import pyarrow.parquet as pq

from bugscope import tables
from bugscope.config import with_sae_set
from bugscope.data.prompts import SINK_POSITION
from bugscope.io import read_metadata
from bugscope.model.load import pick_device
from bugscope.model.sites import hook_name
from bugscope.run.script import log, run
from bugscope.sae.encode import encode_activation_file
from bugscope.sae.store import check_sae_fits, load_sae, sae_provenance_meta


def main(smk):
    cfg = with_sae_set(smk.config, smk.params.sae_set)
    device = str(pick_device(cfg["device"]))
    with tables.written_together() as put:
        for layer, sae_dir, acts_path, out in zip(smk.params.layers, smk.input.saes, smk.input.activations,
                                                 smk.output.features):
            hook = hook_name(layer, cfg["sae_set"]["site"])
            sae, provenance = load_sae(sae_dir, device=device)
            # A wrong SAE for the cached site is the likelier mistake: say so before a stale hash.
            check_sae_fits(sae, expected_hook=hook, d_model=read_metadata(acts_path)["d_model"], where=str(sae_dir))
            acts_meta = tables.check(tables.PROMPT_ACTIVATIONS, cfg, acts_path)
            table = encode_activation_file(sae, acts_path, batch_size=cfg["sae"]["encode_batch_size"])
            meta = {"config_hash": smk.params.config_hash, "sae_set": cfg["sae_set"]["name"], "layer": layer,
                    "hook_name": hook,
                    "d_sae": sae.cfg.d_sae, "sae_dir": str(sae_dir), "positions": acts_meta.get("positions"),
                    "n_rows_encoded": int(pq.ParquetFile(acts_path).metadata.num_rows),
                    "attention_sink_position": SINK_POSITION, **sae_provenance_meta(provenance),
                    **{k: acts_meta.get(k) for k in ("model", "model_path", "revision")}}
            put(tables.FEATURES, table, out, meta)
            log.info("layer %d: %d non-zero features over %d (prompt, position) rows", layer, table.num_rows,
                     meta["n_rows_encoded"])


run(snakemake, main)  # noqa: F821
