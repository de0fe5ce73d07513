"""The HTTP surface of the server: OIP routes, versions, access control, limits, errors,
metrics, access logs and readiness."""

import json
import logging
import re
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from maas_jax.serve import (
    Client,
    ServeError,
    TensorSpec,
    create_app,
    from_callable,
    serve_in_thread,
)

KEY, OTHER_KEY = "test-key-123", "second-key-456"
AUTH = {"Authorization": f"Bearer {KEY}"}


def double(version: str, factor: float):
    return from_callable(
        lambda x: {"y": x * np.float32(factor)},
        name="double",
        version=version,
        inputs=[TensorSpec("x", "float32", (-1, 3))],
        outputs=[TensorSpec("y", "float32", (-1, 3))],
        batch_sizes=(1, 4),
    )


def typed():
    return from_callable(
        lambda input_ids, flags, q: {"out": input_ids + 1, "any": flags.any(axis=1), "q2": -q},
        name="typed",
        inputs=[
            TensorSpec("input_ids", "int32", (-1, 64)),
            TensorSpec("flags", "bool", (-1, 2)),
            TensorSpec("q", "int8", (-1, 2)),
        ],
        outputs=[
            TensorSpec("out", "int32", (-1, 64)),
            TensorSpec("any", "bool", (-1,)),
            TensorSpec("q2", "int8", (-1, 2)),
        ],
        batch_sizes=(2, 8),
    )


def failing():
    def fn(x):
        if x.sum() > 1000:
            raise RuntimeError("boom")
        return {"y": x}

    return from_callable(
        fn,
        name="bad",
        inputs=[TensorSpec("x", "float32", (-1, 3))],
        outputs=[TensorSpec("y", "float32", (-1, 3))],
        batch_sizes=(1,),
    )


def metric(text: str, name: str, **labels) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def x_input(rows=1, data=None, datatype="FP32", shape=None, name="x"):
    data = data if data is not None else [1.0, 2.0, 3.0] * rows
    return {"name": name, "datatype": datatype, "shape": shape or [rows, 3], "data": data}


@pytest.fixture(scope="module")
def server():
    models = [double("2", 2.0), double("10", 10.0), typed(), failing()]
    with serve_in_thread(models, api_keys=[KEY, OTHER_KEY]) as s:
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as c:
        yield c


@pytest.fixture
def anon(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def test_server_metadata_and_health(http, anon):
    meta = http.get("/v2").json()
    assert meta["name"] == "maas_jax" and "binary_tensor_data" in meta["extensions"]
    assert isinstance(meta["version"], str)
    assert anon.get("/v2/health/live").json() == {"live": True}
    assert anon.get("/v2/health/ready").json() == {"ready": True}
    assert anon.get("/metrics").status_code == 200
    assert anon.get("/openapi.json").json()["openapi"].startswith("3.0")


def test_access_control(anon):
    body = {"inputs": [x_input()]}
    for path in ("/v2", "/v2/models/double", "/nope", "/v2/health/live/", "/metrics/x"):
        r = anon.get(path)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), path
        assert r.headers["www-authenticate"] == "Bearer"
    r = anon.post("/v2/models/double/infer", json=body)
    assert r.status_code == 401
    r = anon.post("/v2/models/double/infer", json=body, headers={"Authorization": "Bearer wrong"})
    assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    r = anon.post("/v2/models/double/infer", json=body, headers={"Authorization": KEY})  # no scheme
    assert r.status_code == 401
    for headers in (AUTH, {"Authorization": f"bearer {OTHER_KEY}"}, {"X-API-Key": OTHER_KEY}):
        r = anon.post("/v2/models/double/infer", json=body, headers=headers)
        assert r.status_code == 200, headers
    # with a key an unknown path is an honest 404
    r = anon.get("/nope", headers=AUTH)
    assert r.status_code == 404 and "no route '/nope'" in r.json()["error"]


def test_only_digests_are_kept():
    app = create_app([double("1", 2.0)], api_keys=[KEY])
    assert KEY not in repr([m.kwargs for m in app.user_middleware])
    assert KEY not in repr(vars(app.state.maas))


