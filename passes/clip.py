"""``clip_weights``: clamp selected weights to ``[-max_abs, max_abs]``.

Outlier clipping before quantization: a few large weights stretch a per-tensor or per-channel
scale and cost every other weight resolution. The clamp is applied once, at the parameter's
entry into the program, so tied weights, scan-stacked layers and every region see the same
clipped value, including opaque custom_jvp/custom_vjp regions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from jax import lax
from maas_jax.passes._weights import freeze_where, select_weights

from maas_jax import PassRecord, Program, Rewrite, predicate, rewrite


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipWeights:
    """The pass object :func:`clip_weights` returns (frozen, hashable, readable ``repr``)."""

    max_abs: float
    where: Any = None
    allow_opaque: bool = False

    name = "clip_weights"

    def __post_init__(self) -> None:
        m = self.max_abs
        if isinstance(m, bool) or not isinstance(m, int | float):
            raise TypeError(f"clip_weights: max_abs must be a number, got {type(m).__name__}")
        if not math.isfinite(m) or m <= 0:
            raise ValueError(
                f"clip_weights: max_abs must be a finite number > 0, got {m!r}. Weights are "
                "clamped to [-max_abs, max_abs]."
            )
        object.__setattr__(self, "max_abs", float(m))
        object.__setattr__(self, "where", freeze_where(self.where))
        if self.where is not None:
            predicate(self.where, what="clip_weights(where=...)")  # fail early on bad regexes

    def __repr__(self) -> str:
        args = [f"max_abs={self.max_abs!r}"]
        if self.where is not None:
            args.append(f"where={self.where!r}")
        if self.allow_opaque:
            args.append("allow_opaque=True")
        return f"clip_weights({', '.join(args)})"

    def __call__(self, program: Program) -> Program:
        sel, todo = select_weights(
            program,
            self.where,
            pass_name=self.name,
            allow_opaque=self.allow_opaque,
            config=repr(self),
        )
        if not todo:
            return program
        m = self.max_abs

        def clamp(w: Any) -> Any:
            bound = jnp.asarray(m, w.dtype)
            return lax.clamp(-bound, w, bound)

        new = rewrite(program, Rewrite(self.name, entry={p: clamp for p in todo}))
        notes = tuple(f"unused rule: {sel.rules[k]!r}" for k in sel.unused)
        record = PassRecord(self.name, repr(self), tuple(todo), notes)
        return program.with_record(record, jaxpr=new)


def clip_weights(max_abs: float, where: Any = None, *, allow_opaque: bool = False) -> ClipWeights:
    """Clamp the selected weights to ``[-max_abs, max_abs]`` at their entry into the program.

    Args:
      max_abs: the bound, a finite number > 0.
      where: which parameters. ``None`` (default): every floating ``params`` leaf that a
        dot_general or convolution consumes. A path regex, ``maas_jax.Op(...)``, a callable
        ``(path, info) -> bool``, or a list of these (first match wins; rules that match
        nothing are reported with an ``UnusedRuleWarning``).
      allow_opaque: transform parameters even when they flow into a region maas_jax cannot see
        into (an unknown higher-order primitive). Off by default: such flows are an error.

    Returns:
      A pass. A program with nothing to clip is returned unchanged (the same object).

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.array([[3.0], [-0.5]])},
    ...                       jnp.ones((1, 2)))
    >>> clipped = passes.clip_weights(1.0)(prog)
    >>> clipped({"w": jnp.array([[3.0], [-0.5]])}, jnp.ones((1, 2))).tolist()
    [[0.5]]
    """
    return ClipWeights(max_abs=max_abs, where=where, allow_opaque=allow_opaque)
