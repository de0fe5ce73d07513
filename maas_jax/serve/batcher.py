"""Dynamic batching: merge concurrent requests, pad to a compiled bucket, run once, slice back.

One :class:`Batcher` per served model runs as an asyncio task on the server's event loop. The
model itself runs on **one** dedicated thread (:class:`ModelThread`, a single-worker
executor shared by every model of the app), so jax never runs on the event loop and batches of
different models never run at the same time; the loop keeps accepting and queueing while a
batch computes.

The policy is Triton's dynamic batcher with TF Serving's ``allowed_batch_sizes``:

- A batch starts with the oldest waiting request and takes the following ones in arrival
  order while their rows fit in ``max_batch_size`` (order is preserved: a request that does
  not fit waits for the next batch instead of being overtaken).
- It is sent as soon as it holds ``max_batch_size`` rows, or when the oldest request has
  waited ``max_queue_delay_s``, whichever comes first. While a batch computes, the next one
  gathers, so under load the delay is rarely waited at all.
- Its rows are concatenated and run in buckets of ``model.batch_sizes``, the last one padded
  with zero rows; outputs are sliced back per request, padding dropped. Which buckets is a
  cost decision: after warmup the batcher times every bucket (:meth:`Batcher.measure_costs`)
  and runs a batch as the sequence of buckets with the least measured time (a knapsack over
  at most ``max_batch_size`` rows). Where a bigger bucket amortizes (an accelerator) that is
  one padded bucket; where it does not (a compute-bound model on a CPU, 20 rows with buckets
  1/8/32) it is 8 + 8 + 4 x 1 instead of 32 rows of which 12 are padding. Before the costs are
  measured, every batch is one bucket (the smallest that holds it).
- ``max_batch_size == 1`` (the server's ``batching=False``) runs every request alone, padded to
  the smallest bucket that holds its rows.
- At most ``max_queue_size`` requests wait; one more is refused at once
  (:class:`QueueFull`, HTTP 503 with ``Retry-After``), as Triton's queue policy and Saxml's
  max-live-batches do, so overload shows up as fast refusals rather than as a growing tail.
- Every request has a deadline. A request whose deadline passes while it waits is dropped
  before it is run and answered :class:`DeadlineExceeded` (HTTP 504); one whose deadline
  passes while its batch runs is answered 504 too (its rows are computed and discarded).

A request with more rows than the largest bucket never reaches the batcher: the protocol layer
refuses it with a 400 that names the limit (see :mod:`maas_jax.serve.protocol`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from maas_jax.serve._model import ServedModel
from maas_jax.serve.metrics import ServerMetrics
from maas_jax.serve.protocol import Rejected, numpy_dtype

__all__ = [
    "Batcher",
    "DeadlineExceeded",
    "ModelFailed",
    "ModelThread",
    "QueueFull",
    "Unavailable",
    "plan_chunks",
]

log = logging.getLogger("maas_jax.serve")
T = TypeVar("T")


class QueueFull(Rejected):
    """503: ``max_queue_size`` requests already wait for this model."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(
            503, message, reason="queue_full", headers={"Retry-After": str(retry_after_s)}
        )


class Unavailable(Rejected):
    """503: the model is not ready yet (warming up) or the server is shutting down."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(503, message, reason=reason, headers={"Retry-After": "1"})


class DeadlineExceeded(Rejected):
    """504: the request's deadline passed before its result was ready."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message, reason="deadline")


class ModelFailed(Rejected):
    """500: ``model.run`` raised or returned something malformed (a server fault)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message, reason="model_error")


class ModelThread:
    """The one thread that runs models: a single-worker executor.

    One thread because jax dispatch is itself asynchronous and parallel inside XLA; two Python
    threads calling two executables would only contend for the same cores (and, on an
    accelerator, the same device queue).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maas-jax-model")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    enqueued: float  # loop.time()
    deadline: float  # loop.time()
    future: asyncio.Future[dict[str, np.ndarray]]
    queued: bool = True
    started: float | None = field(default=None)
    budget_s: float = 0.0  # the request's whole deadline, for messages


def _bucket(batch_sizes: tuple[int, ...], rows: int) -> int:
    return next(b for b in batch_sizes if b >= rows)


SPLIT_MARGIN = 0.9  # split a batch over several buckets only when that is >10% faster