def test_model_metadata_and_versions(http):
    meta = http.get("/v2/models/double").json()
    assert meta["name"] == "double" and meta["platform"] == "maas_jax"
    assert meta["versions"] == ["2", "10"]  # numeric order
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["batch_sizes"] == [1, 4]
    assert http.get("/v2/models/double/versions/2").json()["inputs"] == meta["inputs"]
    t = http.get("/v2/models/typed").json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in t["inputs"]] == [
        ("input_ids", "INT32", [-1, 64]),
        ("flags", "BOOL", [-1, 2]),
        ("q", "INT8", [-1, 2]),
    ]
    assert http.get("/v2/models/double/ready").json() == {
        "name": "double",
        "version": "10",
        "ready": True,
    }
    assert http.get("/v2/models/double/versions/2/ready").json()["version"] == "2"


def test_version_routing(http):
    body = {"id": "abc", "inputs": [x_input()]}
    r = http.post("/v2/models/double/infer", json=body).json()
    assert r["model_version"] == "10" and r["id"] == "abc"
    assert r["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [10.0, 20.0, 30.0]}
    ]
    r = http.post("/v2/models/double/versions/2/infer", json=body).json()
    assert r["model_version"] == "2" and r["outputs"][0]["data"] == [2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "path, match",
    [
        (
            "/v2/models/nope",
            r"unknown model 'nope'; served: bad \(versions 1\); double \(versions 2, 10\)",
        ),
        ("/v2/models/double/versions/3", r"model 'double' has no version '3'; its versions: 2, 10"),
        ("/v2/models/double/versions/3/ready", r"has no version '3'"),
    ],
)
def test_unknown_model_or_version_is_404(http, path, match):
    r = http.get(path)
    assert r.status_code == 404
    assert re.search(match, r.json()["error"])
    r = http.post(path.removesuffix("/ready") + "/infer", json={"inputs": [x_input()]})
    assert r.status_code == 404


