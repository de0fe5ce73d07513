"""Shared plumbing for passes that transform weights at their entry into the program."""

from __future__ import annotations

from typing import Any

from maas_jax import Program, Selection, UnsupportedPrimitiveError, select
from maas_jax._compat import is_floating


def select_weights(
    program: Program, where: Any, *, pass_name: str, allow_opaque: bool, config: str
) -> tuple[Selection, list[str]]:
    """Select parameters for a weight pass; returns the selection and the paths still to do.

    Paths this exact pass configuration already transformed (``Program.history``) are skipped,
    which makes weight passes idempotent. A candidate parameter that flows into a region the
    engine cannot see into is an error unless ``allow_opaque``: its use cannot be checked, and
    under the default selection we could not even tell whether it is a weight.
    """
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


def freeze_where(where: Any) -> Any:
    """Lists are unhashable; passes are frozen dataclasses, so store rule lists as tuples."""
    return tuple(where) if isinstance(where, list) else where
