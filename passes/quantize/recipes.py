"""One call for the common cases: a float model in, an integer program and its weights out.

>>> import jax, jax.numpy as jnp
>>> from maas_jax import passes
>>> w = jax.random.normal(jax.random.key(0), (64, 8))
>>> q = passes.quantize_model(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((4, 64)), recipe="w8a8")
>>> q.params["w"]["qvalue"].dtype.name, round(q.bytes_ratio, 2)
('int8', 0.27)
>>> q(jnp.ones((4, 64))).shape
(4, 8)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
from maas_jax.passes.quantize.calibration import calibrate
from maas_jax.passes.quantize.conversion import convert, convert_params
from maas_jax.passes.quantize.fake_quant import QuantRule, fake_quant

import maas_jax
from maas_jax import Program

#: recipes whose "int8 weights" include lookup tables (embeddings), quantized per row
TABLE_RECIPES = ("w8", "w8a8", "w8a8-static")

#: recipe name -> fake_quant keyword arguments
RECIPES: dict[str, dict[str, Any]] = {
    "w8": dict(weight="int8"),
    "w4": dict(weight="int4"),
    "w8a8": dict(weight="int8", act="int8"),
    "w8a8-static": dict(weight="int8", act="int8", act_mode="static", calibration="percentile"),
    "w4a8": dict(weight="int4", act="int8"),
    "fp8": dict(weight="fp8_e4m3", act="fp8_e4m3"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """An integer program with its stored weights; call it with the model's inputs.

    Calls run one compiled executable (the program is jitted once, the stored weights are its
    arguments); ``jax.jit(q)`` works too (the object hashes by identity).
    """

    program: Program
    params: Any
    fake_quant_program: Program
    float_bytes: int
    stored_bytes: int
    recipe: str = ""
    tables: str | None = None  # the embedding tables' format ("int8", "int4") or None

    @property
    def bytes_ratio(self) -> float:
        return self.stored_bytes / self.float_bytes

    @functools.cached_property
    def _compiled(self) -> Any:
        import jax

        return jax.jit(self.program)

    def __call__(self, *inputs: Any) -> Any:
        return self._compiled(self.params, *inputs)

    def __repr__(self) -> str:
        n = len(self.program.params)
        return (
            f"QuantizedModel({self.program.name!r}, recipe={self.recipe!r}, {n} stored arrays, "
            f"{self.stored_bytes:,} bytes = {self.bytes_ratio:.3f}x fp32)"
        )


def lookup_table(path: str, info: Any) -> bool:
    """Selector: a table read by lookups (gather) that no contraction consumes."""
    return info.is_table and not info.is_weight


def _has_tables(program: Program) -> bool:
    return any(lookup_table(i.path, i) for i in maas_jax.param_infos(program))


def _nbytes(tree: Any) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def quantize_model(
    model: Any,
    params: Any,
    *inputs: Any,
    recipe: str = "w8a8",
    where: Any = None,
    calibration_data: Iterable[Any] | None = None,
    fold_batchnorm: bool = True,
    passes_before: tuple[Any, ...] = (),
    tables: bool | str | None = None,
) -> QuantizedModel:
    """Trace, (fold BatchNorm,) fake-quantize, (calibrate,) convert: one call.

    Args:
      model: a function ``fn(params, *inputs)``, a Flax Linen module (its ``apply``), or a
        Flax NNX module, called as ``quantize_model(nnx_module, *inputs)`` (it carries its
        parameters; ``params`` is then its first input).
      params: the float parameters (Linen variables, a dict).
      *inputs: example inputs (shapes the program is specialised to).
      recipe: one of :data:`RECIPES` (``"w8a8"`` dynamic int8, ``"w8a8-static"`` calibrated,
        ``"w8"`` / ``"w4"`` weight-only, ``"w4a8"``, ``"fp8"``).
      where: which weights (default: every matmul/conv weight and, for the int8-weight
        recipes ``w8``/``w8a8``/``w8a8-static``, every embedding table, per row).
      calibration_data: batches for static recipes (see :func:`calibrate`).
      fold_batchnorm: fold inference BatchNorm into the preceding conv/dense first.
      passes_before: more passes to run before quantizing (e.g. ``clip_weights``).
      tables: quantize embedding tables per row: ``True`` for int8, or a format name
        (``"int4"``: packed, smallest, costs quality). Default: int8 for the int8-weight
        recipes when ``where`` is None.
    """
    if recipe not in RECIPES:
        raise ValueError(f"quantize_model: unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if _is_nnx(model):
        # quantize_model(nnx_module, *inputs): the module carries its own parameters.
        inputs = (params, *inputs)
        program, params = maas_jax.trace_nnx(model, *inputs)
    else:
        fn = getattr(model, "apply", model)
        program = maas_jax.trace(fn, params, *inputs)
    before = list(passes_before)
    if fold_batchnorm:
        from maas_jax.passes.fold_batchnorm import fold_batchnorm as fold

        before.insert(0, fold())
    rules = [QuantRule(where=where, **RECIPES[recipe])]
    if tables is None:
        tables = where is None and recipe in TABLE_RECIPES
    table_format = None
    if tables and _has_tables(program):
        # Embedding tables are most of a small encoder's bytes: int8 per row, dequantized
        # only for the rows a lookup reads.
        table_format = tables if isinstance(tables, str) else "int8"
        rules.append(QuantRule(where=lookup_table, weight=table_format))
    fq = maas_jax.pipeline(*before, fake_quant(rules=rules))(program)
    if RECIPES[recipe].get("act_mode") == "static":
        if calibration_data is None:
            raise ValueError(f"quantize_model: recipe {recipe!r} needs calibration_data=[batches]")
        fq = calibrate(fq, params, calibration_data)
    int_prog = convert()(fq)
    stored = convert_params(int_prog, fq, params)
    return QuantizedModel(
        int_prog, stored, fq, _nbytes(params), _nbytes(stored), recipe, table_format
    )


def _is_nnx(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(model, nnx.Module)
