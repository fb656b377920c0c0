"""Per-job device statistics, off unless asked for: wall time, peak GPU memory, matmul FLOPs.

`BUGSCOPE_JOB_STATS=<file>` makes every workflow script (`bugscope.run.script.run`) append one JSON line
to <file> when its job ends: the rule, its wall seconds, `torch.cuda.max_memory_allocated()` (when
CUDA was used) and the FLOPs counted by `MatmulFlops`. bench/gpu_check.sh and bench/job_table.py
read them.

FLOPs are counted by `bugscope.model.flops.MatmulFlops` (a global module forward hook, so no model
code changes); its docstring says what is counted. The time is the whole job's (process start-up
and model loading included), so FLOPs / time is a lower bound of the achieved rate.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Iterator

from bugscope.model.flops import MatmulFlops

STATS_ENV = "BUGSCOPE_JOB_STATS"


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