@pytest.mark.parametrize(
    "content, headers, status, match",
    [
        (b'{"inputs": [', {"Content-Type": "application/json"}, 400, r"malformed JSON"),
        (
            b"hello",
            {"Content-Type": "text/plain"},
            415,
            r"Content-Type 'text/plain' is not supported",
        ),
        (b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, r"not supported"),
        (
            json.dumps({"inputs": [x_input(datatype="INT32", data=[1, 2, 3])]}).encode(),
            {},
            400,
            r"input 'x': expected FP32 shape \[-1, 3\], got INT32 \[1, 3\]",
        ),
        (
            json.dumps({"inputs": [x_input(shape=[1, 4], data=[1, 2, 3, 4])]}).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
            400,
            r"input 'x': expected FP32 shape \[-1, 3\], got FP32 \[1, 4\]",
        ),
        (
            json.dumps({"inputs": [x_input(name="z")]}).encode(),
            {},
            400,
            r"unknown input 'z'; model 'double' version '10' takes x FP32 shape \[-1, 3\]",
        ),
        (
            json.dumps({"inputs": [x_input(rows=5)]}).encode(),
            {},
            400,
            r"5 rows but model 'double' version '10' accepts at most 4 rows per request",
        ),
        (
            json.dumps({"inputs": [x_input()]}).encode(),
            {"Inference-Header-Content-Length": "x"},
            400,
            r"Inference-Header-Content-Length must be an integer",
        ),
    ],
)
def test_bad_requests(http, content, headers, status, match):
    r = http.post("/v2/models/double/infer", content=content, headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert re.search(match, r.json()["error"]), r.json()


def test_missing_input(http):
    r = http.post(
        "/v2/models/typed/infer",
        json={"inputs": [{"name": "q", "datatype": "INT8", "shape": [1, 2], "data": [1, 2]}]},
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith(
        "missing input 'input_ids', 'flags'; model 'typed' version '1' takes input_ids INT32 shape [-1, 64]"
    )


def test_wrong_method_is_405_json(http):
    r = http.get("/v2/models/double/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "method GET is not allowed" in r.json()["error"]
    r = http.delete("/v2/health/live")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_model_failure_is_500_and_counted(server, http):
    r = http.post("/v2/models/bad/infer", json={"inputs": [x_input(data=[1e4, 0, 0])]})
    assert r.status_code == 500
    assert r.json() == {"error": "model 'bad' version '1' failed: RuntimeError: boom"}
    r = http.post("/v2/models/bad/infer", json={"inputs": [x_input()]})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
    text = http.get("/metrics").text
    assert (
        metric(
            text, "maas_jax_request_failure_total", model="bad", reason="model_error", code="500"
        )
        == 1
    )


def test_failures_are_counted_by_reason(http):
    before = http.get("/metrics").text
    http.post("/v2/models/nope/infer", json={})
    http.post("/v2/models/double/infer", content=b"{")
    after = http.get("/metrics").text

    def delta(**labels):
        return metric(after, "maas_jax_request_failure_total", **labels) - metric(
            before, "maas_jax_request_failure_total", **labels
        )

    assert delta(model="", reason="unknown_model", code="404") == 1
    assert delta(model="double", version="10", reason="bad_request", code="400") == 1


def test_typed_model_json_and_binary_are_exact(server):
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(-(2**31), 2**31 - 2, (3, 64), dtype=np.int32),
        "flags": rng.random((3, 2)) > 0.5,
        "q": rng.integers(-127, 128, (3, 2), dtype=np.int8),
    }
    want = {"out": feed["input_ids"] + 1, "any": feed["flags"].any(axis=1), "q2": -feed["q"]}
    for binary in (False, True):
        with Client(server.url, api_key=KEY, binary=binary) as c:
            out = c.infer("typed", feed)
            assert list(out) == ["out", "any", "q2"]
            for k in want:
                assert out[k].dtype == want[k].dtype
                np.testing.assert_array_equal(out[k], want[k])
            only = c.infer("typed", feed, outputs=["q2"])
            assert list(only) == ["q2"]
    with (
        Client(server.url, api_key=KEY) as c,
        pytest.raises(ServeError, match=r"expected INT8 shape") as info,
    ):
        c.infer("typed", {**feed, "q": feed["q"].astype(np.int16)})
    assert info.value.status == 400


def test_access_log_is_json_and_never_has_the_key(server, http, caplog):
    caplog.set_level(logging.INFO, logger="maas_jax.serve.access")
    http.post("/v2/models/double/infer", json={"inputs": [x_input()]})
    httpx.get(server.url + "/v2", headers={"X-API-Key": "a-wrong-key"})
    deadline = time.monotonic() + 5
    while len([r for r in caplog.records if r.name == "maas_jax.serve.access"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    lines = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "maas_jax.serve.access"
    ]
    infer = next(entry for entry in lines if entry["path"] == "/v2/models/double/infer")
    assert infer["method"] == "POST" and infer["status"] == 200 and infer["model"] == "double"
    assert infer["duration_ms"] >= 0 and infer["client"].startswith("127.0.0.1:")
    assert any(entry["path"] == "/v2" and entry["status"] == 401 for entry in lines)
    assert KEY not in caplog.text and "a-wrong-key" not in caplog.text


def test_open_server_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="maas_jax.serve")
    with serve_in_thread([double("1", 2.0)]) as s:
        assert httpx.get(s.url + "/v2").status_code == 200
    warnings = [r for r in caplog.records if "no API keys configured" in r.getMessage()]
    assert len(warnings) == 1


def test_body_limits_on_declared_and_streamed_bytes():
    with serve_in_thread([double("1", 2.0)], max_body_bytes=2048) as s:
        url = s.url + "/v2/models/double/infer"
        big = json.dumps({"inputs": [x_input()], "pad": "x" * 4000}).encode()
        r = httpx.post(url, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json() == {
            "error": "request body larger than the server's limit of 2048 bytes (max_body_bytes)"
        }

        def chunks():
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers  # really chunked
        assert r.status_code == 413 and "limit of 2048 bytes" in r.json()["error"]
        small = json.dumps({"inputs": [x_input()]}).encode()
        r = httpx.post(url, content=iter([small[:10], small[10:]]))
        assert r.status_code == 200  # a small chunked body is fine


def test_not_ready_until_warmup_done():
    release = threading.Event()

    class SlowWarmup:
        name, version = "slow", "1"
        inputs = [TensorSpec("x", "float32", (-1, 3))]
        outputs = [TensorSpec("y", "float32", (-1, 3))]
        batch_sizes = (1, 2)
        warmed = []

        def run(self, inputs):
            return {"y": inputs["x"] + 1}

        def warmup(self):
            assert release.wait(30)
            self.warmed.append(threading.current_thread().name)

    m = SlowWarmup()
    with (
        serve_in_thread([m, double("1", 2.0)], wait_ready=False) as s,
        httpx.Client(base_url=s.url, timeout=10) as c,
    ):
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False})
        r = c.get("/v2/models/slow/ready")
        assert (r.status_code, r.json()["ready"]) == (503, False)
        r = c.post("/v2/models/slow/infer", json={"inputs": [x_input()]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "model 'slow' version '1' is not ready (warming up)"
        release.set()
        with Client(s.url) as client:
            client.wait_ready(timeout=10)
        assert c.get("/v2/models/slow/ready").json()["ready"] is True
        r = c.post("/v2/models/slow/infer", json={"inputs": [x_input()]})
        assert r.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]
    assert m.warmed == ["maas-jax-model_0"]  # in the model thread


def test_failed_warmup_stays_not_ready():
    class Broken:
        name, version = "broken", "1"
        inputs = [TensorSpec("x", "float32", (-1, 3))]
        outputs = [TensorSpec("y", "float32", (-1, 3))]
        batch_sizes = (1,)

        def run(self, inputs):
            return {"y": inputs["x"]}

        def warmup(self):
            raise MemoryError("no room for bucket 1")

    with (
        serve_in_thread([Broken()], wait_ready=False) as s,
        httpx.Client(base_url=s.url, timeout=10) as c,
    ):
        deadline = time.monotonic() + 10
        while True:
            r = c.post("/v2/models/broken/infer", json={"inputs": [x_input()]})
            if "warmup failed" in r.json()["error"] or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.status_code == 503
        assert r.json()["error"] == (
            "model 'broken' version '1' is not ready "
            "(warmup failed: MemoryError: no room for bucket 1)"
        )
        assert c.get("/v2/health/ready").status_code == 503


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be a positive int"),
        ({"max_queue_size": 0}, ValueError, "max_queue_size must be a positive int"),
        ({"request_timeout_s": 0}, ValueError, "request_timeout_s must be > 0"),
        ({"api_keys": "k"}, TypeError, r"api_keys is a list of keys"),
        ({"api_keys": [""]}, ValueError, "non-empty strings"),
    ],
)
def test_create_app_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_app([double("1", 2.0)], **kwargs)


def test_create_app_model_errors():
    with pytest.raises(ValueError, match=r"model 'double' version '1' is given twice"):
        create_app([double("1", 2.0), double("1", 3.0)])
    bad = from_callable(
        lambda x: {"y": x},
        name="c",
        inputs=[TensorSpec("x", "complex64", (-1, 2))],
        outputs=[TensorSpec("y", "complex64", (-1, 2))],
    )
    with pytest.raises(
        ValueError, match=r"dtype 'complex64' has no Open Inference Protocol datatype"
    ):
        create_app([bad])
    nobatch = from_callable(
        lambda x: {"y": x},
        name="n",
        inputs=[TensorSpec("x", "float32", (2, 2))],
        outputs=[TensorSpec("y", "float32", (2, 2))],
    )
    with pytest.raises(
        ValueError, match=r"tensor 'x' has shape \[2, 2\]; the first dimension must be -1"
    ):
        create_app([nobatch])
    with pytest.raises(
        TypeError, match=r"has no 'name'; serve objects implementing maas_jax.serve.ServedModel"
    ):
        create_app([object()])
