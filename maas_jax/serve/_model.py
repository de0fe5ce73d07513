"""What the server needs of a model: a signature and a batched call.

An exported artifact (:func:`maas_jax.export.load`) implements this; so does
:func:`from_callable`, which wraps any numpy-in / numpy-out function (tests, custom models).
The server never sees jax: it pads requests to one of ``batch_sizes`` and calls ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from maas_jax._signature import TensorSpec


class ServedModel(Protocol):
    """The interface :mod:`maas_jax.serve` serves.

    ``run`` takes every input with the same leading batch size, which is one of
    ``batch_sizes``, and returns every output with that leading size. It is called from one
    thread only (the server's model thread). ``warmup`` compiles and runs every bucket once.
    """

    name: str
    version: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    batch_sizes: Sequence[int]  # ascending compiled buckets; the last is the largest batch

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def warmup(self) -> None: ...


@dataclass
class CallableModel:
    """A :class:`ServedModel` around a plain function (see :func:`from_callable`)."""

    name: str
    version: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    batch_sizes: Sequence[int]
    fn: Callable[..., Mapping[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.fn(**inputs)
        return {spec.name: np.asarray(out[spec.name]) for spec in self.outputs}

    def warmup(self) -> None:
        for b in self.batch_sizes:
            self.run(
                {s.name: np.zeros((b, *s.shape[1:]), dtype=np.dtype(s.dtype)) for s in self.inputs}
            )


def from_callable(
    fn: Callable[..., Mapping[str, Any]],
    *,
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    batch_sizes: Sequence[int] = (1, 8, 32),
    version: str = "1",
) -> CallableModel:
    """Serve ``fn(**inputs) -> {output name: array}``.

    >>> import numpy as np
    >>> m = from_callable(lambda x: {"y": x * 2}, name="double",
    ...                   inputs=[TensorSpec("x", "float32", (-1, 3))],
    ...                   outputs=[TensorSpec("y", "float32", (-1, 3))], batch_sizes=(1, 4))
    >>> m.run({"x": np.ones((4, 3), np.float32)})["y"].shape
    (4, 3)
    """
    return CallableModel(name, version, list(inputs), list(outputs), tuple(sorted(batch_sizes)), fn)
