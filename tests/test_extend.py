"""The public pass-author API (issue 9, item 17): ``maas_jax.extend``, the guide, the layout.

* ``passes/`` imports only public names (never a private ``maas_jax._*`` module);
* every name of ``maas_jax.extend.__all__`` exists and is documented;
* the "Write your own pass" guide in ``maas_jax/README.md`` runs, and is the same example as
  the ``maas_jax.extend`` doctest;
* the runtime helpers moved out of ``passes/`` stay importable where they were;
* ``_regions`` and ``_interpreter`` import in one direction only.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import maas_jax
from maas_jax import extend

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASSES = ROOT / "passes"
CORE = ROOT / "maas_jax"


def _pass_files() -> list[pathlib.Path]:
    files = sorted(PASSES.rglob("*.py"))
    assert len(files) > 10, files  # the scan found the library
    return files


# ---- passes/ uses only the public API ------------------------------------------------------


@pytest.mark.parametrize("path", _pass_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_passes_import_only_public_names(path):
    text = path.read_text()
    assert "from maas_jax._" not in text
    assert "import maas_jax._" not in text
    # also `from maas_jax import _compat` and private names of public modules
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("maas_jax"):
            module = node.module or ""
            assert not any(part.startswith("_") for part in module.split(".")[1:2]), (
                f"{path.name}:{node.lineno} imports from {module}"
            )
            if not module.startswith("maas_jax.passes"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports {private} from {module}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert not (node.value.id == "maas_jax" and node.attr.startswith("_")), (
                f"{path.name}:{node.lineno} uses maas_jax.{node.attr}"
            )


# ---- maas_jax.extend ------------------------------------------------------------------------


def _documented_in_module(name: str) -> bool:
    return re.search(rf"``{re.escape(name)}``|`{re.escape(name)}`", extend.__doc__) is not None


@pytest.mark.parametrize("name", extend.__all__)
def test_extend_names_exist_and_are_documented(name):
    obj = getattr(extend, name)
    if inspect.isclass(obj):
        assert obj.__dict__.get("__doc__"), f"class {name} has no docstring of its own"
    elif inspect.isfunction(obj):
        assert obj.__doc__ and obj.__doc__.strip(), f"function {name} has no docstring"
        assert obj.__module__.startswith("maas_jax."), obj.__module__
    else:  # constants and type aliases: the module docstring says what they are
        assert _documented_in_module(name), f"{name} is not described in extend's docstring"
    assert name in extend.__doc__, f"{name} is not listed in extend's docstring"


def test_extend_all_is_exact():
    public = {n for n in vars(extend) if not n.startswith("_")}
    assert sorted(extend.__all__) == sorted(set(extend.__all__)), "duplicates in __all__"
    assert public == set(extend.__all__), public ^ set(extend.__all__)


def test_extend_reexports_the_facade_objects():
    for name in ("Rewrite", "rewrite", "apply_marked", "Site", "Tag", "Use", "consumers",
                 "contraction_sites", "ParamInfo", "param_infos", "predicate", "select", "Op",
                 "Path", "Program", "PassRecord", "MaasError"):  # fmt: skip
        assert getattr(extend, name) is getattr(maas_jax, name), name
    assert maas_jax.extend is extend  # lazily reachable from the facade


def test_extend_doctests():
    result = doctest.testmod(extend, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10 and result.failed == 0, result


# ---- the guide ------------------------------------------------------------------------------


def _guide_code() -> str:
    text = (CORE / "README.md").read_text()
    assert "## Write your own pass" in text
    section = text.split("## Write your own pass", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the guide has one runnable example"
    return blocks[0]


def test_guide_example_runs():
    namespace: dict = {"__name__": "guide"}
    exec(
        compile(_guide_code(), "maas_jax/README.md#write-your-own-pass", "exec", dont_inherit=True),
        namespace,
    )
    pass_ = namespace["round_weights"](decimals=2)
    assert repr(pass_) == "RoundWeights(decimals=2, where=None)"
    assert hash(pass_) == hash(namespace["round_weights"](decimals=2))


def test_guide_pass_returns_input_when_nothing_matches():
    namespace: dict = {"__name__": "guide"}
    exec(compile(_guide_code(), "guide", "exec", dont_inherit=True), namespace)
    prog = namespace["prog"]
    nothing = namespace["RoundWeights"](where=maas_jax.Path("^no-such-leaf$"))
    with pytest.warns(maas_jax.UnusedRuleWarning):
        assert nothing(prog) is prog


def test_guide_is_the_extend_doctest():
    """Every statement that defines the pass in the doctest appears verbatim in the guide."""
    guide = _guide_code()
    examples = doctest.DocTestParser().get_examples(extend.__doc__)
    defining = [
        e.source
        for e in examples
        if e.source.startswith(("import", "from", "@", "class", "def", "params", "spec", "prog"))
    ]
    assert len(defining) >= 8
    for source in defining:
        assert source.strip() in guide, f"the guide lacks:\n{source}"


# ---- moved runtime helpers ---------------------------------------------------------------


MOVED = (
    "ShardingError",
    "ShardingPlan",
    "format_bytes",
    "format_report",
    "in_shardings",
    "make_train_step",
    "place",
    "plan_report",
    "sharded_init",
    "sharded_jit",
    "state_shardings",
)


@pytest.mark.parametrize("name", MOVED)
def test_runtime_names_stay_importable_where_they_were(name):
    from maas_jax import passes, runtime

    shard = importlib.import_module("maas_jax.passes.shard")  # (`passes.shard` is the pass)

    obj = getattr(runtime, name)
    assert getattr(passes, name) is obj
    assert getattr(shard, name) is obj
    assert obj.__module__ in ("maas_jax._runtime", "maas_jax._analysis"), obj.__module__
    assert maas_jax.runtime is runtime


def test_runtime_doctests():
    from maas_jax import runtime

    result = doctest.testmod(runtime, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 5 and result.failed == 0, result


# ---- one-way imports between engine modules ---------------------------------------------------


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                out.extend(
                    (f"{mod}.{a.name}" if mod == "maas_jax" else mod, fn) for a in child.names
                )
            elif isinstance(child, ast.Import):
                out.extend((a.name, fn) for a in child.names)
            visit(child, fn)

    visit(tree, False)
    return out


def test_regions_and_interpreter_import_one_way():
    regions = _imports(CORE / "_regions.py")
    interp = _imports(CORE / "_interpreter.py")
    assert not [m for m, _ in regions if m.endswith("_interpreter")], regions
    assert not [m for m, in_fn in interp if m.endswith("_regions") and in_fn], interp
    assert not [m for m, in_fn in regions if m.startswith("maas_jax") and in_fn], regions


def test_core_never_imports_the_pass_library():
    for path in CORE.glob("*.py"):
        bad = [m for m, in_fn in _imports(path) if m.startswith("maas_jax.passes") and not in_fn]
        assert not bad, f"{path.name} imports {bad} at module level"


@pytest.mark.parametrize(
    "module", ["maas_jax._regions", "maas_jax._interpreter", "maas_jax.extend"]
)
def test_engine_modules_import_in_a_fresh_process(module):
    code = f"import {module}, sys; assert 'maas_jax.passes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
