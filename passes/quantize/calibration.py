"""``calibrate``: choose static activation ranges from data.

Observers are functional: the observer program is the model's program with extra outputs —
per static site, max |x| (phase 1) and a histogram of |x| over ``[0, max]`` (phase 2, for the
percentile / MSE / KL methods). Statistics from regions leave them as extra outputs or loop
carries (a scan over layers reports the max over its iterations). Batches are merged by max or
sum on the host, so calibration runs under ``jit``, on sharded batches, and across hosts
(merge the per-host statistics the same way). The calibrated program bakes the ranges in as
constants; :func:`maas_jax.passes.convert` keeps them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from maas_jax.passes.quantize.fake_quant import HIST_BINS, FakeQuant
from maas_jax.passes.quantize.numerics import check_finite, get_format

from maas_jax import MaasError, Program
from maas_jax.extend import contraction_sites


class CalibrationError(MaasError, ValueError):
    """Calibration data or program cannot be used (NaN/inf, nothing to calibrate, ...)."""


class CalibrationWarning(UserWarning):
    """Some contraction could not be calibrated from the data given."""


def calibrate(
    program: Program, params: Any, batches: Iterable[Any], *, progress: bool = True
) -> Program:
    """Calibrate the static activation ranges of a fake-quant program on ``batches``.

    Args:
      program: the output of ``fake_quant(..., act_mode="static")`` (any rule may be static).
      params: the parameters the program is called with.
      batches: an iterable of inputs: each item is a tuple of the program's positional inputs
        (after the parameters), or a single array when there is one input. Shapes as traced.
      progress: print a progress line per batch to stderr.

    Returns:
      A fake-quant program with the ranges baked in (convertible with ``convert``).

    Raises:
      CalibrationError: not a static fake-quant program, no batches, a NaN/inf in a batch, in
        a quantized weight (the message names its path) or in the activation statistics.

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> w = jnp.eye(4)
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((2, 4)))
    >>> fq = passes.fake_quant("int8", act="int8", act_mode="static")(prog)
    >>> batches = [jnp.full((2, 4), v) for v in (1.0, -3.0, 2.0)]
    >>> cal = passes.calibrate(fq, {"w": w}, batches, progress=False)
    >>> cal.meta["fake_quant_pass"].act_scales
    ((0, 3.0),)
    """
    fq: FakeQuant | None = program.meta.get("fake_quant_pass")
    base: Program | None = program.meta.get("fake_quant_base")
    if fq is None or base is None:
        raise CalibrationError(
            f"calibrate: {program.name!r} is not a fake-quant program. Run "
            "passes.fake_quant(..., act_mode='static') first."
        )
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibrate: no calibration batches were given")
    absmax_fn, keys = fq.observer(base, "absmax")
    if not keys:
        raise CalibrationError(
            "calibrate: no contraction has a static-activation rule (act_mode='static')"
        )
    _check_weights(program, base, params, batches[0])
    sites = [k for k, _ in keys]
    rule_of = _rules_by_site(fq, base, sites)
    per_batch = _run(absmax_fn, keys, base, params, batches, "ranges", progress)
    absmax = {s: float(np.max(per_batch[:, i])) for i, s in enumerate(sites)}
    thresholds: dict[int, float] = {}
    need_hist = [s for s in sites if rule_of[s].calibration in ("percentile", "mse", "kl")]
    hist: dict[int, np.ndarray] = {}
    if need_hist:
        hist_fn, hkeys = fq.observer(base, "hist", ranges=absmax)
        stats = _run(hist_fn, hkeys, base, params, batches, "histograms", progress)
        for i, (s, _) in enumerate(hkeys):
            hist[s] = stats[:, i].sum(axis=0)
    for i, s in enumerate(sites):
        rule = rule_of[s]
        qmax = get_format(rule.act).qmax
        if rule.calibration == "minmax":
            t = absmax[s]
        elif rule.calibration == "moving_average":
            t = moving_average(per_batch[:, i])
        elif rule.calibration == "percentile":
            t = percentile_threshold(hist[s], absmax[s], rule.percentile)
        elif rule.calibration == "mse":
            t = mse_threshold(hist[s], absmax[s], qmax)
        else:
            t = kl_threshold(hist[s], absmax[s], qmax)
        thresholds[s] = float(t)
    unseen = sorted(s for s, t in thresholds.items() if not t > 0)
    if unseen:
        warnings.warn(
            f"calibrate: contraction(s) {unseen} saw no non-zero activation in the calibration "
            "data (a branch never taken?); they quantize activations dynamically per tensor.",
            CalibrationWarning,
            stacklevel=2,
        )
    scales = tuple(sorted((s, t) for s, t in thresholds.items() if t > 0))
    calibrated = FakeQuant(fq.rules, fq.inline_custom, scales, tuple(unseen))
    return calibrated(base)


def _check_weights(program: Program, base: Program, params: Any, batch: Any) -> None:
    """Raise on a NaN or inf in a weight the program quantizes (its scale would be NaN)."""
    quantized = set(program.meta.get("fake_quant", {}))
    inputs = batch if isinstance(batch, tuple) else (batch,)
    flat = base._check_args(params, inputs)
    for role, value in zip(base.roles, flat, strict=True):
        if role.path in quantized:
            check_finite(
                "calibrate",
                f"parameter {role.path!r}",
                value,
                CalibrationError,
                hint=" Its quantization scale would be NaN and every activation range computed "
                "through it meaningless: fix the parameters, or exclude it from "
                "fake_quant(where=...).",
            )


def _rules_by_site(fq: FakeQuant, base: Program, sites: list[int]) -> dict[int, Any]:
    from maas_jax.passes.quantize.fake_quant import plan_quantization

    plan = plan_quantization(base, fq.rules, config=repr(fq), warn=False)
    all_sites = contraction_sites(base)
    out = {}
    for s in sites:
        paths = [t.path for t in all_sites[s].in_tags[:2] if t is not None and t.path in plan]
        out[s] = plan[paths[0]][1]
    return out


def _run(
    closed: jcore.ClosedJaxpr,
    keys: tuple[Any, ...],
    base: Program,
    params: Any,
    batches: list[Any],
    what: str,
    progress: bool,
) -> np.ndarray:
    fn = jax.jit(jcore.jaxpr_as_fun(closed))
    n_keys = len(keys)
    rows = []
    for b, batch in enumerate(batches):
        inputs = batch if isinstance(batch, tuple) else (batch,)
        flat = base._check_args(params, inputs)
        for role, x in zip(base.roles, flat, strict=True):
            if role.path.startswith("args/") and not np.all(np.isfinite(np.asarray(x))):
                raise CalibrationError(
                    f"calibrate: batch {b} has NaN or inf in input {role.path}; calibration "
                    "ranges would be meaningless. Clean the data or drop the batch."
                )
        outs = fn(*flat)
        stats = [np.asarray(v) for v in outs[len(outs) - n_keys :]]
        for k, v in zip(keys, stats, strict=True):
            if not np.all(np.isfinite(v)):
                raise CalibrationError(
                    f"calibrate: activation statistics of contraction {k[0]} are not finite "
                    f"on batch {b} (NaN/inf inside the model)."
                )
        rows.append(stats)
        if progress:
            print(f"\rcalibrate {what}: {b + 1}/{len(batches)} batches", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return np.stack([np.stack(r) for r in rows])


# ---- choosing a range from statistics (host side, numpy) --------------------------------


def moving_average(per_batch_absmax: np.ndarray, momentum: float = 0.9) -> float:
    """Exponential moving average of the per-batch max |x| (starts at the first batch)."""
    avg = float(per_batch_absmax[0])
    for v in per_batch_absmax[1:]:
        avg = momentum * avg + (1 - momentum) * float(v)
    return avg


def _centers(absmax: float, bins: int) -> np.ndarray:
    width = absmax / bins
    return (np.arange(bins) + 0.5) * width


def percentile_threshold(hist: np.ndarray, absmax: float, pct: float) -> float:
    """The upper edge of the bin where the cumulative count reaches ``pct`` percent."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    k = int(np.searchsorted(cdf, pct / 100.0 - 1e-12))
    return float(min(k + 1, len(hist)) * absmax / len(hist))


