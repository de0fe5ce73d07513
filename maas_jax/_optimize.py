"""Run a recipe on a model end to end: passes, calibration, conversion to stored integers.

A :class:`~maas_jax.Pipeline` is a function of Programs only; two steps also need the
parameters: static activation ranges are calibrated on data, and ``convert`` changes the
parameters themselves (float weights become stored integers). :func:`optimize` runs the passes
in order and does both where the recipe asks for them, so that a recipe file is all a user
writes (``maas-jax optimize --recipe FILE``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((1, 8)))
    >>> recipe = maas_jax.pipeline(passes.fake_quant("int8"), passes.convert())
    >>> out, stored = maas_jax.optimize(prog, {"w": w}, recipe)
    >>> stored["w"]["qvalue"].dtype.name
    'int8'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from maas_jax._errors import MaasError
from maas_jax._pipeline import Pipeline, pass_name, pipeline
from maas_jax._program import Program


def optimize(
    program: Program,
    params: Any,
    recipe: Any,
    *,
    calibration_data: Iterable[Any] | None = None,
    progress: bool = False,
) -> tuple[Program, Any]:
    """Apply ``recipe`` (a Pipeline or pass) to ``program``; returns ``(program, params)``.

    Before ``convert``, a program whose static activation ranges were never calibrated is
    calibrated on ``calibration_data`` (batches of the program's inputs); after it, the
    stored parameters are computed with ``convert_params``.

    Raises:
      MaasError: the recipe needs calibration data and none was given.
    """
    from maas_jax.passes.quantize.calibration import calibrate
    from maas_jax.passes.quantize.conversion import Convert, convert_params

    steps = list(recipe.leaves()) if isinstance(recipe, Pipeline) else [recipe]
    verify = recipe.verify if isinstance(recipe, Pipeline) else True
    for step in steps:
        if isinstance(step, Convert):
            if program.meta.get("uncalibrated_sites"):
                if calibration_data is None:
                    raise MaasError(
                        f"optimize: the recipe quantizes activations with static ranges "
                        f"before {pass_name(step)}; give calibration_data=[batches of inputs]"
                    )
                program = calibrate(program, params, calibration_data, progress=progress)
            converted = pipeline(step, verify=verify)(program)
            params = convert_params(converted, program, params)
            program = converted
        else:
            program = pipeline(step, verify=verify)(program)
    return program, params
