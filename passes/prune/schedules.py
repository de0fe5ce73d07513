"""Sparsity schedules: ``step -> sparsity`` plus *when* masks are recomputed.

A schedule is a small frozen object, callable on a step, with a ``should_update(step)`` method
and ``begin_step`` / ``end_step`` / ``frequency`` attributes (:func:`sparsify` uses all of
them). Both work on Python ints (returning a Python ``float`` / ``bool``) and on traced integer
steps inside ``jit`` (returning float32 / bool arrays).

The value of a schedule only changes at its update steps: between two of them it is the value
at the last one, so the sparsity a schedule reports is the sparsity the masks actually have.

Example:
    >>> s = polynomial_decay(0.0, 0.8, begin_step=0, end_step=30, frequency=5)
    >>> [round(s(t), 4) for t in (0, 5, 7, 30, 100)]
    [0.0, 0.337, 0.337, 0.8, 0.8]
    >>> [t for t in range(40) if s.should_update(t)]
    [0, 5, 10, 15, 20, 25, 30]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from maas_jax.passes.prune.masks import check_sparsity

__all__ = [
    "Constant",
    "Periodic",
    "PolynomialDecay",
    "constant",
    "periodic",
    "polynomial_decay",
    "should_update",
]


def _is_py_int(step: Any) -> bool:
    return isinstance(step, int | np.integer) and not isinstance(step, bool)


def _check_step(value: Any, name: str, minimum: int = 0) -> int:
    if not _is_py_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_concrete_sparsity(value: Any, name: str) -> float:
    if not isinstance(value, int | float | np.floating | np.integer) or isinstance(value, bool):
        raise ValueError(f"{name} must be a Python number, got {value!r}")
    return check_sparsity(value, name)


def should_update(step: Any, begin: int, end: int | None, frequency: int) -> Any:
    """Whether masks are recomputed at ``step``.

    True at ``begin, begin + frequency, begin + 2 * frequency, ...`` up to ``end`` inclusive, and
    always at ``end`` itself (so the final sparsity is reached even when ``end - begin`` is not a
    multiple of ``frequency``). ``end=None`` means no end.

    Args:
        step: A Python int (returns ``bool``) or a traced integer (returns a bool array).
        begin: First update step.
        end: Last update step, or ``None``.
        frequency: Steps between updates, ``>= 1``.

    Example:
        >>> [t for t in range(12) if should_update(t, 2, 9, 3)]
        [2, 5, 8, 9]
    """
    frequency = _check_step(frequency, "frequency", 1)
    if _is_py_int(step):
        after = step - begin
        in_range = after >= 0 and (end is None or step <= end)
        return bool(in_range and (after % frequency == 0 or step == end))
    step = jnp.asarray(step)
    after = step - begin
    if end is None:
        return (after >= 0) & (after % frequency == 0)
    return (after >= 0) & (step <= end) & ((after % frequency == 0) | (step == end))


def _last_update(step: Any, begin: int, end: int | None, frequency: int, xp: Any) -> Any:
    """The last update step ``<= step`` (``step`` itself before ``begin``)."""
    grid = begin + ((step - begin) // frequency) * frequency
    if end is not None:
        grid = xp.where(step >= end, end, grid)
    return xp.where(step < begin, step, grid)


@dataclasses.dataclass(frozen=True)
class PolynomialDecay:
    """Zhu & Gupta's polynomial sparsity ramp. Build with :func:`polynomial_decay`."""

    initial: float
    final: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 1

    def __call__(self, step: Any) -> Any:
        if _is_py_int(step):
            return float(self._value(int(step), np))
        return self._value(jnp.asarray(step, jnp.int32), jnp).astype(jnp.float32)

    def _value(self, step: Any, xp: Any) -> Any:
        t = _last_update(step, self.begin_step, self.end_step, self.frequency, xp)
        t = xp.clip(t, self.begin_step, self.end_step)
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        if xp is jnp:
            frac = frac.astype(jnp.float32)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** self.power

    def should_update(self, step: Any) -> Any:
        """Whether masks are recomputed at ``step`` (see :func:`should_update`)."""
        return should_update(step, self.begin_step, self.end_step, self.frequency)


