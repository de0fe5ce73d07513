"""Dynamic batching against a live server: exact outputs, real merging, queue bound, deadlines,
graceful shutdown.

The model's rows are independent *unless the batcher is wrong*: every request carries its own
seeds, so a request that got another request's rows (a slicing bug) or padding rows (an offset
bug) no longer equals its numpy reference; the model also records every batch it ran and
checks that the padding rows are zeros at the end of the batch.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from maas_jax.serve import Client, ServeError, TensorSpec, from_callable, serve_in_thread

BUCKETS = (1, 2, 4, 8)


def seeded_model(
    batches: list, *, delay_s=0.0, gate=None, entered=None, name="seeded", batch_sizes=BUCKETS
):
    def fn(seed, x):
        real = seed[:, 0] != 0
        n = int(real.sum())
        pad_ok = bool(real[:n].all()) and not x[n:].any() and not seed[n:].any()
        batches.append((len(seed), n, pad_ok))
        if n and entered is not None:
            entered.set()
        if n and gate is not None:
            assert gate.wait(30), "test gate never opened"
        if n and delay_s:  # not in warmup
            time.sleep(delay_s)
        s = seed.astype(np.float32)
        return {"y": x * s + np.float32(0.5) * s, "check": x.sum(axis=1, keepdims=True) * s}

    return from_callable(
        fn,
        name=name,
        inputs=[TensorSpec("seed", "int32", (-1, 1)), TensorSpec("x", "float32", (-1, 4))],
        outputs=[TensorSpec("y", "float32", (-1, 4)), TensorSpec("check", "float32", (-1, 1))],
        batch_sizes=batch_sizes,
    )


def reference(seed: np.ndarray, x: np.ndarray) -> dict:
    """The unbatched answer, computed here and independently of the server."""
    s = seed.astype(np.float32)
    return {"y": x * s + np.float32(0.5) * s, "check": x.sum(axis=1, keepdims=True) * s}


def make_request(rng: np.random.Generator, rows: int, first_seed: int):
    seed = np.arange(first_seed, first_seed + rows, dtype=np.int32)[:, None]
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    return {"seed": seed, "x": x}


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _workload(url: str, n_threads: int, per_thread: int, seed0: int = 1):
    """Concurrent clients (half JSON, half binary) with 1..8 rows each; returns total rows."""
    barrier = threading.Barrier(n_threads)

    def client(i: int) -> int:
        rng = np.random.default_rng(i)
        rows_sent = 0
        with Client(url, binary=i % 2 == 0, timeout=30) as c:
            barrier.wait(10)
            for j in range(per_thread):
                rows = int(rng.integers(1, 9))
                feed = make_request(rng, rows, seed0 + 1000 * i + 10 * j)
                out = c.infer("seeded", feed)
                want = reference(**feed)
                np.testing.assert_array_equal(out["y"], want["y"])
                np.testing.assert_array_equal(out["check"], want["check"])
                rows_sent += rows
        return rows_sent

    with ThreadPoolExecutor(n_threads) as pool:
        return sum(pool.map(client, range(n_threads)))


def test_every_row_count_and_bucket_matches_the_reference():
    batches: list = []
    rng = np.random.default_rng(0)
    # bucket_plan="single": the bucket each request ran in is asserted below (the cost plan
    # has its own test, test_a_batch_runs_in_the_cheapest_buckets_the_server_measured)
    with serve_in_thread([seeded_model(batches)], bucket_plan="single") as server:
        for binary in (False, True):
            with Client(server.url, binary=binary) as c:
                for rows in range(1, 9):
                    feed = make_request(rng, rows, 1 + rows)
                    out = c.infer("seeded", feed)
                    want = reference(**feed)
                    assert out["y"].shape == (rows, 4) and out["check"].shape == (rows, 1)
                    np.testing.assert_array_equal(out["y"], want["y"])
                    np.testing.assert_array_equal(out["check"], want["check"])
    ran = [(b, n) for b, n, _ in batches if n]
    # alone on the server, each request ran alone, padded to the smallest bucket holding it
    assert ran == [(min(b for b in BUCKETS if b >= r), r) for r in range(1, 9)] * 2
    assert all(ok for _, _, ok in batches)


def test_concurrent_clients_are_batched_and_get_exactly_their_rows():
    batches: list = []
    buckets = (1, 2, 4, 8, 16, 32)
    model = seeded_model(batches, delay_s=0.004, batch_sizes=buckets)
    with serve_in_thread([model], max_queue_delay_ms=20.0) as server:
        total_rows = _workload(server.url, n_threads=12, per_thread=4)
        text = httpx.get(server.url + "/metrics").text
    labels = {"model": "seeded", "version": "1"}
    requests = metric(text, "maas_jax_request_success_total", **labels)
    execs = metric(text, "maas_jax_inference_exec_count_total", **labels)
    assert requests == 48
    assert metric(text, "maas_jax_inference_count_total", **labels) == total_rows
    assert execs < requests / 2, f"{execs} batches for {requests} requests: not batching"
    assert metric(text, "maas_jax_batch_size_count", **labels) == execs
    ran = [(b, n, ok) for b, n, ok in batches if n]
    assert len(ran) == execs
    assert sum(n for _, n, _ in ran) == total_rows  # nothing lost, nothing run twice
    assert all(ok and b == min(c for c in buckets if c >= n) for b, n, ok in ran)
    assert max(n for _, n, _ in ran) > 8  # several requests shared a batch


def test_batching_off_runs_each_request_alone():
    batches: list = []
    model = seeded_model(batches, delay_s=0.002)
    with serve_in_thread(
        [model], batching=False, max_queue_delay_ms=20.0, bucket_plan="single"
    ) as server:
        total_rows = _workload(server.url, n_threads=6, per_thread=3)
        text = httpx.get(server.url + "/metrics").text
    labels = {"model": "seeded", "version": "1"}
    assert metric(text, "maas_jax_inference_exec_count_total", **labels) == 18
    assert metric(text, "maas_jax_inference_count_total", **labels) == total_rows
    meta_batches = [(b, n) for b, n, _ in batches if n]
    assert all(b == min(c for c in BUCKETS if c >= n) for b, n in meta_batches)


def test_flood_past_max_queue_size_gets_503_and_the_server_recovers():
    batches: list = []
    model = seeded_model(batches, delay_s=0.1)
    with serve_in_thread([model], batching=False, max_queue_size=3) as server:
        feed = make_request(np.random.default_rng(1), 1, 5)
        payload = {
            "inputs": [
                {
                    "name": "seed",
                    "datatype": "INT32",
                    "shape": [1, 1],
                    "data": feed["seed"].ravel().tolist(),
                },
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "data": feed["x"].ravel().tolist(),
                },
            ]
        }

        def post(_):
            return httpx.post(server.url + "/v2/models/seeded/infer", json=payload, timeout=30)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
        codes = sorted(r.status_code for r in answers)
        refused = [r for r in answers if r.status_code == 503]
        assert set(codes) == {200, 503} and len(refused) >= 6, codes
        for r in refused:
            assert r.headers["retry-after"] == "1"
            assert "has 3 requests waiting (max_queue_size=3)" in r.json()["error"]
        for r in answers:
            if r.status_code == 200:
                np.testing.assert_array_equal(
                    np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 4),
                    reference(**feed)["y"],
                )
        # still up, still right
        with Client(server.url) as c:
            np.testing.assert_array_equal(c.infer("seeded", feed)["y"], reference(**feed)["y"])
        text = httpx.get(server.url + "/metrics").text
    assert metric(
        text, "maas_jax_request_failure_total", model="seeded", reason="queue_full", code="503"
    ) == len(refused)


def test_deadline_expiry_is_504_and_expired_requests_never_run():
    batches: list = []
    gate, entered = threading.Event(), threading.Event()
    model = seeded_model(batches, gate=gate, entered=entered)
    rng = np.random.default_rng(2)
    with serve_in_thread([model], batching=False) as server:
        first = make_request(rng, 2, 100)
        with ThreadPoolExecutor(1) as pool, Client(server.url) as c:
            running = pool.submit(c.infer, "seeded", first)
            assert entered.wait(10)
            late = make_request(rng, 3, 200)
            t0 = time.perf_counter()
            with pytest.raises(
                ServeError, match=r"expired waiting in the queue \(deadline 50 ms\)"
            ) as info:
                c.infer("seeded", late, timeout_ms=50)
            assert info.value.status == 504
            assert time.perf_counter() - t0 < 5
            gate.set()
            np.testing.assert_array_equal(running.result(10)["y"], reference(**first)["y"])
            # the expired request's rows (seeds 200..202) were never run
            assert [n for _, n, _ in batches if n] == [2]
            text = c.metrics()
        assert metric(text, "maas_jax_request_failure_total", reason="deadline", code="504") == 1


def test_server_request_timeout_while_running():
    model = seeded_model([], delay_s=0.5)
    with serve_in_thread([model], request_timeout_s=0.1) as server, Client(server.url) as c:
        with pytest.raises(
            ServeError, match=r"expired while the model ran its batch \(deadline 100 ms\)"
        ):
            c.infer("seeded", make_request(np.random.default_rng(3), 1, 1))


def test_graceful_shutdown_finishes_in_flight_requests():
    batches: list = []
    gate, entered = threading.Event(), threading.Event()
    model = seeded_model(batches, gate=gate, entered=entered)
    rng = np.random.default_rng(4)
    feeds = [make_request(rng, 1 + i % 3, 10 * i + 1) for i in range(5)]
    with serve_in_thread([model], max_queue_delay_ms=1.0, timeout_graceful_shutdown=20) as server:
        url = server.url

        def call(feed):
            with Client(url, timeout=30) as c:
                return c.infer("seeded", feed)

        pool = ThreadPoolExecutor(5)
        futures = [pool.submit(call, feeds[0])]
        assert entered.wait(10)
        futures += [pool.submit(call, f) for f in feeds[1:]]
        deadline = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, "maas_jax_queue_depth") < 4:
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        assert not any(f.done() for f in futures)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(url + "/v2/health/live", timeout=2)
        gate.set()
        results = [f.result(20) for f in futures]
        pool.shutdown()
        server.thread.join(20)
        assert not server.thread.is_alive()
    for feed, out in zip(feeds, results, strict=True):
        np.testing.assert_array_equal(out["y"], reference(**feed)["y"])
    assert sum(n for _, n, _ in batches) == sum(len(f["seed"]) for f in feeds)


def test_a_batch_runs_in_the_cheapest_buckets_the_server_measured():
    """A model whose time grows with its rows (a compute-bound CPU model): 20 rows cost less as
    8 + 8 + 4 x 1 than as one bucket of 32 with 12 padding rows, and every row still equals its
    reference, whichever bucket it ran in."""
    batches = []
    inner = seeded_model(batches, batch_sizes=(1, 8, 32))
    run = inner.run

    def timed_run(feed):
        time.sleep(0.002 * len(feed["seed"]))  # 2 ms per row, padding included
        return run(feed)

    inner.run = timed_run
    with serve_in_thread([inner], max_queue_delay_ms=1.0) as server:
        with Client(server.url) as c:
            feed = make_request(np.random.default_rng(3), 20, 1)
            out = c.infer("seeded", feed)
        text = httpx.get(server.url + "/metrics").text
    want = reference(**feed)
    np.testing.assert_array_equal(out["y"], want["y"])
    np.testing.assert_array_equal(out["check"], want["check"])
    ran = [(b, n) for b, n, _ in batches if n]
    assert ran == [(8, 8), (8, 8), (1, 1), (1, 1), (1, 1), (1, 1)], ran
    assert all(ok for _, n, ok in batches if n)
    labels = {"model": "seeded", "version": "1"}
    assert metric(text, "maas_jax_inference_exec_count_total", **labels) == 6
    assert metric(text, "maas_jax_inference_count_total", **labels) == 20
