"""maas_jax.serve end to end: OIP REST, binary extension, batching, limits, auth, shutdown.

Models are :func:`from_callable` around numpy references. A real uvicorn server (free port,
background thread) is used for tritonclient, concurrency, overload and shutdown;
``starlette.testclient.TestClient`` elsewhere.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from maas_jax.serve import (
    Client,
    ServeError,
    TensorSpec,
    create_app,
    from_callable,
    load_api_keys,
    serve_in_thread,
)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def affine_model(batch_sizes=(1, 4, 8), version="1", name="affine"):
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 10

    def fn(x):
        return {"y": x @ w + 1.0, "s": x.sum(axis=1).astype(np.int64)}

    model = from_callable(
        fn,
        name=name,
        version=version,
        inputs=[TensorSpec("x", "float32", (-1, 16))],
        outputs=[TensorSpec("y", "float32", (-1, 3)), TensorSpec("s", "int64", (-1,))],
        batch_sizes=batch_sizes,
    )
    return model, fn


def echo_model(delay_s=0.0, batch_sizes=(1, 2, 4, 8, 16), name="echo"):
    """Row-wise: each output row encodes its own input row, so row leaks between requests show."""
    calls = []

    def fn(ids):
        calls.append(ids.shape[0])
        if delay_s:
            time.sleep(delay_s)
        return {"out": ids * 10 + 1}

    model = from_callable(
        fn,
        name=name,
        inputs=[TensorSpec("ids", "int32", (-1, 2))],
        outputs=[TensorSpec("out", "int32", (-1, 2))],
        batch_sizes=batch_sizes,
    )
    return model, calls


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@pytest.fixture
def app_client():
    model, _ = affine_model()
    model2, _ = affine_model(version="2")
    app = create_app([model, model2], api_keys=[KEY], max_body_bytes=4096)
    with started(app) as tc:
        yield tc


class started(TestClient):
    """A TestClient that returns only once /v2/health/ready answers 200 (warmup runs async)."""

    def __enter__(self):
        tc = super().__enter__()
        t_end = time.monotonic() + 10
        while tc.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < t_end, "not ready"
            time.sleep(0.005)
        return tc


def infer_json(tc, body, path="/v2/models/affine/infer", **kw):
    return tc.post(path, content=json.dumps(body), headers={**AUTH, **kw.pop("headers", {})}, **kw)


def x_rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


# -- protocol ---------------------------------------------------------------------------------


def test_health_metadata_and_openapi(app_client):
    tc = app_client
    assert tc.get("/v2/health/live").json() == {"live": True}
    assert tc.get("/v2/health/ready").status_code == 200
    assert tc.app.state.ready
    meta = tc.get("/v2", headers=AUTH).json()
    assert meta["name"] and "version" in meta
    m = tc.get("/v2/models/affine", headers=AUTH).json()
    assert m["name"] == "affine" and m["platform"] == "maas_jax"
    assert m["versions"] == ["1", "2"]
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert {"name": "s", "datatype": "INT64", "shape": [-1]} in m["outputs"]
    v1 = tc.get("/v2/models/affine/versions/1", headers=AUTH)
    assert v1.status_code == 200
    assert tc.get("/v2/models/affine/versions/2/ready", headers=AUTH).json()["ready"] is True
    doc = tc.get("/openapi.json").json()
    assert doc["openapi"] == "3.0.3" and "/v2/models/{model_name}/infer" in doc["paths"]


@pytest.mark.parametrize("rows", [1, 3, 4, 8])
@pytest.mark.parametrize("binary", [False, True])
def test_outputs_equal_numpy_reference(rows, binary):
    model, fn = affine_model()
    with started(create_app([model])) as tc:
        c = Client("http://testserver", binary=binary, http_client=tc)
        x = x_rows(rows, seed=rows)
        out = c.infer("affine", {"x": x})
        ref = fn(x)
        assert out["y"].dtype == np.float32 and out["y"].shape == (rows, 3)
        np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-6)
        np.testing.assert_array_equal(out["s"], ref["s"])
        only = c.infer("affine", {"x": x}, outputs=["s"], version="1")
        assert list(only) == ["s"]


def test_json_nested_data_id_echo_and_latest_version(app_client):
    x = x_rows(2)
    body = {
        "id": "req-7",
        "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "y"}],
    }
    r = infer_json(app_client, body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["id"] == "req-7" and j["model_name"] == "affine" and j["model_version"] == "2"
    (y,) = j["outputs"]
    assert y["name"] == "y" and y["shape"] == [2, 3] and y["datatype"] == "FP32"
    _, fn = affine_model()
    np.testing.assert_allclose(np.array(y["data"]).reshape(2, 3), fn(x)["y"], rtol=1e-6)


def test_binary_request_and_response_raw(app_client):
    x = x_rows(3)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [3, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "s", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = app_client.post(
        "/v2/models/affine/infer",
        content=header + x.tobytes(),
        headers={
            **AUTH,
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 3 * 8
    s = np.frombuffer(r.content[n:], dtype="<i8")
    np.testing.assert_array_equal(s, x.sum(axis=1).astype(np.int64))


# -- errors -----------------------------------------------------------------------------------


def _err(r, status, pattern):
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert re.search(pattern, msg), msg
    return msg


def test_client_errors_are_4xx_with_messages(app_client):
    tc = app_client
    ok = {"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 32}
    r = tc.post("/v2/models/affine/infer", content=b"{not json", headers=AUTH)
    _err(r, 400, "(?i)json")
    bad_dtype = {**ok, "datatype": "INT32", "data": [0] * 32}
    _err(
        infer_json(tc, {"inputs": [bad_dtype]}), 400, r"input 'x'.*FP32 (shape )?\[-1, 16\].*INT32"
    )
    _err(infer_json(tc, {"inputs": [{**ok, "shape": [2, 15]}]}), 400, r"input 'x'.*\[-1, 16\]")
    _err(infer_json(tc, {"inputs": [{**ok, "name": "z"}]}), 400, "'z'")
    _err(infer_json(tc, {"inputs": []}), 400, "x FP32")
    _err(infer_json(tc, {"inputs": [{**ok, "data": [0.0] * 31}]}), 400, "'x'")
    _err(infer_json(tc, {"inputs": [{**ok, "shape": [9, 16], "data": [0.0] * 144}]}), 400, "8")
    _err(infer_json(tc, [1, 2]), 400, ".")
    r = tc.post(
        "/v2/models/affine/infer", content=b"{}", headers={**AUTH, "Content-Type": "text/plain"}
    )
    _err(r, 415, "text/plain")
    _err(infer_json(tc, {"inputs": [ok]}, path="/v2/models/nope/infer"), 404, "nope")
    _err(infer_json(tc, {"inputs": [ok]}, path="/v2/models/affine/versions/9/infer"), 404, "9")
    _err(tc.get("/v2/models/affine/infer", headers=AUTH), 405, "GET")
    _err(tc.get("/v2/models/nope", headers=AUTH), 404, "nope")


def test_oversized_body_content_length_and_chunked(app_client):
    tc = app_client
    big = b"{" + b" " * 5000 + b"}"
    _err(tc.post("/v2/models/affine/infer", content=big, headers=AUTH), 413, "4096")

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = tc.post("/v2/models/affine/infer", content=chunks(), headers=AUTH)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _err(r, 413, "4096")


def test_auth_guards_all_but_health(app_client):
    tc = app_client
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"):
        assert tc.get(path).status_code == 200, path
    for path in ("/v2", "/v2/models/affine", "/no/such/path"):
        r = tc.get(path)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, path
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
    r = tc.post("/v2/models/affine/infer", json=body)
    assert r.status_code == 401
    r = tc.post("/v2/models/affine/infer", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = tc.post("/v2/models/affine/infer", json=body, headers={"X-API-Key": KEY})
    assert r.status_code == 200
    assert tc.get("/no/such/path", headers=AUTH).status_code == 404


def test_load_api_keys(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\nalpha\n\n beta \n")
    monkeypatch.setenv("MAAS_JAX_API_KEYS", "gamma, alpha")
    assert load_api_keys(f) == ["alpha", "beta", "gamma"]
    monkeypatch.delenv("MAAS_JAX_API_KEYS")
    assert load_api_keys() == []


def test_model_failure_is_500_and_access_log(caplog):
    def boom(x):
        raise RuntimeError("boom")

    model = from_callable(
        boom,
        name="bad",
        inputs=[TensorSpec("x", "float32", (-1, 2))],
        outputs=[TensorSpec("y", "float32", (-1, 2))],
        batch_sizes=(1,),
    )
    model.warmup = lambda: None
    with caplog.at_level(logging.INFO, logger="maas_jax.serve.access"):
        with started(create_app([model])) as tc:
            r = tc.post("/v2/models/bad/infer", json={"inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}
            ]})  # fmt: skip
            assert r.status_code == 500 and "boom" in r.json()["error"]
            text = tc.get("/metrics").text
    assert metric(text, "maas_jax_request_failure_total", model="bad", code="500") == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
    entry = next(e for e in lines if e["path"] == "/v2/models/bad/infer")
    assert entry["status"] == 500 and entry["method"] == "POST" and "duration_ms" in entry
    assert entry["model"] == "bad" and "client" in entry


def test_ready_503_until_warmup_done():
    model, _ = affine_model()
    gate = threading.Event()
    original = model.warmup

    def slow_warmup():
        gate.wait(10)
        original()

    model.warmup = slow_warmup
    with TestClient(create_app([model])) as tc:
        assert tc.get("/v2/health/ready").status_code == 503
        assert tc.get("/v2/models/affine/ready").status_code == 503
        assert not tc.app.state.ready
        gate.set()
        t_end = time.monotonic() + 10
        while tc.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < t_end
            time.sleep(0.01)
        assert tc.app.state.ready


# -- live server: batching, overload, deadlines, shutdown ------------------------------------


def test_concurrent_clients_are_batched_and_get_their_own_rows():
    model, calls = echo_model(delay_s=0.01)
    with serve_in_thread([model], max_queue_delay_ms=20.0) as server:
        n = 24

        def one(i):
            rows = 1 + i % 3
            ids = (np.arange(rows * 2, dtype=np.int32).reshape(rows, 2) + 1000 * i).astype(np.int32)
            with Client(server.url) as c:
                out = c.infer("echo", {"ids": ids})["out"]
            return ids, out

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
        for ids, out in results:
            np.testing.assert_array_equal(out, ids * 10 + 1)
        text = httpx.get(server.url + "/metrics").text
    execs = metric(text, "maas_jax_inference_exec_count_total", model="echo")
    assert metric(text, "maas_jax_request_success_total", model="echo") == n
    assert metric(text, "maas_jax_inference_count_total", model="echo") == sum(
        1 + i % 3 for i in range(n)
    )
    assert 0 < execs < n
    assert all(c in (1, 2, 4, 8, 16) for c in calls)


def test_batching_off_runs_each_request_alone():
    model, calls = echo_model()
    with started(create_app([model], batching=False, bucket_plan="single")) as tc:
        c = Client("http://testserver", http_client=tc)
        ids = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
        np.testing.assert_array_equal(c.infer("echo", {"ids": ids})["out"], ids * 10 + 1)
    assert calls[-1] == 4  # padded to its smallest bucket


def test_tritonclient_json_and_binary_equal_our_client():
    httpclient = pytest.importorskip("tritonclient.http")
    model, fn = affine_model()
    with serve_in_thread([model], api_keys=[KEY]) as server:
        x = x_rows(5)
        with Client(server.url, KEY) as c:
            ours = c.infer("affine", {"x": x})
        tc = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert tc.is_server_live() and tc.is_model_ready("affine", headers=AUTH)
        for binary in (False, True):
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("y", "s")]
            res = tc.infer("affine", [inp], outputs=outs, headers=AUTH)
            np.testing.assert_array_equal(res.as_numpy("y"), ours["y"])
            np.testing.assert_array_equal(res.as_numpy("s"), ours["s"])
        tc.close()
        np.testing.assert_allclose(ours["y"], fn(x)["y"], rtol=1e-6)


def test_flood_past_queue_gives_503_retry_after_then_recovers():
    model, _ = echo_model(delay_s=0.05, batch_sizes=(1,))
    with serve_in_thread([model], max_queue_size=2, max_queue_delay_ms=1.0) as server:
        body = {"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}

        def one(_):
            return httpx.post(server.url + "/v2/models/echo/infer", json=body, timeout=30)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(one, range(16)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        busy = [r for r in responses if r.status_code == 503]
        assert busy and codes.count(200) >= 2
        assert busy[0].headers["retry-after"] == "1"
        assert "max_queue_size=2" in busy[0].json()["error"]
        with Client(server.url) as c:
            ids = np.array([[7, 8]], np.int32)
            np.testing.assert_array_equal(c.infer("echo", {"ids": ids})["out"], ids * 10 + 1)


def test_deadline_is_504():
    model, calls = echo_model(delay_s=0.3, batch_sizes=(1,))
    # bucket_plan="single": no bucket timing runs after warmup, so every call below is counted
    with serve_in_thread([model], max_queue_delay_ms=1.0, bucket_plan="single") as server:
        with Client(server.url) as c:
            ids = np.array([[1, 2]], np.int32)
            with ThreadPoolExecutor(3) as pool:
                futs = [pool.submit(c.infer, "echo", {"ids": ids}, timeout_ms=100) for _ in "abc"]
                errors = []
                for f in futs:
                    with pytest.raises(ServeError) as e:
                        f.result()
                    errors.append(e.value)
            assert all(e.status == 504 for e in errors)
            assert all(str(e).find("deadline exceeded") >= 0 for e in errors), errors
            time.sleep(0.5)
            np.testing.assert_array_equal(c.infer("echo", {"ids": ids})["out"], ids * 10 + 1)
    assert len(calls) < 1 + 1 + 3 + 1  # warmup + at most the first + the last; expired dropped


def test_graceful_shutdown_completes_in_flight_requests():
    gate = threading.Event()
    started_rows = []

    def fn(ids):
        if ids.any():  # not warmup
            started_rows.append(ids.shape[0])
            gate.wait(10)
        return {"out": ids * 10 + 1}

    model = from_callable(
        fn,
        name="echo",
        inputs=[TensorSpec("ids", "int32", (-1, 2))],
        outputs=[TensorSpec("out", "int32", (-1, 2))],
        batch_sizes=(1, 2, 4, 8),
    )
    n = 6
    ctx = serve_in_thread([model], max_queue_delay_ms=1.0, bucket_plan="single")
    server = ctx.__enter__()
    try:
        ids = np.array([[3, 4]], np.int32)

        def one(_):
            with Client(server.url) as c:
                return c.infer("echo", {"ids": ids})["out"]

        with ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(one, i) for i in range(n)]
            t_end = time.monotonic() + 10
            while True:  # every request is running or queued on the server
                text = httpx.get(server.url + "/metrics").text
                if sum(started_rows) + metric(text, "maas_jax_queue_depth", model="echo") == n:
                    break
                assert time.monotonic() < t_end, (started_rows, text)
                time.sleep(0.01)
            server.should_exit = True
            time.sleep(0.2)
            assert server.thread.is_alive()  # draining, not gone
            gate.set()
            for f in futs:
                np.testing.assert_array_equal(f.result(timeout=20), ids * 10 + 1)
    finally:
        gate.set()
        ctx.__exit__(None, None, None)
    assert not server.thread.is_alive()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) != 0


@pytest.mark.slow  # ~13 s; tests/test_serve_schema.py fuzzes every operation in both modes too
def test_schemathesis_no_5xx():
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from hypothesis import HealthCheck, given, settings

    model, _ = affine_model(batch_sizes=(1, 4))
    with serve_in_thread([model], api_keys=[KEY]) as server, requests.Session() as session:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 10
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            )
            def fuzz(case):
                kwargs = case.as_transport_kwargs(base_url=server.url, headers=AUTH)
                # integer header parameters are generated as ints; HTTP sends strings
                kwargs["headers"] = {k: str(v) for k, v in kwargs["headers"].items()}
                r = session.request(**kwargs, timeout=10)
                assert r.status_code < 500, (case.path, r.status_code, r.text)

            fuzz()


def test_model_module_does_not_import_the_server_stack():
    import subprocess
    import sys

    code = (
        "import sys, maas_jax.serve._model, maas_jax.serve; "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_serve_blocks_until_sigterm_then_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    script.write_text(
        "import numpy as np\n"
        "from maas_jax.serve import TensorSpec, from_callable, serve\n"
        "m = from_callable(lambda x: {'y': x + 1}, name='inc',\n"
        "    inputs=[TensorSpec('x', 'int32', (-1, 2))],\n"
        "    outputs=[TensorSpec('y', 'int32', (-1, 2))], batch_sizes=(1, 2))\n"
        f"serve([m], port={port}, log_level='warning', api_keys=['k'])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < t_end
            time.sleep(0.05)
        with Client(f"http://127.0.0.1:{port}", "k") as c:
            out = c.infer("inc", {"x": np.array([[1, 2]], np.int32)})
        np.testing.assert_array_equal(out["y"], [[2, 3]])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        # uvicorn re-raises the signal once it has shut down gracefully
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Traceback" not in err, err
        assert "k'" not in err and "no API keys" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
