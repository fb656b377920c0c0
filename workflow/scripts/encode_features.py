import contextlib

import pyarrow.parquet as pq

from bugscope.cache import ACTIVATIONS_KIND
from bugscope.config import stage_hash
from bugscope.io import atomic_path, check_metadata, encode_metadata, read_metadata
from bugscope.model import pick_device
from bugscope.prompts import SINK_POSITION
from bugscope.sae import (
    FEATURES_KIND,
    check_sae_fits,
    encode_activation_file,
    load_sae,
    sae_provenance_meta,
)
from bugscope.script import log, run
from bugscope.sites import hook_name


def main(smk):
    cfg = smk.config
    device = str(pick_device(cfg["device"]))
    with contextlib.ExitStack() as stack:  # all outputs of the group are renamed into place together
        for layer, sae_dir, acts_path, out in zip(smk.params.layers, smk.input.saes, smk.input.activations,
                                                 smk.output.features):
            hook = hook_name(layer, cfg["cache"]["site"])
            sae, provenance = load_sae(sae_dir, device=device)
            acts_meta = read_metadata(acts_path)
            check_sae_fits(sae, expected_hook=hook, d_model=acts_meta["d_model"], where=str(sae_dir))
            check_metadata(acts_path, acts_meta, kind=ACTIVATIONS_KIND, config_hash=stage_hash(cfg, "activations"))
            table = encode_activation_file(sae, acts_path, batch_size=cfg["sae"]["encode_batch_size"])
            meta = {"kind": FEATURES_KIND, "config_hash": smk.params.config_hash, "layer": layer, "hook_name": hook,
                    "d_sae": sae.cfg.d_sae, "sae_dir": str(sae_dir), "positions": acts_meta.get("positions"),
                    "n_rows_encoded": int(pq.ParquetFile(acts_path).metadata.num_rows),
                    "attention_sink_position": SINK_POSITION, **sae_provenance_meta(provenance),
                    **{k: acts_meta.get(k) for k in ("model", "model_path", "revision")}}
            tmp = stack.enter_context(atomic_path(out))
            pq.write_table(table.replace_schema_metadata(encode_metadata(meta)), tmp, compression="zstd")
            log.info("layer %d: %d non-zero features over %d (prompt, position) rows", layer, table.num_rows,
                     meta["n_rows_encoded"])


run(snakemake, main)  # noqa: F821
