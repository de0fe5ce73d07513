"""Shared plumbing for passes that transform weights at their entry into the program."""

from __future__ import annotations

import re
from typing import Any

from maas_jax import PassError, Path, Program, Selection, UnsupportedPrimitiveError, select
from maas_jax.extend import is_floating


def select_weights(
    program: Program, where: Any, *, pass_name: str, allow_opaque: bool, config: str
) -> tuple[Selection, list[str]]:
    """Select parameters for a weight pass; returns the selection and the paths still to do.

    Paths this exact pass configuration already transformed (``Program.history``) are skipped,
    which makes weight passes idempotent. A candidate parameter that flows into a region the
    engine cannot see into is an error unless ``allow_opaque``: its use cannot be checked, and
    under the default selection we could not even tell whether it is a weight.
    """
    _refuse_after_quantization(program, where, pass_name)
    sel = select(program, where, pass_name=pass_name)
    if not allow_opaque:
        candidates = sel.paths if where is not None else tuple(sel.infos)
        for path in candidates:
            opaque = [u for u in sel.infos[path].uses if u.opaque]
            if opaque:
                u = opaque[0]
                raise UnsupportedPrimitiveError(
                    f"{pass_name}: parameter {path!r} flows into `{u.primitive}` at {u.source} "
                    f"(name stack {u.name_stack or '<root>'!r}), whose body maas_jax cannot see "
                    "into, so its use there cannot be analysed. Exclude it with `where=`, or "
                    f"pass allow_opaque=True to {pass_name} to transform it at its entry anyway."
                )
    done = {path for rec in program.history if rec.config == config for path in rec.touched}
    todo = [p for p in sel.paths if p not in done]
    for path in todo:
        role = sel.infos[path].role
        if not is_floating(role.dtype):
            raise TypeError(
                f"{pass_name}: parameter {path!r} is {role.dtype.name}; only floating-point "
                "parameters can be transformed. Narrow `where=` to exclude it."
            )
    return sel, todo


def _after_quant_message(pass_name: str, paths: list[str]) -> str:
    return (
        f"{pass_name} after fake_quant: {', '.join(repr(p) for p in paths[:5])} "
        f"{'is' if len(paths) == 1 else 'are'} already quantized, so {pass_name} would act on "
        "integer codes (or on nothing), not on the float weights. Put "
        f"{pass_name} before fake_quant in the pipeline: "
        f"pipeline({pass_name}(...), fake_quant(...))."
    )


def _refuse_after_quantization(program: Program, where: Any, pass_name: str) -> None:
    """A weight pass after fake_quant would transform codes, not weights: refuse it.

    With the default selection, quantized weights no longer look like weights (their uses
    read integers), so the pass would silently do nothing; with a ``where=`` naming them it
    would clamp or prune the int8 codes. Either way the pipeline would not mean what it says.
    """
    quantized = [p for rec in program.history if rec.name == "fake_quant" for p in rec.touched]
    if not quantized:
        return
    if where is None:
        raise PassError(_after_quant_message(pass_name, quantized))
    # A regex would no longer match a quantized weight (it is no longer a contraction's
    # weight): ask which leaves it names at all.
    named = select(program, _any_leaf(where), pass_name=pass_name, warn_unused=False).paths
    late = [p for p in named if p in set(quantized)]
    if late:
        raise PassError(_after_quant_message(pass_name, late))


def _any_leaf(where: Any) -> Any:
    """``where`` with path regexes widened to every leaf (:class:`maas_jax.Path`)."""
    if isinstance(where, str | re.Pattern):
        return Path(where if isinstance(where, str) else where.pattern)
    if isinstance(where, list | tuple):
        return type(where)(_any_leaf(w) for w in where)
    return where


def freeze_where(where: Any) -> Any:
    """Lists are unhashable; passes are frozen dataclasses, so store rule lists as tuples."""
    return tuple(where) if isinstance(where, list) else where
