"""The ASGI app: Open Inference Protocol routes, lifespan (warmup, drain), limits and logs.

Layers, outermost first (each one pure ASGI, so nothing buffers a body it need not):

1. :class:`AccessLogMiddleware`: one JSON line per request on ``maas_jax.serve.access``.
2. :class:`~maas_jax.serve.auth.APIKeyMiddleware`: deny by default when keys are configured.
3. :class:`BodyLimitMiddleware`: 413 on ``Content-Length`` before reading, and again while
   counting streamed (chunked) bytes. Starlette's own ``max_body_size`` answers in
   ``text/plain`` and replaces whatever the app answered when the declared length is too big;
   the OIP error body is JSON, so this two-stage check (Triton's) is done here.
4. Starlette's router; every handler turns client mistakes into 4xx ``{"error": ...}`` and
   only a genuine server fault (``model.run`` raising) into a 500.

The lifespan starts one :class:`~maas_jax.serve.batcher.Batcher` per model and warms every
model up (every bucket compiled and run once) **in the model thread**, in the background: the
server answers ``/v2/health/live`` at once, and ``/v2/health/ready`` turns true only when every
warmup is done. At shutdown (uvicorn stops accepting, then waits up to
``timeout_graceful_shutdown`` for in-flight requests) the batchers drain and the model thread
stops.

>>> import numpy as np
>>> from maas_jax.serve import Client, TensorSpec, from_callable, serve_in_thread
>>> m = from_callable(lambda x: {"y": x * 2}, name="double",
...                   inputs=[TensorSpec("x", "float32", (-1, 2))],
...                   outputs=[TensorSpec("y", "float32", (-1, 2))], batch_sizes=(1, 4))
>>> with serve_in_thread([m]) as server, Client(server.url) as client:
...     client.infer("double", {"x": np.array([[1, 2]], np.float32)})["y"].tolist()
[[2.0, 4.0]]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas_jax.serve._model import ServedModel
from maas_jax.serve.auth import APIKeyMiddleware, hash_keys
from maas_jax.serve.batcher import Batcher, ModelThread, Unavailable
from maas_jax.serve.metrics import ServerMetrics
from maas_jax.serve.openapi import openapi_document
from maas_jax.serve.protocol import (
    Rejected,
    Signature,
    encode_infer_response,
    oip_datatype,
    parse_infer_request,
)

__all__ = ["create_app", "make_server", "serve", "serve_in_thread"]

log = logging.getLogger("maas_jax.serve")
access_log = logging.getLogger("maas_jax.serve.access")

_SERVER_NAME = "maas_jax"
_EXTENSIONS = ["binary_tensor_data", "model_versions", "metrics"]
_MODEL_SCOPE_KEY = "maas_jax.model"
# Bodies and outputs above this are parsed / encoded on a worker thread so the event loop
# keeps accepting and batching (json of a few MiB takes tens of milliseconds).
_OFFLOAD_BYTES = 1 << 20
_OFFLOAD_ELEMENTS = 1 << 18


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("maas_jax")
    except Exception:  # not installed (a source checkout on sys.path)
        return "0.1.0"


def _version_key(v: str) -> tuple[int, int, str]:
    # Numeric versions compare as numbers ("10" > "9") and above non-numeric ones.
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


# -- middleware -------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """Raised by the wrapped ``receive`` once a streamed body passes the limit."""


def _error_message(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 ``{"error": ...}`` for bodies over ``max_body_bytes``, declared or streamed."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return (
            f"request body larger than the server's limit of {self.max_body_bytes} bytes "
            f"(max_body_bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:  # stage 1: refuse before reading a byte
                    await _error_message(413, self._message())(scope, receive, send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # stage 2: chunked bodies, counted as they stream in
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _error_message(413, self._message())(scope, receive, send)


class AccessLogMiddleware:
    """One JSON line per HTTP request: method, path, status, duration_ms, model, client.

    Headers are never logged (they carry the API key); neither are query strings.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    json.dumps(
                        {
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "status": status,
                            "duration_ms": round((time.perf_counter() - t0) * 1e3, 3),
                            "model": scope.get(_MODEL_SCOPE_KEY),
                            "client": f"{client[0]}:{client[1]}" if client else None,
                        }
                    )
                )


# -- the server state -------------------------------------------------------------------------


class _Entry:
    """One served (name, version): the model, its signature, its batcher, its readiness."""

    def __init__(self, model: ServedModel, max_batch_size: int) -> None:
        self.model = model
        self.sig = Signature(
            model.name,
            model.version,
            list(model.inputs),
            list(model.outputs),
            tuple(int(b) for b in model.batch_sizes),
        )
        self.max_batch_size = max_batch_size
        self.batcher: Batcher | None = None
        self.ready = False
        self.warmup_error: str | None = None