def plan_chunks(rows: int, costs: dict[int, float]) -> list[int]:
    """The bucket sizes to run ``rows`` rows in, least total cost first found (each bucket of
    ``costs`` can be used any number of times; the last one may be padded).

    >>> plan_chunks(20, {1: 15.0, 8: 97.0, 32: 417.0})   # a CPU: no amortization
    [8, 8, 1, 1, 1, 1]
    >>> plan_chunks(20, {1: 1.0, 8: 1.1, 32: 1.3})       # an accelerator: one padded bucket
    [32]
    """
    sizes = sorted(costs)
    best = [0.0] + [float("inf")] * rows  # best[n]: least cost of n rows
    choice = [0] * (rows + 1)
    for n in range(1, rows + 1):
        for b in sizes:
            c = costs[b] + best[max(0, n - b)]
            if c < best[n]:
                best[n], choice[n] = c, b
    chunks, n = [], rows
    while n > 0:
        chunks.append(choice[n])
        n -= choice[n]
    # One padded bucket unless splitting saves a clear margin: timings of tiny models are
    # noise, and one execution is simpler for everyone (metrics, tracing, the device queue).
    # Never more padding than the single bucket has: a plan that pads more is only "cheaper"
    # through timing noise (a bigger bucket is never really faster than a smaller one).
    single = next((b for b in sizes if b >= rows), None)
    if single is not None and (best[rows] >= SPLIT_MARGIN * costs[single] or sum(chunks) > single):
        return [single]
    return sorted(chunks, reverse=True)


