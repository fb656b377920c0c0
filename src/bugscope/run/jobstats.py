"""Per-job device statistics, off unless asked for: wall time, peak GPU memory, matmul FLOPs.

`BUGSCOPE_JOB_STATS=<file>` makes every workflow script (`bugscope.run.script.run`) append one JSON line
to <file> when its job ends: the rule, its wall seconds, `torch.cuda.max_memory_allocated()` (when
CUDA was used) and the FLOPs counted by `MatmulFlops`. bench/gpu_check.sh and bench/job_table.py
read them.

FLOPs counted (a global module forward hook, so no model code changes):
- every `torch.nn.Linear` call: 2 * rows * in_features * out_features (the q/k/v/o projections, the
  MLP and lm_head: nearly all of a transformer's arithmetic at short sequence lengths);
- every SAE-Lens SAE encode and decode (dense matmuls with its parameters, not Linear modules):
  2 * rows * d_in * d_sae each, seen at its hook points `hook_sae_acts_pre` and `hook_sae_recons`.
Attention scores, bugscope's own TopK encode shortcut and the patching engine's two-row logit
readout are not counted, so FLOPs / time is a lower bound of the achieved rate; and the time is
the whole job's (process start-up and model loading included).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Iterator

STATS_ENV = "BUGSCOPE_JOB_STATS"


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


def peak_gpu_bytes() -> int | None:
    """torch.cuda.max_memory_allocated() summed over devices, or None when CUDA was never used."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


@contextlib.contextmanager
def job_stats(rule: str) -> Iterator[None]:
    """Append the job's statistics to $BUGSCOPE_JOB_STATS at exit (also when it fails); no-op when unset."""
    path = os.environ.get(STATS_ENV)
    if not path:
        yield
        return
    import torch  # here, not at the top: the light jobs never load it (bugscope.run.script)

    t0 = time.perf_counter()
    ok = False
    with MatmulFlops() as counter:
        try:
            yield
            ok = True
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            record = {"rule": rule, "ok": ok, "seconds": round(seconds, 3), "peak_gpu_bytes": peak_gpu_bytes(),
                      "flops": counter.flops,
                      "tflops_per_s": round(counter.flops / seconds / 1e12, 4) if seconds > 0 else None}
            with open(path, "a") as fh:  # one short line per job: appends from concurrent jobs do not interleave
                fh.write(json.dumps(record) + "\n")
