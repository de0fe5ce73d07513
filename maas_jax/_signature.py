"""A served tensor's name, dtype and shape: shared by artifacts and the server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape[0] == -1`` is the batch dimension."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int32", "int8", "bool", ...
    shape: tuple[int, ...]
