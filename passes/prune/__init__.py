"""Pruning: masks in the graph, data-driven masks, structured pruning that shrinks shapes."""

from maas_jax.passes.prune.pass_ import Masks, Prune, activation_norms, compute_masks, prune
from maas_jax.passes.prune.structured import (
    ChannelPlan,
    PruneChannels,
    StructuredPruningError,
    channel_plan,
    prune_channels,
)

__all__ = [
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
]