def polynomial_decay(
    initial: float,
    final: float,
    begin_step: int,
    end_step: int,
    power: float = 3,
    frequency: int = 1,
) -> PolynomialDecay:
    """Zhu & Gupta (2017) gradual pruning schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power`` for ``t0 <= t <= t0 + n*dt``
    with ``t0 = begin_step`` and ``n * dt = end_step - begin_step``; ``s_i`` before ``begin_step``
    and ``s_f`` after ``end_step``. The value only changes at update steps (every ``frequency``
    steps from ``begin_step``, and at ``end_step``): in between, ``t`` is the last update step.

    Args:
        initial: Sparsity at ``begin_step``, in ``[0, 1)``.
        final: Sparsity from ``end_step`` on, in ``[initial, 1)``.
        begin_step: First step masks are computed (``>= 0``).
        end_step: Step the final sparsity is reached (``> begin_step``).
        power: Exponent of the ramp (``> 0``; 3 in the paper).
        frequency: Steps between mask updates (``>= 1``).

    Returns:
        A :class:`PolynomialDecay`; callable on a Python int or a traced integer step.

    Raises:
        ValueError: ``end_step <= begin_step``, sparsities outside ``[0, 1)`` or
            ``initial > final``, ``frequency < 1``, ``power <= 0``.

    Example:
        >>> s = polynomial_decay(0.0, 0.5, begin_step=10, end_step=20)
        >>> s(0), s(15), s(20)
        (0.0, 0.4375, 0.5)
    """
    initial = _check_concrete_sparsity(initial, "initial sparsity")
    final = _check_concrete_sparsity(final, "final sparsity")
    if initial > final:
        raise ValueError(
            f"polynomial_decay: initial sparsity {initial} must be <= final sparsity {final}"
        )
    begin_step = _check_step(begin_step, "begin_step")
    end_step = _check_step(end_step, "end_step")
    if end_step <= begin_step:
        raise ValueError(
            f"polynomial_decay: end_step must be > begin_step, got begin_step={begin_step}, "
            f"end_step={end_step}"
        )
    frequency = _check_step(frequency, "frequency", 1)
    if not isinstance(power, int | float) or isinstance(power, bool) or not power > 0:
        raise ValueError(f"polynomial_decay: power must be a number > 0, got {power!r}")
    return PolynomialDecay(initial, final, begin_step, end_step, float(power), frequency)


@dataclasses.dataclass(frozen=True)
class Constant:
    """One-shot pruning. Build with :func:`constant`."""

    sparsity: float
    begin_step: int = 0

    @property
    def end_step(self) -> int:
        return self.begin_step

    @property
    def frequency(self) -> int:
        return 1

    def __call__(self, step: Any) -> Any:
        if _is_py_int(step):
            return self.sparsity if step >= self.begin_step else 0.0
        step = jnp.asarray(step, jnp.int32)
        return jnp.where(step >= self.begin_step, self.sparsity, 0.0).astype(jnp.float32)

    def should_update(self, step: Any) -> Any:
        """True only at ``begin_step``."""
        return should_update(step, self.begin_step, self.begin_step, 1)


def constant(sparsity: float, begin_step: int = 0) -> Constant:
    """One-shot schedule: ``sparsity`` from ``begin_step`` on (0 before); masks computed once.

    Example:
        >>> s = constant(0.9, begin_step=100)
        >>> s(99), s(100), s.should_update(100), s.should_update(101)
        (0.0, 0.9, True, False)
    """
    return Constant(
        _check_concrete_sparsity(sparsity, "sparsity"), _check_step(begin_step, "begin_step")
    )


@dataclasses.dataclass(frozen=True)
class Periodic:
    """Mask updates every ``every`` steps forever. Build with :func:`periodic`."""

    schedule: Any
    every: int

    @property
    def begin_step(self) -> int:
        return getattr(self.schedule, "begin_step", 0)

    @property
    def end_step(self) -> None:
        return None

    @property
    def frequency(self) -> int:
        return self.every

    def __call__(self, step: Any) -> Any:
        if _is_py_int(step):
            return self.schedule(
                int(_last_update(int(step), self.begin_step, None, self.every, np))
            )
        step = jnp.asarray(step, jnp.int32)
        return self.schedule(_last_update(step, self.begin_step, None, self.every, jnp))

    def should_update(self, step: Any) -> Any:
        """True at ``begin_step + k * every`` for every ``k >= 0``."""
        return should_update(step, self.begin_step, None, self.every)


def periodic(schedule: Callable[[Any], Any] | float, every: int) -> Periodic:
    """Recompute masks every ``every`` steps from the schedule's ``begin_step``, with no end.

    Use it to keep re-deriving masks after a ramp has reached its final sparsity (for example
    with a saliency that changes as training goes on). The value is ``schedule`` evaluated at
    the last update step. A number is shorthand for ``constant(number)``.

    Example:
        >>> s = periodic(polynomial_decay(0.0, 0.5, 0, 10), every=4)
        >>> [t for t in range(13) if s.should_update(t)], s(5) == s(4)
        ([0, 4, 8, 12], True)
    """
    every = _check_step(every, "every", 1)
    if isinstance(schedule, int | float) and not isinstance(schedule, bool):
        schedule = constant(schedule)
    if not callable(schedule):
        raise ValueError(f"periodic needs a schedule or a sparsity, got {schedule!r}")
    return Periodic(schedule, every)
