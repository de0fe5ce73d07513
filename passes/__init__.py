"""The maas_jax pass library (``maas_jax.passes``): policies built on the core engine.

Every public pass is a snake_case factory returning a frozen, hashable pass object with a
readable ``repr``. A pass maps a :class:`maas_jax.Program` to a Program and returns its input
object unchanged when it has nothing to do.
"""

from maas_jax.passes.clip import ClipWeights, clip_weights
from maas_jax.passes.dce import DCE, dce
from maas_jax.passes.fold_batchnorm import FoldBatchNorm, fold_batchnorm
from maas_jax.passes.prune import (
    ChannelPlan,
    Masks,
    Prune,
    PruneChannels,
    StructuredPruningError,
    activation_norms,
    channel_plan,
    compute_masks,
    prune,
    prune_channels,
)
from maas_jax.passes.quantize import (
    RECIPES,
    CalibrationError,
    Convert,
    ConvertError,
    FakeQuant,
    QuantizedModel,
    QuantRule,
    calibrate,
    convert,
    convert_params,
    fake_quant,
    quantize_model,
)
from maas_jax.passes.shard import (
    Shard,
    ShardingError,
    ShardingPlan,
    ShardingWarning,
    format_report,
    in_shardings,
    make_train_step,
    place,
    plan_report,
    shard,
    sharded_init,
    sharded_jit,
    state_shardings,
)

__all__ = [
    "Shard",
    "make_train_step",
    "state_shardings",
    "format_report",
    "plan_report",
    "ShardingError",
    "ShardingPlan",
    "ShardingWarning",
    "in_shardings",
    "place",
    "shard",
    "sharded_init",
    "sharded_jit",
    "ChannelPlan",
    "Masks",
    "Prune",
    "PruneChannels",
    "StructuredPruningError",
    "activation_norms",
    "channel_plan",
    "compute_masks",
    "prune",
    "prune_channels",
    "RECIPES",
    "QuantizedModel",
    "quantize_model",
    "CalibrationError",
    "calibrate",
    "DCE",
    "ClipWeights",
    "Convert",
    "ConvertError",
    "FakeQuant",
    "FoldBatchNorm",
    "QuantRule",
    "clip_weights",
    "convert",
    "convert_params",
    "dce",
    "fake_quant",
    "fold_batchnorm",
]
