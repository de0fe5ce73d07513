"""Quantization passes: ``fake_quant`` (QAT/PTQ simulation) and ``convert`` (integer programs).

The numerics (formats, scales, quantize/dequantize, int4 packing) live in
:mod:`maas_jax.passes.quantize.numerics`.
"""

from maas_jax.passes.quantize.calibration import CalibrationError, calibrate
from maas_jax.passes.quantize.conversion import Convert, ConvertError, convert, convert_params
from maas_jax.passes.quantize.fake_quant import (
    DequantizedWeightWarning,
    FakeQuant,
    GranularityWarning,
    QuantRule,
    fake_quant,
)
from maas_jax.passes.quantize.recipes import RECIPES, QuantizedModel, quantize_model

__all__ = [
    "RECIPES",
    "QuantizedModel",
    "quantize_model",
    "CalibrationError",
    "calibrate",
    "Convert",
    "ConvertError",
    "FakeQuant",
    "GranularityWarning",
    "DequantizedWeightWarning",
    "QuantRule",
    "convert",
    "convert_params",
    "fake_quant",
]