def mse_threshold(hist: np.ndarray, absmax: float, qmax: float, candidates: int = 256) -> float:
    """The clipping range minimising expected squared quantization error on the histogram.

    Values inside ``[-t, t]`` carry uniform rounding noise of variance ``step**2 / 12``
    (``step = t / qmax``); values beyond it are clipped to ``t``.
    """
    x = _centers(absmax, len(hist))
    best, best_err = absmax, np.inf
    for t in np.linspace(absmax / candidates, absmax, candidates):
        step = t / qmax
        inside = x <= t
        err = np.sum(hist[inside]) * step**2 / 12 + np.sum(hist[~inside] * (x[~inside] - t) ** 2)
        if err < best_err:
            best, best_err = float(t), err
    return best


def kl_threshold(hist: np.ndarray, absmax: float, qmax: float, start: int | None = None) -> float:
    """Entropy calibration: the range whose quantized distribution is closest (KL) to the data.

    For each candidate number of bins ``i``, the reference distribution is ``hist[:i]`` with
    the clipped tail added to its last bin; the candidate is ``hist[:i]`` merged into
    ``qmax + 1`` levels and spread back over the non-empty bins (the TensorRT recipe).
    """
    bins = len(hist)
    levels = int(qmax) + 1
    start = start or max(levels, bins // 16)
    best_i, best_kl = bins, np.inf
    for i in range(start, bins + 1, max(1, bins // 256)):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()  # the reference keeps the clipped tail in its last bin
        if p.sum() == 0:
            continue
        # The candidate: the unclipped part merged into `levels` bins, spread back evenly
        # over the bins that were non-empty.
        q = np.zeros(i)
        head = hist[:i].astype(np.float64)
        edges = np.linspace(0, i, levels + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            nonzero = head[a:b] > 0
            if nonzero.any():
                q[a:b][nonzero] = head[a:b].sum() / nonzero.sum()
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-30)
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(best_i * absmax / bins)


__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "HIST_BINS",
    "calibrate",
    "kl_threshold",
    "moving_average",
    "mse_threshold",
    "percentile_threshold",
]
