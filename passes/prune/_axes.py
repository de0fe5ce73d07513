"""Which axes of a weight are layers, inputs and outputs, read from how the program uses it.

N:M groups, Wanda rows and per-layer rates all depend on the *role* of each axis, and the
shape alone cannot tell it: a scan-stacked ``(L, in, out)`` kernel, a ``(out, in)`` kernel used
as ``h @ w.T`` and a ``(L, out, in)`` stack used as ``w[l] @ h`` all look alike. The consumer
table (:func:`maas_jax.consumers`) records, for every contraction that reads a parameter, the
dimension numbers in the coordinates of the operand as consumed (after scan slicing and view
ops), and :func:`maas_jax.extend.map_dims_to_param` maps them back to the parameter's own
axes. This is the same derivation ``fake_quant`` uses for per-channel scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maas_jax.extend import CONTRACTION_PRIMITIVES, map_dims_to_param


@dataclasses.dataclass(frozen=True)
class WeightAxes:
    """The roles of a weight's axes, in the parameter's own axis numbers.

    Attributes:
        ndim: Number of axes of the parameter.
        stacked: Leading axes a ``scan`` slices away: one layer per index, masked per layer.
        contracted: Axes the consuming contraction sums over (input features; for a
            convolution kernel also the spatial axes). ``None`` when the uses do not say (see
            ``problem``).
        group: The input-feature axis (N:M groups run along it). ``None`` with ``contracted``.
        problem: Why ``contracted`` is unknown, for error messages.
    """

    ndim: int
    stacked: int
    contracted: tuple[int, ...] | None
    group: int | None
    problem: str = ""

    @property
    def outputs(self) -> tuple[int, ...]:
        """Per-layer axes that are not contracted (output channels, batch axes of the dot)."""
        contracted = self.contracted or ()
        return tuple(a for a in range(self.stacked, self.ndim) if a not in contracted)

    def require(self, path: str, what: str) -> WeightAxes:
        """This object, or a ValueError saying why ``what`` cannot know the input axis."""
        if self.contracted is None:
            raise ValueError(
                f"{what} needs the input (contracted) axis of {path!r}, but {self.problem}. "
                "Exclude it with `where=`, or give explicit masks with prune(masks=Masks(...))."
            )
        return self


def _contracted_and_group(use: Any) -> tuple[tuple[int, ...], int] | None:
    """Operand dims a contraction sums over, and its input-feature dim (None if unknown).

    Several contracted dims of a dot (an einsum over two feature axes): groups run along the
    innermost one, consecutive in memory like the K axis of a GEMM; a convolution's features
    come first in its layout, before the window.
    """
    contracted = use.contracted_dims
    if not contracted:
        return None
    group = contracted[0] if use.primitive == "conv_general_dilated" else max(contracted)
    return contracted, group


def weight_axes(info: Any) -> WeightAxes:
    """Derive :class:`WeightAxes` from a :class:`maas_jax.ParamInfo`.

    Every contraction using the weight must agree on its contracted axes (a tied weight read
    as ``x @ w`` and as ``x @ w.T`` has no single input axis), and the scan-stacked layer axes
    must not be among them.
    """
    ndim = len(info.shape)
    uses = [u for u in info.uses if u.primitive in CONTRACTION_PRIMITIVES]
    stacked = max((u.sliced for u in info.uses), default=0)
    if not uses:
        return WeightAxes(ndim, stacked, None, None, "no dot_general or convolution consumes it")
    found: set[tuple[tuple[int, ...], int]] = set()
    for use in uses:
        got = _contracted_and_group(use)
        if got is None:
            return WeightAxes(
                ndim, stacked, None, None, f"its use {use.describe()} has no dimension numbers"
            )
        contracted, group = got
        mapped = map_dims_to_param((*contracted, group), use.views)
        if any(d is None for d in mapped):
            return WeightAxes(
                ndim,
                stacked,
                None,
                None,
                f"a view before {use.describe()} merges or creates the contracted axes",
            )
        if use.sliced != stacked:
            return WeightAxes(
                ndim,
                stacked,
                None,
                None,
                f"its uses slice different numbers of scan axes ({use.sliced} and {stacked})",
            )
        found.add((tuple(sorted(mapped[:-1])), mapped[-1]))
    if len(found) != 1:
        shown = " and ".join(str(list(c)) for c, _ in sorted(found))
        return WeightAxes(ndim, stacked, None, None, f"its uses contract different axes ({shown})")
    ((contracted, group),) = found
    if any(a < stacked for a in contracted):
        return WeightAxes(
            ndim, stacked, None, None, "a contraction sums over its scan-stacked layer axis"
        )
    return WeightAxes(ndim, stacked, contracted, group)
