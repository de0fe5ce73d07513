"""Parameter paths: ``params/Dense_0/kernel`` from a pytree key path, boxes stripped.

Flax wraps some leaves in boxes: Linen's ``nn.Partitioned`` / ``nn.LogicallyPartitioned``
(metadata: logical axis ``names``) and NNX ``Variable``s (type: ``Param``, ``BatchStat``; metadata:
``sharding``/``sharding_names``). A box adds a ``value`` key to the key path; users think of
``params/Dense_0/kernel``, not ``params/Dense_0/kernel/value``, so boxes are flattened
separately and their own keys dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array leaf of a pytree, with its path and what its Flax box (if any) says."""

    path: str
    value: Any
    box_type: str | None = None
    logical_axes: tuple[str | None, ...] | None = None


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def key_path_str(key_path: tuple[Any, ...]) -> str:
    """``(DictKey('params'), DictKey('Dense_0'), DictKey('kernel'))`` -> ``params/Dense_0/kernel``."""
    return "/".join(_key_str(k) for k in key_path)


def _box_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from flax.core import meta

        classes.append(meta.AxisMetadata)
    except ImportError:  # flax is a dependency, but keep pure-jax users working without it
        pass
    try:
        from flax import nnx

        classes.append(nnx.Variable)
    except ImportError:
        pass
    return tuple(classes)


def _box_logical_axes(box: Any) -> tuple[str | None, ...] | None:
    names = getattr(box, "names", None)  # Linen Partitioned / LogicallyPartitioned
    if names is None:
        meta = getattr(box, "get_metadata", None)
        md = meta() if callable(meta) else {}
        names = md.get("sharding_names") or md.get("sharding") or md.get("out_sharding")
    if names is None:
        return None
    if not isinstance(names, tuple | list) or not all(
        isinstance(n, str) or n is None for n in names
    ):
        return None
    return tuple(names)


def flatten_leaves(tree: Any) -> list[Leaf]:
    """Flatten ``tree`` in jax's leaf order, naming each leaf by its box-free path.

    >>> import jax.numpy as jnp
    >>> [leaf.path for leaf in flatten_leaves({"params": {"w": jnp.ones(2)}, "b": jnp.zeros(1)})]
    ['b', 'params/w']
    """
    boxes = _box_classes()
    is_box = (lambda x: isinstance(x, boxes)) if boxes else None
    out: list[Leaf] = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        path = key_path_str(key_path)
        if boxes and isinstance(node, boxes):
            inner = jax.tree_util.tree_leaves(node)
            axes = _box_logical_axes(node)
            for i, value in enumerate(inner):
                # A box normally holds one array; name extra ones by position.
                out.append(
                    Leaf(
                        path if len(inner) == 1 else f"{path}/{i}",
                        value,
                        type(node).__name__,
                        axes if np.ndim(value) == len(axes or ()) else None,
                    )
                )
        else:
            out.append(Leaf(path, node))
    return out


def describe_value(x: Any) -> str:
    """``f32[4,8]`` for arrays, the type name otherwise (for error messages)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{np.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"
    return type(x).__name__
