"""The package's layers and its one model boundary, checked on the source (ast) and, for hooks and
generation, at run time (bugscope/run/boundary.py, installed by conftest.py for every test).

Rules:
1. Imports go one way, down `LAYERS`; `features` and `patching` (one layer) never import each other;
   `figures` and `claims` import the foundation and `data` only (constants and tables, no engine).
2. Only `bugscope.model` registers torch hooks, calls `.generate(` or runs the model or one of its
   modules.
3. No module imports another module's private (`_name`) names.
Each scanner is also run on planted violations, so a scanner that sees nothing cannot pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bugscope"
FOUNDATION = ("config", "layout", "tables", "io", "stats", "focus")
# Lowest first; a module may import its own layer and the layers below it. `bugscope` itself (the
# package's __init__) counts as the foundation.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset(FOUNDATION),
    frozenset({"model"}),
    frozenset({"data"}),
    frozenset({"sae"}),
    frozenset({"features", "patching"}),
    frozenset({"interventions"}),
    frozenset({"organism"}),
    frozenset({"figures", "claims"}),
    frozenset({"run"}),
)
# Same layer, but no imports between them.
SEPARATE = ({"features", "patching"}, {"figures", "claims"})
# The presentation layers read tables: they may import only these (no model, SAE or patching engine).
PRESENTATION = {"figures": set(FOUNDATION) | {"data", "figures"}, "claims": set(FOUNDATION) | {"data", "claims"}}
BOUNDARY = "model"

HOOK_CALLS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
              "register_full_backward_pre_hook", "register_backward_hook", "register_hook",
              "register_module_forward_hook", "register_module_forward_pre_hook",
              "register_module_full_backward_hook", "register_module_full_backward_pre_hook"}
# bugscope.model.sites functions that return a module of the model (calling what they return runs it).
MODULE_GETTERS = {"site_module", "decoder_layers", "final_norm", "unembedding", "inner_model", "head_input_module"}
# Names that hold the model by the package's convention (`model(...)`, `self.model(...)`).
MODEL_NAMES = {"model", "lm", "inner", "block", "layer_module"}


def layer_of(top: str) -> int:
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"bugscope.{top} is in no layer of LAYERS: add it")


def top_of(module: str) -> str:
    """'bugscope.patching.engine' -> 'patching'; 'bugscope' -> 'config' (the foundation)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FOUNDATION[0]


