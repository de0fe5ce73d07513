"""maas_jax.serve: an Open Inference Protocol (KServe v2) model server with dynamic batching.

- :func:`create_app` builds a Starlette app around models that follow :class:`ServedModel`
  (an exported artifact from :func:`maas_jax.export.load`, or :func:`from_callable`);
  :func:`serve` runs it with uvicorn (one process, one worker, graceful shutdown).
- Requests from many clients are merged into batches padded to the model's compiled batch
  sizes (:mod:`maas_jax.serve.batcher`); jax runs on one dedicated thread, never on the event
  loop.
- REST per the Open Inference Protocol, plus Triton's binary tensor extension, so
  ``tritonclient.http`` and ``perf_analyzer`` work unchanged (:mod:`maas_jax.serve.protocol`).
- API keys (SHA-256 digests, constant-time compare, deny by default:
  :mod:`maas_jax.serve.auth`), body/type/shape limits, Prometheus ``/metrics``, JSON access
  logs on ``maas_jax.serve.access``, and a hand-written ``/openapi.json``.
- :class:`Client`: numpy in, numpy out.

>>> import numpy as np
>>> from maas_jax.serve import TensorSpec, create_app, from_callable
>>> model = from_callable(lambda x: {"y": x + 1}, name="inc",
...                       inputs=[TensorSpec("x", "int32", (-1, 4))],
...                       outputs=[TensorSpec("y", "int32", (-1, 4))], batch_sizes=(1, 8))
>>> app = create_app([model], api_keys=["secret"], max_queue_delay_ms=2.0)
>>> # serve([model], port=8000)  # blocks; Ctrl-C drains in-flight requests and exits
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from maas_jax.serve._model import CallableModel, ServedModel, TensorSpec, from_callable

# The server half (starlette, uvicorn, httpx, prometheus-client: the ``serve`` extra) loads on
# first use, so ``import maas_jax.serve._model`` (done by maas_jax.export) stays light.
_LAZY = {
    "create_app": "maas_jax.serve.app",
    "make_server": "maas_jax.serve.app",
    "serve": "maas_jax.serve.app",
    "serve_in_thread": "maas_jax.serve.app",
    "load_api_keys": "maas_jax.serve.auth",
    "Client": "maas_jax.serve.client",
    "ServeError": "maas_jax.serve.client",
}

if TYPE_CHECKING:
    from maas_jax.serve.app import create_app, make_server, serve, serve_in_thread
    from maas_jax.serve.auth import load_api_keys
    from maas_jax.serve.client import Client, ServeError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'maas_jax.serve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CallableModel",
    "Client",
    "ServeError",
    "ServedModel",
    "TensorSpec",
    "create_app",
    "from_callable",
    "load_api_keys",
    "make_server",
    "serve",
    "serve_in_thread",
]