class Batcher:
    """Queue and batch the requests of one model (create it inside the running event loop).

    Args:
      model: the model; ``model.run`` is only ever called on ``thread``.
      thread: the app's model thread.
      metrics: the app's metrics.
      max_batch_size: rows per batch at most (at most the largest bucket).
      max_queue_delay_s: how long the oldest request may wait for others to join it.
      max_queue_size: requests that may wait at once; one more gets :class:`QueueFull`.
    """

    def __init__(
        self,
        model: ServedModel,
        thread: ModelThread,
        metrics: ServerMetrics,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
    ) -> None:
        self.model = model
        self.batch_sizes = tuple(int(b) for b in model.batch_sizes)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._thread = thread
        self._labels = (model.name, model.version)
        self._m = metrics
        self._queue: deque[_Pending] = deque()
        self._waiting = 0
        self._waiting_rows = 0
        self._running = 0  # requests in the batch now in the model thread
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._label = f"model '{model.name}' version '{model.version}'"
        self.costs: dict[int, float] | None = None  # seconds per bucket, once measured
        self._plans: dict[int, list[int]] = {}

    def measure_costs(self, repeats: int = 5) -> dict[int, float]:
        """Time every bucket (best of ``repeats`` runs on zero rows, after warmup) and plan
        batches by these times from now on. Call it on the model thread."""
        costs = {}
        for b in self.batch_sizes:
            feed = {
                s.name: np.zeros((b, *s.shape[1:]), dtype=numpy_dtype(s.dtype))
                for s in self.model.inputs
            }
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.model.run(feed)
                times.append(time.perf_counter() - t0)
            costs[b] = min(times)
        self.costs = costs
        self._plans = {}
        log.info(
            "%s bucket times: %s",
            self._label,
            ", ".join(f"{b}: {c * 1e3:.2f} ms" for b, c in costs.items()),
        )
        return costs

    def _chunks(self, rows: int) -> list[int]:
        if self.costs is None:
            return [_bucket(self.batch_sizes, rows)]
        if rows not in self._plans:
            self._plans[rows] = plan_chunks(rows, self.costs)
        return self._plans[rows]

    # -- the request side -----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests in the queue now."""
        return self._waiting

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"maas-jax-batcher-{self._label}"
        )

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        timeout_s: float,
        budget_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one validated request and wait for its rows of every output.

        Raises:
          QueueFull, Unavailable, DeadlineExceeded, ModelFailed: see the module docstring.
        """
        if self._closing:
            raise Unavailable(f"the server is shutting down; {self._label} takes no new requests")
        if self._waiting >= self.max_queue_size:
            raise QueueFull(
                f"{self._label} has {self._waiting} requests waiting (max_queue_size="
                f"{self.max_queue_size}); retry later or add capacity"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        p = _Pending(inputs, rows, now, now + timeout_s, loop.create_future())
        p.budget_s = budget_s if budget_s is not None else timeout_s
        self._queue.append(p)
        self._waiting += 1
        self._waiting_rows += rows
        self._idle.clear()
        self._m.queue_depth.labels(*self._labels).set(self._waiting)
        self._wake.set()
        try:
            done, _ = await asyncio.wait({p.future}, timeout=max(0.0, p.deadline - now))
        except asyncio.CancelledError:  # the client went away
            self._abandon(p)
            raise
        if not done:
            where = "waiting in the queue" if p.queued else "while the model ran its batch"
            self._abandon(p)
            raise DeadlineExceeded(
                f"deadline exceeded: the request to {self._label} expired {where} (deadline "
                f"{p.budget_s * 1e3:.0f} ms); raise parameters.timeout_ms or the server's "
                f"request_timeout_s, or send less load"
            )
        return p.future.result()

    def _unqueue(self, p: _Pending) -> None:
        if p.queued:
            p.queued = False
            self._waiting -= 1
            self._waiting_rows -= p.rows
            self._m.queue_depth.labels(*self._labels).set(self._waiting)

    def _abandon(self, p: _Pending) -> None:
        self._unqueue(p)
        if p.future.done():
            if not p.future.cancelled():
                p.future.exception()  # mark it retrieved: nobody else will look
        else:
            p.future.cancel()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._waiting == 0 and self._running == 0:
            self._idle.set()

    # -- the batching side ----------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # abandoned by its client; already unqueued
            if not self._queue:
                self._maybe_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            flush_at = self._queue[0].enqueued + self.max_queue_delay_s
            while self._waiting_rows < self.max_batch_size and self._waiting:
                remaining = flush_at - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(loop.time())
            if batch:
                await self._run(batch)

    def _take(self, now: float) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # abandoned
                self._queue.popleft()
                continue
            if p.deadline <= now:  # expired while waiting: never run it
                self._queue.popleft()
                self._unqueue(p)
                p.future.set_exception(
                    DeadlineExceeded(
                        f"deadline exceeded: the request to {self._label} expired waiting in "
                        f"the queue (deadline {p.budget_s * 1e3:.0f} ms); raise "
                        f"parameters.timeout_ms or the server's request_timeout_s, or send less "
                        f"load"
                    )
                )
                continue
            if batch and rows + p.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._unqueue(p)
            batch.append(p)
            rows += p.rows
            if rows >= self.max_batch_size:
                break
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(p.rows for p in batch)
        chunks = self._chunks(rows)
        start = loop.time()
        for p in batch:
            self._m.queue_duration.labels(*self._labels).observe(start - p.enqueued)
        self._running = len(batch)
        try:
            results, runs = await self._thread.call(self._execute, batch, rows, chunks)
        except Exception as e:
            log.error("%s failed on a batch of %d rows", self._label, rows, exc_info=e)
            err = f"{type(e).__name__}: {e}"
            failure = ModelFailed(f"{self._label} failed: {err[:300]}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(failure)
            return
        finally:
            self._running = 0
            self._maybe_idle()
        labels = self._labels
        for used, bucket, seconds in runs:  # one execution per bucket run
            self._m.exec_count.labels(*labels).inc()
            self._m.inference_count.labels(*labels).inc(used)
            self._m.padding_rows.labels(*labels).inc(bucket - used)
            self._m.batch_size.labels(*labels).observe(used)
            self._m.compute_duration.labels(*labels).observe(seconds)
        for p, res in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(res)

    def _execute(
        self, batch: list[_Pending], rows: int, chunks: list[int]
    ) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, int, float]]]:
        """In the model thread: concatenate, run bucket by bucket (the last one padded with
        zero rows), check, slice back per request. Returns the per-request results and
        ``(rows used, bucket, seconds)`` of every run."""
        feed = {}
        for spec in self.model.inputs:
            parts = [p.inputs[spec.name] for p in batch]
            feed[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        pieces: dict[str, list[np.ndarray]] = {spec.name: [] for spec in self.model.outputs}
        runs, offset = [], 0
        for bucket in chunks:
            t0 = time.perf_counter()
            used = min(bucket, rows - offset)
            part = {}
            for name, arr in feed.items():
                part[name] = arr[offset : offset + used]
                if bucket > used:
                    pad = np.zeros((bucket - used, *arr.shape[1:]), arr.dtype)
                    part[name] = np.concatenate([part[name], pad])
            out = self.model.run(part)
            for spec in self.model.outputs:
                if spec.name not in out:
                    raise RuntimeError(
                        f"run() returned no output {spec.name!r} (got {sorted(out)})"
                    )
                with np.errstate(all="ignore"):
                    arr = np.asarray(out[spec.name]).astype(numpy_dtype(spec.dtype), copy=False)
                if arr.ndim == 0 or arr.shape[0] != bucket:
                    raise RuntimeError(
                        f"run() returned output {spec.name!r} of shape {list(arr.shape)} for a "
                        f"batch of {bucket} rows"
                    )
                pieces[spec.name].append(arr[:used])
            runs.append((used, bucket, time.perf_counter() - t0))
            offset += used
        checked = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in pieces.items()}
        results, offset = [], 0
        for p in batch:
            results.append({k: v[offset : offset + p.rows] for k, v in checked.items()})
            offset += p.rows
        return results, runs

    # -- shutdown --------------------------------------------------------------------------

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the queued and running ones finish, stop the task."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except TimeoutError:
            log.error(
                "%s: %d requests still queued after %.0f s of shutdown; answering 503",
                self._label,
                self._waiting,
                drain_timeout_s,
            )
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            p = self._queue.popleft()
            self._unqueue(p)
            if not p.future.done():
                p.future.set_exception(Unavailable("the server shut down before running it"))