def imported_modules(source: str, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported bugscope module, names) of every import, top-level and inside functions.
    `from bugscope import tables` is bugscope.tables; relative imports are resolved against `module`."""
    out = []
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "bugscope"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level] + ([base] if base else []))
            if base.split(".")[0] != "bugscope":
                continue
            names = [a.name for a in node.names]
            if base == "bugscope":  # from bugscope import tables, layout: each is a module
                out += [(node.lineno, f"bugscope.{n}", []) for n in names]
            else:
                out.append((node.lineno, base, names))
    return out


def import_violations(source: str, module: str) -> list[str]:
    """Upward imports, imports between separate packages of one layer, engines in figures/claims."""
    here = top_of(module)
    found = []
    for line, target, _ in imported_modules(source, module):
        there = top_of(target)
        if there == here:
            continue
        if layer_of(there) > layer_of(here):
            found.append(f"line {line}: {module} imports {target}, a higher layer")
        elif any({here, there} <= pair for pair in SEPARATE):
            found.append(f"line {line}: {module} imports {target}; {here} and {there} stay apart")
        elif here in PRESENTATION and there not in PRESENTATION[here]:
            found.append(f"line {line}: {module} imports {target}; {here} reads tables, it imports no engine")
    return found


def private_imports(source: str, module: str) -> list[str]:
    """`from bugscope.x import _name` where bugscope.x is not `module` itself."""
    return [f"line {line}: {module} imports {target}.{n}"
            for line, target, names in imported_modules(source, module) if target != module
            for n in names if n.startswith("_") and not n.startswith("__")]


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def model_calls(source: str) -> list[str]:
    """Hook registrations, `.generate(` calls and forward calls of the model or its modules.

    Calls only: an attribute named `generate` or `register_forward_hook` that is not called, or a
    name in a docstring, is not flagged. Forward calls are found by their shape, not by type:
    - `model(...)`, `self.model(...)` and the other names of MODEL_NAMES called directly;
    - a call of a call of a bugscope.model.sites module getter (`site_module(m, l, s)(x)`,
      `decoder_layers(m)[i](x)`, `final_norm(m)(h)`);
    - a call of a name bound from such a getter in the same function (`block = decoder_layers(m)[i];
      block(x)`, `head = unembedding(m); head(h)`).
    Not seen: a module passed in under another name and called, a module reached through an
    attribute chain (`m.model.layers[0](x)`: test_structure's internals rule forbids those outside
    model/), `getattr`, or a callback that calls the model. The runtime guard (bugscope/run/boundary.py)
    covers hooks, generate and top-level model calls whatever the name.
    """
    found = []
    tree = ast.parse(source)

    def from_getter(node: ast.expr) -> bool:
        while isinstance(node, ast.Subscript):
            node = node.value
        return isinstance(node, ast.Call) and _called_name(node.func) in MODULE_GETTERS

    for scope in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]:
        bound = {t.id for n in ast.walk(scope) if isinstance(n, ast.Assign) and from_getter(n.value)
                 for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call):
                continue
            name = _called_name(node.func)
            where = f"line {node.lineno}"
            if name in HOOK_CALLS:
                found.append(f"{where}: .{name}( registers a hook")
            elif name == "generate" and isinstance(node.func, ast.Attribute):
                found.append(f"{where}: .generate( runs the model")
            elif from_getter(node.func):
                found.append(f"{where}: calls a module from bugscope.model.sites")
            elif isinstance(node.func, ast.Name) and node.func.id in bound:
                found.append(f"{where}: {node.func.id}( runs a module from bugscope.model.sites")
            elif name in MODEL_NAMES:
                found.append(f"{where}: {name}( runs the model")
    return sorted(set(found), key=lambda s: int(s.split(":")[0].split()[1]))


def package_modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"), p)
            for p in sorted(PACKAGE.rglob("*.py"))]


MODULES = package_modules()
IDS = [m for m, _ in MODULES]


def test_every_subpackage_has_a_layer():
    tops = {top_of(m) for m, _ in MODULES if m != "bugscope"}
    for top in tops:
        layer_of(top)
    assert tops == set().union(*LAYERS), "LAYERS names a package that does not exist"


@pytest.mark.parametrize("module,path", MODULES, ids=IDS)
def test_imports_go_down_the_layers(module, path):
    bad = import_violations(path.read_text(), module)
    assert not bad, "\n".join(bad) + f"\nlayers, lowest first: {[sorted(layer) for layer in LAYERS]}"


@pytest.mark.parametrize("module,path", MODULES, ids=IDS)
def test_no_private_names_cross_modules(module, path):
    bad = private_imports(path.read_text(), module)
    assert not bad, "\n".join(bad) + "\nmake the name public (it is part of the module's interface) or keep it home"


@pytest.mark.parametrize("module,path", [(m, p) for m, p in MODULES if top_of(m) != BOUNDARY],
                         ids=[m for m in IDS if top_of(m) != BOUNDARY])
def test_only_the_model_package_runs_the_model(module, path):
    bad = model_calls(path.read_text())
    assert not bad, "\n".join(bad) + f"\n{module}: hooks, generation and forward passes live in bugscope.model"


# --- the scanners see planted violations ----------------------------------------------------------


def test_an_upward_import_is_flagged_top_level_and_inside_a_function():
    src = "from bugscope.patching.engine import HeadPatcher\n"
    assert import_violations(src, "bugscope.model.forward") == [
        "line 1: bugscope.model.forward imports bugscope.patching.engine, a higher layer"]
    src = "def f():\n    import bugscope.interventions.sae_features as s\n    return s\n"
    assert len(import_violations(src, "bugscope.sae.quality")) == 1
    assert len(import_violations("from bugscope import run\n", "bugscope.data.prompts")) == 1
    assert len(import_violations("from ..run import script\n", "bugscope.model.load")) == 1
    assert import_violations("from bugscope.model.forward import Batch\n", "bugscope.sae.quality") == []


def test_features_and_patching_stay_apart_and_figures_import_no_engine():
    assert len(import_violations("from bugscope.features.named import x\n", "bugscope.patching.study")) == 1
    assert len(import_violations("from bugscope.patching.pairs import x\n", "bugscope.features.values")) == 1
    assert len(import_violations("from bugscope.interventions.sae_features import CONTROLS\n",
                                 "bugscope.figures.interventions")) == 1
    assert len(import_violations("from bugscope.model.sites import hook_name\n", "bugscope.claims.evaluate")) == 1
    assert import_violations("from bugscope.data.prompts import ALL\nfrom bugscope import tables\n",
                             "bugscope.figures.charts") == []


def test_a_private_import_is_flagged():
    assert private_imports("from bugscope.stats import _interval, mean\n", "bugscope.data.baseline") == [
        "line 1: bugscope.data.baseline imports bugscope.stats._interval"]
    assert private_imports("from bugscope.stats import _interval\n", "bugscope.stats") == []


def test_hooks_generation_and_forward_calls_are_flagged():
    planted = (
        "def chart(model, m, x):\n"  # a hook in a figures module, and the rest
        "    h = site_module(m, 1, 'attn_out').register_forward_hook(lambda *a: None)\n"
        "    model.generate(input_ids=x)\n"
        "    self.model(x)\n"
        "    site_module(m, 1, 'mlp_out')(x)\n"
        "    block = decoder_layers(m)[3]\n"
        "    block(x)\n"
        "    decoder_layers(m)[2](x)\n"
        "    torch.nn.modules.module.register_module_forward_hook(h)\n"
    )
    assert model_calls(planted) == [
        "line 2: .register_forward_hook( registers a hook",
        "line 3: .generate( runs the model",
        "line 4: model( runs the model",
        "line 5: calls a module from bugscope.model.sites",
        "line 7: block( runs a module from bugscope.model.sites",
        "line 8: calls a module from bugscope.model.sites",
        "line 9: .register_module_forward_hook( registers a hook",
    ]


def test_prose_and_plain_reads_are_not_flagged():
    src = ('"""model.generate( with register_forward_hook"""\n'
           "# model(x)\n"
           "def f(model, sae, x):\n"
           "    w = head_input_module(model, 0).weight\n"
           "    g = model.generate\n"
           "    return sae.encode(x), w, g, model.config\n")
    assert model_calls(src) == []


def test_the_runtime_guard_stops_a_hook_registered_outside_the_model_package(model_boundary_guard):
    import torch

    from bugscope.run.boundary import SRC, BoundaryViolation

    planted = "def plant(m):\n    return m.register_forward_hook(lambda *a: None)\n"
    linear = torch.nn.Linear(2, 2)
    scope: dict = {}
    exec(compile(planted, SRC + "figures/planted.py", "exec"), scope)
    seen = len(model_boundary_guard.violations)
    with pytest.raises(BoundaryViolation, match="figures/planted.py"):
        scope["plant"](linear)
    del model_boundary_guard.violations[seen:]  # planted: not a violation of this test
    exec(compile(planted, SRC + "model/planted.py", "exec"), scope)
    scope["plant"](linear).remove()  # bugscope.model may
    linear.register_forward_hook(lambda *a: None).remove()  # so may a test


def test_a_workflow_job_runs_under_the_guard_when_asked(model_boundary_guard, monkeypatch):
    """BUGSCOPE_BOUNDARY_GUARD=1 (set by the tests' Snakemake runs): a model job's script that
    registers a hook from outside bugscope.model fails, with the offending file named; unset, it runs."""
    from types import SimpleNamespace

    import torch

    from bugscope.run.boundary import ENV, SRC, BoundaryViolation
    from bugscope.run.script import run

    planted = "def plant(m):\n    return m.register_forward_hook(lambda *a: None).remove()\n"
    scope: dict = {}
    exec(compile(planted, SRC + "figures/planted.py", "exec"), scope)
    job = SimpleNamespace(log=[], threads=1, config={}, rule="planted",
                          input=SimpleNamespace())
    model_boundary_guard.uninstall()  # the test session's guard would stop the hook itself
    try:
        unguarded = torch.nn.Module.register_forward_hook
        run(job, lambda smk: scope["plant"](torch.nn.Linear(2, 2)))  # no guard asked for: runs
        monkeypatch.setenv(ENV, "1")
        with pytest.raises(BoundaryViolation, match="figures/planted.py"):
            run(job, lambda smk: scope["plant"](torch.nn.Linear(2, 2)))
        assert torch.nn.Module.register_forward_hook is unguarded  # the job's guard is gone again
    finally:
        model_boundary_guard.install()
