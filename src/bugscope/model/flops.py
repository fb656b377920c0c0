"""Matmul FLOPs of a job, counted by a global module forward hook (so no model code changes):
- every `torch.nn.Linear` call: 2 * rows * in_features * out_features (the q/k/v/o projections, the
  MLP and lm_head: nearly all of a transformer's arithmetic at short sequence lengths);
- every SAE-Lens SAE encode and decode (dense matmuls with its parameters, not Linear modules):
  2 * rows * d_in * d_sae each, seen at its hook points `hook_sae_acts_pre` and `hook_sae_recons`.
Attention scores, bugscope's own TopK encode shortcut and the patching engine's two-row logit
readout are not counted, so FLOPs / time is a lower bound of the achieved rate.
"""

from __future__ import annotations


class MatmulFlops:
    """Counts the FLOPs of nn.Linear calls and SAE-Lens SAE encodes/decodes while active."""

    def __init__(self):
        self.flops = 0
        self._handle = None
        self._sae_in = 0  # d_in of the SAE input seen last (hook_sae_input comes first in every encode)
        self._sae_width = 0  # d_sae of the latents seen last (a decode follows the encode that made them)

    def _hook(self, module, inputs, output):
        if isinstance(module, self._linear):
            if inputs:
                rows = inputs[0].numel() // module.in_features
                self.flops += 2 * rows * module.in_features * module.out_features
            return
        name = getattr(module, "name", None)  # SAE-Lens HookPoints carry their name
        if name is None or not isinstance(output, self._tensor):
            return
        if name == "hook_sae_input":
            self._sae_in = output.shape[-1]
        elif name == "hook_sae_acts_pre":  # output [rows, d_sae] = input [rows, d_in] @ W_enc
            self._sae_width = output.shape[-1]
            self.flops += 2 * output.numel() * self._sae_in
        elif name == "hook_sae_recons":  # output [rows, d_in] = latents [rows, d_sae] @ W_dec
            self.flops += 2 * output.numel() * self._sae_width

    def __enter__(self) -> "MatmulFlops":
        import torch

        self._linear, self._tensor = torch.nn.Linear, torch.Tensor  # read on every module call: no import there
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
