"""SAE-Lens's directory of pretrained SAEs, and the check of a `source: pretrained` set against it.

The workflow runs this check while it parses (workflow/rules/sae.smk), before any job: so this
module reads the directory file (`sae_lens/pretrained_saes.yaml`) itself instead of importing
SAE-Lens, whose package `__init__` imports torch and transformers (seconds on every `snakemake`
call). It reads the file as `sae_lens.loading.pretrained_saes_directory` does (tests/test_sae.py
checks that both agree on every release), and keeps only what the check needs; the loaders in
bugscope.sae go through SAE-Lens itself.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Sequence

import yaml

from bugscope.model.sites import hook_name


class SAEConfigError(ValueError):
    """The `sae:` config names an SAE that does not exist or does not fit the model or the cache."""


# Neuronpedia ids name the site: Llama Scope and Gemma Scope as "<layer>-<scope>-res-<width>"
# ("llama3.1-8b/10-llamascope-res-32k", "gemma-2-2b/3-gemmascope-res-16k"), andyrdt's dictionary-learning
# SAEs as "<layer>-resid-post-aa" ("llama3.1-8b-it/3-resid-post-aa").
_NEURONPEDIA_SITE = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out", "resid-post": "resid_post"}
_NEURONPEDIA_RE = re.compile(r"/(\d+)-(?:[a-z0-9]*-(res|mlp|att)|(resid-post))-")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # as SAE-Lens reads it
# A release: a top-level key, at the start of its line (SAE-Lens keeps the file in block style).
_RELEASE_RE = re.compile(r"^([^\s#-][^:\n]*):[ \t]*$", re.MULTILINE)


def directory_file() -> Path:
    """SAE-Lens's `pretrained_saes.yaml`, found without running the package (find_spec of a
    top-level package locates it and executes nothing)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'sae_lens'", name="sae_lens")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"


@cache
def _release_blocks() -> dict[str, str]:
    """{release: its text} of the directory, in its order. Parsing the whole file takes about a
    second (1.5 MB, 170 releases); a config names one or two releases, so each is parsed alone."""
    text = directory_file().read_text()
    starts = [(m.start(), m.group(1)) for m in _RELEASE_RE.finditer(text)]
    ends = [start for start, _ in starts[1:]] + [len(text)]
    return {name: text[start:end] for (start, name), end in zip(starts, ends)}


def pretrained_releases() -> list[str]:
    """The releases of SAE-Lens's directory, in its order."""
    return list(_release_blocks())


@cache
def release_saes(release: str) -> dict[str, str | None]:
    """{sae_id: neuronpedia id or None} of one release, in the directory's order (KeyError if unknown)."""
    doc = yaml.load(_release_blocks()[release], Loader=_LOADER)
    if not isinstance(doc, dict) or list(doc) != [release]:  # not the layout the split assumes: read it all
        doc = yaml.load(directory_file().read_text(), Loader=_LOADER)
    return {sae["id"]: sae.get("neuronpedia") for sae in doc[release]["saes"]}


def directory_hook_name(release: str, sae_id: str) -> str | None:
    """The hook name SAE-Lens's directory implies for one SAE, or None if it does not say.

    The directory has no hook-name field; it names the site through the sae id itself (e.g.
    `blocks.8.hook_resid_pre` in GPT-2 releases) or through the neuronpedia id (Llama Scope:
    `llama3.1-8b/10-llamascope-res-32k`; Gemma Scope: `gemma-2-2b/3-gemmascope-res-16k`; andyrdt:
    `llama3.1-8b-it/3-resid-post-aa`). Qwen Scope's entries have neither (ids `layer3`): None. The
    loaded SAE's `hook_name` is checked again after loading (bugscope.sae.check_sae_fits).
    """
    if re.fullmatch(r"blocks\.\d+\.hook_\w+", sae_id):
        return sae_id
    m = _NEURONPEDIA_RE.search(release_saes(release).get(sae_id) or "")
    if m:
        return hook_name(int(m.group(1)), _NEURONPEDIA_SITE[m.group(2) or m.group(3)])
    return None


def resolve_pretrained(release: str | None, sae_id_template: str | None, layers: Sequence[int],
                       site: str) -> dict[int, str]:
    """{layer: sae_id} for `source: pretrained`, checked against SAE-Lens's directory before any download.

    Raises SAEConfigError naming the valid releases or ids when one is unknown, and when the
    directory says an SAE reads another hook than the site the set reads (`sae.sets[].site`).
    """
    directory = pretrained_releases()
    if not release or release not in directory:
        close = difflib.get_close_matches(str(release), directory, n=8, cutoff=0.5)
        scope = sorted(r for r in directory if r.startswith("llama_scope"))
        raise SAEConfigError(
            f"sae.release {release!r} is not in SAE-Lens's directory of pretrained SAEs "
            f"(sae_lens/pretrained_saes.yaml, {len(directory)} releases). "
            f"Closest: {', '.join(close) or 'none'}. Llama Scope releases: {', '.join(scope)}. "
            "Fix sae.release in the config (or use sae.source: train)."
        )
    if not sae_id_template or "{layer}" not in sae_id_template:
        raise SAEConfigError(
            f"sae.sae_id must be a template containing {{layer}}, e.g. 'l{{layer}}r_8x'; found {sae_id_template!r}."
        )
    valid = list(release_saes(release))
    ids, wrong_site = {}, []
    for layer in layers:
        sae_id = sae_id_template.replace("{layer}", str(layer))
        if sae_id not in valid:
            shown = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
            raise SAEConfigError(
                f"sae.sae_id {sae_id_template!r} gives {sae_id!r} for layer {layer}, which release "
                f"{release!r} does not have. Its {len(valid)} ids are: {shown}. Fix sae.sae_id, or "
                "leave that layer out of 'layers'."
            )
        expected = hook_name(layer, site)
        found = directory_hook_name(release, sae_id)
        if found is not None and found != expected:
            wrong_site.append(f"{sae_id} reads {found}")
        ids[layer] = sae_id
    if wrong_site:
        raise SAEConfigError(
            f"The SAEs of release {release!r} do not read the set's site {site!r} "
            f"({'; '.join(wrong_site[:4])}). The activations must be cached at the SAE's own hook: set "
            "the set's site to the SAE's site (sae.sets[].site), or pick the release for that site (R = resid_post, "
            "M = mlp_out, A = attn_out in Llama Scope)."
        )
    return ids
