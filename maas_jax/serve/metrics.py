"""Prometheus metrics of one server, named after Triton's so its dashboards read the same.

Each app gets its own :class:`prometheus_client.CollectorRegistry`, so several servers in one
process (tests, benchmarks) do not clash in the global registry.

Whether batching works is visible as ``maas_jax_inference_count_total`` (rows inferred) against
``maas_jax_inference_exec_count_total`` (batches run): their ratio is the mean batch, as with
Triton's ``nv_inference_count / nv_inference_exec_count``; ``maas_jax_batch_size`` is its
histogram and ``maas_jax_inference_padding_rows_total`` counts the zero rows added to reach a
compiled bucket.

>>> m = ServerMetrics()
>>> m.exec_count.labels("m", "1").inc()
>>> b"maas_jax_inference_exec_count_total" in m.render()[0]
True
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_MODEL = ("model", "version")
# Seconds, from 0.1 ms (a cached tiny model) to 60 s (a deadline).
_TIME_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics:
    """The counters, histograms and gauges of one app, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_success = Counter(
            "maas_jax_request_success",
            "Inference requests answered with 200.",
            _MODEL,
            registry=r,
        )
        self.request_failure = Counter(
            "maas_jax_request_failure",
            "Inference requests that failed, by reason and HTTP status "
            "(model and version are empty for unknown models).",
            (*_MODEL, "reason", "code"),
            registry=r,
        )
        self.inference_count = Counter(
            "maas_jax_inference_count",
            "Rows inferred (a request of n rows counts n; padding rows are not counted).",
            _MODEL,
            registry=r,
        )
        self.exec_count = Counter(
            "maas_jax_inference_exec_count",
            "Batches run by the model (one model.run call each).",
            _MODEL,
            registry=r,
        )
        self.padding_rows = Counter(
            "maas_jax_inference_padding_rows",
            "Zero rows added to fill batches up to a compiled batch size.",
            _MODEL,
            registry=r,
        )
        self.batch_size = Histogram(
            "maas_jax_batch_size",
            "Rows of real requests per executed batch (before padding).",
            _MODEL,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "maas_jax_queue_duration_seconds",
            "Time a request waited in the batch queue before its batch started.",
            _MODEL,
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "maas_jax_compute_duration_seconds",
            "Time of one batch in the model thread (concatenate, pad, model.run, slice).",
            _MODEL,
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "maas_jax_request_duration_seconds",
            "Time from receiving an inference request to its response, for known models.",
            _MODEL,
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "maas_jax_queue_depth",
            "Requests waiting in the batch queue.",
            _MODEL,
            registry=r,
        )
        self.model_ready = Gauge(
            "maas_jax_model_ready",
            "1 once the model's every batch size is compiled and warmed up.",
            _MODEL,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
