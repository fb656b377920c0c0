"""A run-time check of the model boundary: while installed, a torch hook registered, a `generate`
or a call of a transformers model (`model(...)`) made directly by bugscope code outside
`bugscope.model` raises `BoundaryViolation` and is recorded.

Installed for every test (tests/conftest.py) and, with BUGSCOPE_BOUNDARY_GUARD=1, in every model job
of a workflow run (bugscope.run.script; the tests' ci runs set it), so the jobs Snakemake starts are
checked too.

Cheap: the wrappers read one frame, the direct caller's, and only on hook registration, `generate`
and model calls (PreTrainedModel.__call__, not every submodule). A direct caller outside
src/bugscope (a test's own hook, transformers calling its inner model, SAE-Lens) is allowed, so a
bugscope module that reaches the model through another library is not seen here; submodule calls
(`block(x)`) are the AST rule's (tests/test_architecture.py).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1]) + "/"
MODEL = SRC + "model/"


ENV = "BUGSCOPE_BOUNDARY_GUARD"  # set to 1: bugscope.run.script installs the guard in model jobs


class BoundaryViolation(AssertionError):
    pass


def bugscope_caller() -> str | None:
    """The file of the frame that called the guarded function when it is inside src/bugscope, else None."""
    name = sys._getframe(2).f_code.co_filename
    return name if name.startswith(SRC) else None


class Guard:
    def __init__(self):
        self.violations: list[str] = []
        self._undo: list = []

    def _wrap(self, owner, attr: str, what: str) -> None:
        original = owner.__dict__.get(attr)
        inherited = getattr(owner, attr)

        @functools.wraps(inherited)
        def guarded(*args, **kwargs):
            caller = bugscope_caller()
            if caller is not None and not caller.startswith(MODEL):
                message = f"{what} from {caller[len(SRC):]}: only bugscope.model may"
                self.violations.append(message)
                raise BoundaryViolation(message)
            return inherited(*args, **kwargs)

        setattr(owner, attr, guarded)
        self._undo.append((owner, attr, original))

    def install(self) -> "Guard":
        import torch
        from transformers import PreTrainedModel
        from transformers.generation.utils import GenerationMixin

        module = torch.nn.Module
        for attr in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                     "register_full_backward_pre_hook", "register_backward_hook"):
            self._wrap(module, attr, f"Module.{attr}")
        for attr in ("register_module_forward_hook", "register_module_forward_pre_hook",
                     "register_module_full_backward_hook"):
            self._wrap(torch.nn.modules.module, attr, attr)
        self._wrap(torch.Tensor, "register_hook", "Tensor.register_hook")
        self._wrap(GenerationMixin, "generate", "generate")
        self._wrap(PreTrainedModel, "__call__", "a forward pass of the model")
        return self

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self._undo):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._undo.clear()