class _Server:
    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        secured: bool,
        max_batch_size: int | None,
        max_queue_delay_ms: float,
        max_queue_size: int,
        request_timeout_s: float,
        batching: bool,
        bucket_plan: str = "cost",
    ) -> None:
        self.secured = secured
        self.plan_by_cost = bucket_plan == "cost"
        self.max_queue_delay_s = max_queue_delay_ms / 1e3 if batching else 0.0
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.metrics = ServerMetrics()
        self.entries: dict[str, dict[str, _Entry]] = {}
        for model in models:
            buckets = _check_model(model)
            largest = buckets[-1]
            mbs = largest if max_batch_size is None else min(max_batch_size, largest)
            if max_batch_size is not None and max_batch_size > largest:
                log.warning(
                    "max_batch_size=%d is larger than the largest batch size %d of model "
                    "'%s' version '%s': using %d for it",
                    max_batch_size,
                    largest,
                    model.name,
                    model.version,
                    largest,
                )
            if not batching:
                mbs = 1
            versions = self.entries.setdefault(model.name, {})
            if model.version in versions:
                raise ValueError(
                    f"create_app: model '{model.name}' version '{model.version}' is given twice; "
                    f"give each (name, version) once"
                )
            versions[model.version] = _Entry(model, mbs)
            self.metrics.model_ready.labels(model.name, model.version).set(0)
        self.thread: ModelThread | None = None
        self._warmup: asyncio.Task[None] | None = None
        self.openapi = openapi_document(
            [e.sig for e in self.all_entries()], secured=secured, server_version=_server_version()
        )

    def all_entries(self) -> list[_Entry]:
        return [e for versions in self.entries.values() for e in versions.values()]

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.all_entries())

    def lookup(self, name: str, version: str | None) -> _Entry:
        versions = self.entries.get(name)
        if versions is None:
            served = "; ".join(
                f"{n} (versions {', '.join(sorted(v, key=_version_key))})"
                for n, v in sorted(self.entries.items())
            )
            raise Rejected(404, f"unknown model {name!r}; served: {served}", reason="unknown_model")
        if version is None:
            return versions[max(versions, key=_version_key)]
        entry = versions.get(version)
        if entry is None:
            raise Rejected(
                404,
                f"model {name!r} has no version {version!r}; its versions: "
                f"{', '.join(sorted(versions, key=_version_key))}",
                reason="unknown_model",
            )
        return entry

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        if not self.secured:
            log.warning(
                "maas_jax.serve: no API keys configured: every route is open to anyone who can "
                "reach this port (pass api_keys= or set MAAS_JAX_API_KEYS)"
            )
        self.thread = ModelThread()
        for e in self.all_entries():
            e.batcher = Batcher(
                e.model,
                self.thread,
                self.metrics,
                max_batch_size=e.max_batch_size,
                max_queue_delay_s=self.max_queue_delay_s,
                max_queue_size=self.max_queue_size,
            )
            e.batcher.start()
        # Warm up in the background so /v2/health/live answers during compilation.
        self._warmup = asyncio.get_running_loop().create_task(self._warm_all(app))
        try:
            yield
        finally:
            if self._warmup is not None and not self._warmup.done():
                self._warmup.cancel()
            for e in self.all_entries():
                if e.batcher is not None:
                    await e.batcher.close(drain_timeout_s=self.request_timeout_s)
                e.ready = False
            app.state.ready = False
            self.thread.shutdown(wait=False)

    async def _warm_all(self, app: Starlette) -> None:
        assert self.thread is not None
        for e in self.all_entries():
            t0 = time.perf_counter()
            try:
                await self.thread.call(e.model.warmup)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                e.warmup_error = f"{type(exc).__name__}: {exc}"
                log.error("warmup of %s failed; it stays not ready", e.sig.label, exc_info=exc)
                continue
            if e.batcher is not None and self.plan_by_cost:
                try:
                    await self.thread.call(e.batcher.measure_costs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the model still serves, one bucket per batch
                    log.warning(
                        "%s: timing the buckets failed (%s: %s); every batch runs as one bucket",
                        e.sig.label,
                        type(exc).__name__,
                        exc,
                    )
            e.ready = True
            self.metrics.model_ready.labels(e.sig.name, e.sig.version).set(1)
            log.info(
                "%s ready: batch sizes %s warmed up in %.2f s",
                e.sig.label,
                list(e.sig.batch_sizes),
                time.perf_counter() - t0,
            )
        app.state.ready = self.ready


def _check_model(model: ServedModel) -> tuple[int, ...]:
    for attr in ("name", "version", "inputs", "outputs", "batch_sizes", "run", "warmup"):
        if not hasattr(model, attr):
            raise TypeError(
                f"create_app: {model!r} has no {attr!r}; serve objects implementing "
                f"maas_jax.serve.ServedModel (e.g. from_callable(...) or export.load(...))"
            )
    buckets = tuple(int(b) for b in model.batch_sizes)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(
            f"create_app: model '{model.name}' batch_sizes must be ascending positive integers, "
            f"got {list(model.batch_sizes)}"
        )
    for spec in (*model.inputs, *model.outputs):
        oip_datatype(spec.dtype)  # raises a ValueError naming the dtype
        if not spec.shape or spec.shape[0] != -1:
            raise ValueError(
                f"create_app: model '{model.name}' tensor {spec.name!r} has shape "
                f"{list(spec.shape)}; the first dimension must be -1 (the batch)"
            )
    return buckets


# -- handlers ---------------------------------------------------------------------------------


def _state(request: Request) -> _Server:
    return request.app.state.maas


def _rejected(r: Rejected) -> Response:
    return _error_message(r.status, r.message, r.headers)


def _guard(handler):
    """Answer Rejected as its status; anything else unexpected is logged and is a 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Rejected as r:
            return _rejected(r)
        except Exception as exc:
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
            return _error_message(500, "internal server error")

    wrapped.__name__ = handler.__name__
    return wrapped


@_guard
async def server_metadata(request: Request) -> Response:
    return JSONResponse(
        {"name": _SERVER_NAME, "version": _server_version(), "extensions": _EXTENSIONS}
    )


@_guard
async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


@_guard
async def server_ready(request: Request) -> Response:
    ready = _state(request).ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _entry(request: Request) -> _Entry:
    p = request.path_params
    request.scope[_MODEL_SCOPE_KEY] = p["model_name"]
    return _state(request).lookup(p["model_name"], p.get("model_version"))


@_guard
async def model_metadata(request: Request) -> Response:
    e = _entry(request)
    server = _state(request)
    sig = e.sig
    params = {
        "batch_sizes": list(sig.batch_sizes),
        "max_batch_size": e.max_batch_size,
        "max_queue_delay_ms": server.max_queue_delay_s * 1e3,
        "max_queue_size": server.max_queue_size,
    }
    extra = getattr(e.model, "metadata", None)
    if isinstance(extra, dict) and extra:
        params["metadata"] = _jsonable(extra)
    return JSONResponse(
        {
            "name": sig.name,
            "versions": sorted(server.entries[sig.name], key=_version_key),
            "platform": _SERVER_NAME,
            "inputs": [_tensor(s) for s in sig.inputs],
            "outputs": [_tensor(s) for s in sig.outputs],
            "parameters": params,
        }
    )


def _tensor(spec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": oip_datatype(spec.dtype), "shape": list(spec.shape)}


@_guard
async def model_ready(request: Request) -> Response:
    e = _entry(request)
    body = {"name": e.sig.name, "version": e.sig.version, "ready": e.ready}
    return JSONResponse(body, status_code=200 if e.ready else 503)


_MEDIA_TYPES = ("application/json", "application/octet-stream")


async def infer(request: Request) -> Response:
    server = _state(request)
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + server.request_timeout_s
    labels = ("", "")
    try:
        e = _entry(request)
        labels = (e.sig.name, e.sig.version)
        if not e.ready or e.batcher is None:
            why = f" (warmup failed: {e.warmup_error})" if e.warmup_error else " (warming up)"
            raise Unavailable(f"{e.sig.label} is not ready{why}", reason="not_ready")
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";", 1)[0].strip().lower()
            if media not in _MEDIA_TYPES:
                raise Rejected(
                    415,
                    f"Content-Type {media!r} is not supported; send application/json, or "
                    f"application/octet-stream with the Inference-Header-Content-Length header "
                    f"(binary tensor extension)",
                    reason="unsupported_media_type",
                )
        header_length = None
        raw_len = request.headers.get("inference-header-content-length")
        if raw_len is not None:
            try:
                header_length = int(raw_len)
            except ValueError:
                raise Rejected(
                    400, f"Inference-Header-Content-Length must be an integer, got {raw_len!r}"
                ) from None
        try:
            body = await request.body()
        except BodyTooLarge:
            limit = request.app.state.max_body_bytes
            raise Rejected(
                413,
                f"request body larger than the server's limit of {limit} bytes (max_body_bytes)",
                reason="too_large",
            ) from None
        if len(body) > _OFFLOAD_BYTES:
            req = await asyncio.to_thread(parse_infer_request, body, header_length, e.sig)
        else:
            req = parse_infer_request(body, header_length, e.sig)
        timeout_s = deadline - loop.time()
        if req.timeout_s is not None:
            timeout_s = min(timeout_s, req.timeout_s)
        budget = server.request_timeout_s
        if req.timeout_s is not None:
            budget = min(budget, req.timeout_s)
        outputs = await e.batcher.infer(req.inputs, req.rows, timeout_s, budget_s=budget)
        elements = sum(outputs[n].size for n, _ in req.outputs)
        if elements > _OFFLOAD_ELEMENTS:
            payload, header_len = await asyncio.to_thread(
                encode_infer_response, e.sig, req, outputs
            )
        else:
            payload, header_len = encode_infer_response(e.sig, req, outputs)
        server.metrics.request_success.labels(*labels).inc()
        if header_len is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_len)},
        )
    except Rejected as r:
        server.metrics.request_failure.labels(*labels, r.reason, str(r.status)).inc()
        return _rejected(r)
    except Exception as exc:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        server.metrics.request_failure.labels(*labels, "internal", "500").inc()
        return _error_message(500, "internal server error")
    finally:
        if labels[0]:
            elapsed = time.perf_counter() - t0
            server.metrics.request_duration.labels(*labels).observe(elapsed)


@_guard
async def metrics(request: Request) -> Response:
    body, ctype = _state(request).metrics.render()
    return Response(body, headers={"Content-Type": ctype})


@_guard
async def openapi(request: Request) -> Response:
    return JSONResponse(_state(request).openapi)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; see /openapi.json for the routes"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = (
            f"method {request.method} is not allowed on {request.url.path!r} (allowed: {allowed})"
        )
    else:
        message = str(exc.detail)
    return _error_message(exc.status_code, message, dict(exc.headers or {}))


# -- public API -------------------------------------------------------------------------------


def create_app(
    models: Sequence[ServedModel],
    *,
    api_keys: Sequence[str] | None = None,
    max_batch_size: int | None = None,
    max_queue_delay_ms: float = 5.0,
    max_queue_size: int = 256,
    request_timeout_s: float = 30.0,
    max_body_bytes: int = 64 * 2**20,
    batching: bool = True,
    bucket_plan: str = "cost",
) -> Starlette:
    """A Starlette app serving ``models`` over the Open Inference Protocol (KServe v2) REST.

    Args:
      models: the models (:class:`~maas_jax.serve.ServedModel`); several names, and several
        versions of one name (a request without a version gets the highest).
      api_keys: plain keys; only their SHA-256 digests are kept. ``None`` or empty: an open
        server (a warning is logged at startup).
      max_batch_size: rows per batch at most; default (and upper bound) each model's largest
        batch size.
      max_queue_delay_ms: how long the oldest waiting request may wait for others to join.
      max_queue_size: requests that may wait per model; more get 503 with ``Retry-After``.
      request_timeout_s: every request's deadline (a request may shorten its own with
        ``parameters.timeout_ms``); past it the answer is 504.
      max_body_bytes: larger bodies get 413 (declared or streamed).
      batching: ``False`` runs every request alone (as ``max_batch_size=1`` does).
      bucket_plan: ``"cost"`` (default): time every bucket after warmup and run each batch as
        the buckets with the least measured time (see :mod:`maas_jax.serve.batcher`);
        ``"single"``: every batch is one bucket, the smallest that holds it.
    """
    if bucket_plan not in ("cost", "single"):
        raise ValueError(f"create_app: bucket_plan must be 'cost' or 'single', got {bucket_plan!r}")
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise ValueError(
            f"create_app: max_batch_size must be a positive int, got {max_batch_size!r}"
        )
    if not max_queue_delay_ms >= 0:
        raise ValueError(f"create_app: max_queue_delay_ms must be >= 0, got {max_queue_delay_ms!r}")
    if not isinstance(max_queue_size, int) or max_queue_size < 1:
        raise ValueError(
            f"create_app: max_queue_size must be a positive int, got {max_queue_size!r}"
        )
    if not request_timeout_s > 0:
        raise ValueError(f"create_app: request_timeout_s must be > 0, got {request_timeout_s!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(
            f"create_app: max_body_bytes must be a positive int, got {max_body_bytes!r}"
        )
    if not models:
        raise ValueError("create_app: give at least one model to serve")
    if isinstance(api_keys, str):
        raise TypeError("create_app: api_keys is a list of keys, not one string; pass [key]")
    digests = hash_keys(api_keys or ())
    server = _Server(
        models,
        secured=bool(digests),
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        max_queue_size=max_queue_size,
        request_timeout_s=request_timeout_s,
        batching=batching,
        bucket_plan=bucket_plan,
    )
    infer_route = {"endpoint": infer, "methods": ["POST"]}
    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route("/v2/models/{model_name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model_name}/versions/{model_version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model_name}/ready", model_ready, methods=["GET"]),
        Route(
            "/v2/models/{model_name}/versions/{model_version}/ready", model_ready, methods=["GET"]
        ),
        Route("/v2/models/{model_name}/infer", **infer_route),
        Route("/v2/models/{model_name}/versions/{model_version}/infer", **infer_route),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(AccessLogMiddleware),
            Middleware(APIKeyMiddleware, digests=digests),
            Middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes),
        ],
        exception_handlers={HTTPException: _http_exception},
        lifespan=server.lifespan,
    )
    app.state.maas = server
    app.state.max_body_bytes = max_body_bytes
    app.state.ready = False  # True once every model's warmup() ran (see /v2/health/ready)
    return app


def make_server(
    app_or_models: Starlette | Sequence[ServedModel],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    timeout_graceful_shutdown: float = 30.0,
    log_level: str = "info",
    **app_kwargs: Any,
):
    """A :class:`uvicorn.Server` for the app (one process, one worker, lifespan on).

    One worker on purpose: each worker would hold the model and compile its own executables.
    ``timeout_graceful_shutdown`` bounds how long in-flight requests may finish after a
    SIGINT/SIGTERM (or ``server.should_exit = True``) once new connections are refused.
    """
    import uvicorn

    app = (
        app_or_models
        if isinstance(app_or_models, Starlette)
        else create_app(app_or_models, **app_kwargs)
    )
    if app_kwargs and isinstance(app_or_models, Starlette):
        raise TypeError(f"make_server: app options {sorted(app_kwargs)} need models, not an app")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        lifespan="on",
        loop="asyncio",
        access_log=False,  # ours is structured, on maas_jax.serve.access
        log_level=log_level,
        timeout_graceful_shutdown=timeout_graceful_shutdown,  # type: ignore[arg-type]
    )
    return uvicorn.Server(config)


def serve(
    models: Sequence[ServedModel],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    timeout_graceful_shutdown: float = 30.0,
    log_level: str = "info",
    **kw: Any,
) -> None:
    """Serve ``models`` with uvicorn until SIGINT/SIGTERM, then drain and exit.

    ``**kw`` are :func:`create_app`'s options (``api_keys``, ``max_batch_size``, ...).
    """
    make_server(
        models,
        host,
        port,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        log_level=log_level,
        **kw,
    ).run()


@contextlib.contextmanager
def serve_in_thread(
    app_or_models: Starlette | Sequence[ServedModel],
    *,
    host: str = "127.0.0.1",
    wait_ready: bool = True,
    timeout_s: float = 60.0,
    timeout_graceful_shutdown: float = 10.0,
    log_level: str = "warning",
    **app_kwargs: Any,
) -> Iterator[Any]:
    """Run a server on a free port in a background thread (tests, benchmarks, notebooks).

    Yields the :class:`uvicorn.Server`, with its base URL as ``server.url``; on exit asks it to
    shut down gracefully and joins the thread. With ``wait_ready`` it returns only once
    ``/v2/health/ready`` would answer 200.
    """
    import httpx

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = make_server(
        app_or_models,
        host,
        port,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        log_level=log_level,
        **app_kwargs,
    )
    server.url = f"http://{host}:{port}"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 (reported to the caller below)
            errors.append(e)

    thread = threading.Thread(target=run, name=f"maas-jax-serve-{port}", daemon=True)
    thread.start()
    server.thread = thread
    t_end = time.monotonic() + timeout_s
    try:
        while not server.started:
            if errors or not thread.is_alive():
                raise RuntimeError(f"the server did not start: {errors[:1]!r}")
            if time.monotonic() > t_end:
                raise TimeoutError(f"the server did not start within {timeout_s} s")
            time.sleep(0.01)
        if wait_ready:
            with httpx.Client(base_url=server.url, timeout=5.0) as c:
                while c.get("/v2/health/ready").status_code != 200:
                    if time.monotonic() > t_end:
                        raise TimeoutError(f"the server was not ready within {timeout_s} s")
                    time.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_graceful_shutdown + 10)
        sock.close()
