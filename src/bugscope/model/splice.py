"""A clean pass of one batch, then passes with one layer's site output replaced (an SAE spliced
in), each starting from the clean residual so that no layer before the splice is recomputed."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from bugscope.model.forward import Batch, LayerRunner
from bugscope.model.sites import site_writer_hook


@torch.inference_mode()
def site_replaced_logit_diffs(runner: LayerRunner, batch: Batch, site: str,
                              replacements: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]
                              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(clean [b], {layer: [b]}): decision logit differences of the unchanged batch and with the
    output of `site` at each layer of `replacements` replaced by `replacements[layer](output)`.

    One clean pass gives the residual entering and leaving each replaced layer; each replaced pass
    starts there (after the layer for resid_post, whose output is the layer's own; entering it, with
    a forward hook on the site's module, for a site inside the layer).
    """
    splice_output = site == "resid_post"  # the decoder layer's own output (bugscope.model.sites.site_module)
    hidden, ctx = runner.begin(batch)
    resume = {}  # layer -> the clean residual a replaced pass starts from: leaving the layer, or entering it
    for i in range(runner.n_layers):
        if i in replacements and not splice_output:
            resume[i] = hidden
        hidden = runner.layer(i, hidden, ctx)
        if i in replacements and splice_output:
            resume[i] = hidden
    clean = runner.decision_logit_diff(hidden[:, -1], batch)

    replaced = {}
    for layer, splice in replacements.items():
        if splice_output:  # the layer's output is the clean run's: replace it, run the rest
            last = runner.run(layer + 1, splice(resume[layer]), ctx)[:, -1]
        else:  # the site is inside the layer: run the layer with the replacement in it
            handle = site_writer_hook(runner.model, layer, site, splice)
            try:
                last = runner.run(layer, resume[layer], ctx)[:, -1]
            finally:
                handle.remove()
        replaced[layer] = runner.decision_logit_diff(last, batch)
    return clean, replaced
