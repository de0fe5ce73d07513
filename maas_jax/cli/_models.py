"""``--model SPEC``: a bundled model name or ``module:function`` (see :func:`resolve`)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BUNDLED = ("minilm",)


@dataclasses.dataclass
class ModelSpec:
    """What ``optimize`` needs: ``fn(params, *inputs)``, the float params, one example row."""

    name: str
    fn: Callable[..., Any]
    params: Any
    example_inputs: tuple[Any, ...]  # batch of one
    calibration: list[tuple[Any, ...]] | None = None  # batches of one row each


def _minilm(seq_len: int = 64) -> ModelSpec:
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tokenizer, embed_fn = load_minilm()

    def row(sentence: str) -> tuple[Any, ...]:
        b = tokenizer.encode([sentence], pad_to=seq_len)
        return (b["input_ids"], b["attention_mask"], b["token_type_ids"])

    calibration = [row(s) for s in SENTENCES[:32]]
    return ModelSpec("minilm", embed_fn, variables, calibration[0], calibration)


def resolve(spec: str) -> ModelSpec:
    """``minilm`` (bundled all-MiniLM-L6-v2, sentences padded to 64 tokens), or
    ``module:function`` / ``path/to/file.py:function`` where ``function()`` returns
    ``(fn, params, example_inputs)`` or ``(fn, params, example_inputs, calibration_batches)``
    with inputs of batch one."""
    if spec in BUNDLED:
        return _minilm()
    if ":" not in spec:
        raise SystemExit(
            f"--model {spec!r}: not a bundled model ({', '.join(BUNDLED)}) and not "
            "'module:function'"
        )
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise SystemExit(f"--model {spec!r}: no file {path}")
        sys.path.insert(0, str(path.parent))
        mod_name = path.stem
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"--model {spec!r}: cannot import {mod_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"--model {spec!r}: {mod_name} has no function {attr!r}")
    out = factory()
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise SystemExit(
            f"--model {spec!r}: {attr}() must return (fn, params, example_inputs"
            "[, calibration_batches]); got " + type(out).__name__
        )
    fn, params, example = out[:3]
    example = tuple(example) if isinstance(example, list | tuple) else (example,)
    calibration = (
        [tuple(b) if isinstance(b, tuple | list) else (b,) for b in out[3]]
        if len(out) == 4
        else None
    )
    return ModelSpec(attr, fn, params, example, calibration)


def calibration_from_file(path: str, n_inputs: int, limit: int) -> list[tuple[Any, ...]]:
    """Rows of an ``.npz`` file (arrays ``input_0``..., or in file order), one batch per row."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--calibration {path}: cannot read: {e}") from None
    names = [f"input_{i}" for i in range(n_inputs)]
    arrays = [data[n] for n in names] if all(n in data for n in names) else list(data.values())
    if len(arrays) != n_inputs:
        raise SystemExit(
            f"--calibration {path}: {len(arrays)} arrays, the model takes {n_inputs} inputs"
        )
    rows = min(len(a) for a in arrays)
    return [tuple(a[i : i + 1] for a in arrays) for i in range(min(rows, limit))]
