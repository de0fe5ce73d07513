"""What the interpreter carries: plain arrays, and the value objects passes put in their place.

An entry transform or a rule may put a *value object* (a quantized array ``QArray``) where the
jaxpr has an array. The protocol is duck-typed: ``__maas_materialize__()`` (required) turns it
back into an array; ``__maas_view__(eqn, operands)``, ``__maas_scan_prepare__()`` /
``__maas_scan_slice__()`` and ``__maas_shard_specs__(spec)`` (optional, None means
"materialize first") keep it itself through views, scans and shard_maps.

Both the interpreter (``_interpreter.py``) and the region handlers (``_regions.py``) use these
helpers, so they live here, below both: the handlers never import the interpreter, and the
interpreter imports the handlers (one direction, no cycle).
"""

from __future__ import annotations

from typing import Any

from jax.extend import core as jcore


def is_lifted(x: Any) -> bool:
    """Whether ``x`` is a pass's value object (e.g. a quantized array) rather than an array.

    Passes may put such objects into the interpreter's environment (an entry transform returns
    one, a rule passes it on). They implement ``__maas_materialize__()``, which the engine calls
    wherever an equation it does not hand to the pass's rule needs a plain array.
    """
    return hasattr(x, "__maas_materialize__")


def materialize(x: Any) -> Any:
    """``x`` as a plain array: a value object's ``__maas_materialize__()``, anything else as is.

    >>> materialize(3.0)
    3.0
    """
    return x.__maas_materialize__() if is_lifted(x) else x


def lifted_view(eqn: jcore.JaxprEqn, invals: list[Any]) -> Any:
    """A view op applied to a value object (``__maas_view__``), or None to materialize it.

    A value object that passes through reshape / slice / squeeze / transpose / gather keeps
    being itself, with the spec of the result: a quantized weight stays quantized.
    """
    if any(is_lifted(v) for v in invals[1:]):
        return None
    view = getattr(invals[0], "__maas_view__", None)
    return None if view is None else view(eqn, list(invals[1:]))


def scan_prepare(x: Any) -> Any:
    """A value object about to be sliced by scan (``xs``): leaves at full length, or plain."""
    if not is_lifted(x):
        return x
    prep = getattr(x, "__maas_scan_prepare__", None)
    out = prep() if prep is not None and hasattr(x, "__maas_scan_slice__") else None
    return materialize(x) if out is None else out


def scan_slice(x: Any) -> Any:
    """One iteration's slice of a value object: its spec loses the leading (layer) axis."""
    return x.__maas_scan_slice__() if is_lifted(x) else x


def shapes_changed(eqn: jcore.JaxprEqn, invals: list[Any]) -> bool:
    """Whether an operand's shape differs from the shape recorded in the equation."""
    for v, x in zip(eqn.invars, invals, strict=True):
        shape = getattr(x, "shape", None)
        if shape is not None and tuple(shape) != tuple(v.aval.shape):
            return True
    return False
