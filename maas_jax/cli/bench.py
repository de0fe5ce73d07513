"""``maas-jax bench URL --model M``: a bounded load test against a running server.

``concurrency`` client threads each send one request at a time (``rows`` rows each) until
``duration`` seconds or ``max_requests`` requests have passed; it reports throughput, the
p50/p90/p99 latency and every failure by status. Only the URL given is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from maas_jax.cli._args import positive


def load_test(
    url: str,
    model: str,
    feed: Callable[[int], Mapping[str, np.ndarray]],
    *,
    concurrency: int = 32,
    duration_s: float = 10.0,
    max_requests: int = 100_000,
    api_key: str | None = None,
    binary: bool = True,
) -> dict[str, Any]:
    """Run the load test; ``feed(i)`` gives request ``i``'s inputs. Returns the figures."""
    from maas_jax.serve import Client, ServeError

    latencies: list[float] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + duration_s

    def worker() -> None:
        with Client(url, api_key=api_key, binary=binary) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    client.infer(model, dict(feed(i)))
                except ServeError as e:
                    with lock:
                        failures[str(e.status)] = failures.get(str(e.status), 0) + 1
                    continue
                except Exception as e:  # connection errors count, they do not stop the test
                    with lock:
                        failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 60)
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "failures": failures,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(pct(50), 2),
        "p90_ms": round(pct(90), 2),
        "p99_ms": round(pct(99), 2),
    }


def synthetic_feed(metadata: Mapping[str, Any], rows: int, seed: int = 0) -> Callable[[int], Any]:
    """Inputs shaped as the model's metadata says: normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(16):
        req = {}
        for spec in metadata["inputs"]:
            shape = [rows, *spec["shape"][1:]]
            dtype = _NUMPY[spec["datatype"]]
            if np.issubdtype(dtype, np.floating):
                req[spec["name"]] = rng.normal(size=shape).astype(dtype)
            elif dtype == np.bool_:
                req[spec["name"]] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                req[spec["name"]] = rng.integers(0, 2, size=shape).astype(dtype)
        pool.append(req)
    return lambda i: pool[i % len(pool)]


_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="bounded load test against a running server")
    p.add_argument("url", help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=positive(int), default=32)
    p.add_argument("--duration", type=positive(float), default=10.0, help="seconds (default 10)")
    p.add_argument("--max-requests", type=positive(int), default=100_000)
    p.add_argument("--rows", type=positive(int), default=1, help="rows per request")
    p.add_argument("--json-out", help="write the figures here as JSON")
    p.add_argument("--no-binary", action="store_true", help="JSON tensors instead of binary")
    p.add_argument(
        "--api-key-file",
        help="a file whose first line is the API key (default: $MAAS_JAX_API_KEY); a key on "
        "the command line would show in the process list, so there is no --api-key",
    )
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    from maas_jax.serve import Client, ServeError

    key = os.environ.get("MAAS_JAX_API_KEY")
    if ns.api_key_file:
        try:
            with open(ns.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            print(f"maas-jax bench: cannot read the API key file: {e}")
            return 2
    try:
        with Client(ns.url, api_key=key) as c:
            meta = c.metadata(ns.model)
    except ServeError as e:
        print(f"maas-jax bench: {ns.url}: {e}")
        return 2
    res = load_test(
        ns.url,
        ns.model,
        synthetic_feed(meta, ns.rows),
        concurrency=ns.concurrency,
        duration_s=ns.duration,
        max_requests=ns.max_requests,
        api_key=key,
        binary=not ns.no_binary,
    )
    print(json.dumps(res, indent=2))
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if not res["failures"] else 1
