"""Clients against a live server: ours (JSON and binary), the real tritonclient.http, and a
model wrapping a jitted jax function."""

import numpy as np
import pytest

from maas_jax.serve import Client, ServeError, TensorSpec, from_callable, serve_in_thread

KEY = "client-test-key"
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 7


def affine():
    return from_callable(
        lambda x, k: {"y": x @ W, "k2": k * 2},
        name="affine",
        inputs=[TensorSpec("x", "float32", (-1, 4)), TensorSpec("k", "int32", (-1, 2))],
        outputs=[TensorSpec("y", "float32", (-1, 3)), TensorSpec("k2", "int32", (-1, 2))],
        batch_sizes=(1, 4, 16),
    )


def feed(rows=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "k": rng.integers(-1000, 1000, (rows, 2), dtype=np.int32),
    }


@pytest.fixture(scope="module")
def server():
    with serve_in_thread([affine()], api_keys=[KEY]) as s:
        yield s


@pytest.mark.parametrize("binary", [False, True])
def test_client_round_trip(server, binary):
    f = feed()
    with Client(server.url, api_key=KEY, binary=binary) as c:
        assert c.live() and c.ready() and c.model_ready("affine")
        assert c.metadata("affine")["inputs"][1] == {
            "name": "k",
            "datatype": "INT32",
            "shape": [-1, 2],
        }
        assert c.server_metadata()["name"] == "maas_jax"
        out = c.infer("affine", f, request_id="r-1", version="1")
        np.testing.assert_allclose(out["y"], f["x"] @ W, rtol=1e-6)
        np.testing.assert_array_equal(out["k2"], f["k"] * 2)
        assert list(c.infer("affine", f, outputs=["k2"])) == ["k2"]
        with pytest.raises(ServeError, match=r"HTTP 400: input 'x': expected FP32") as info:
            c.infer("affine", {**f, "x": f["x"].astype(np.float64)})
        assert info.value.status == 400
        with pytest.raises(ServeError, match=r"HTTP 404: unknown model 'nope'"):
            c.infer("nope", f)
    with Client(server.url, api_key="wrong", binary=binary) as c, pytest.raises(ServeError) as info:
        c.infer("affine", f)
    assert (info.value.status, info.value.message) == (401, "Unauthorized")
    with Client(server.url, api_key="wrong") as c:
        assert "wrong" not in repr(c)


def test_tritonclient_gives_the_same_numbers(server):
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    f = feed(rows=5, seed=1)
    with Client(server.url, api_key=KEY) as ours:
        want = ours.infer("affine", f)
    headers = {"Authorization": f"Bearer {KEY}"}
    tc = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert tc.is_server_live(headers=headers)
        assert tc.is_server_ready(headers=headers)
        assert tc.is_model_ready("affine", headers=headers)
        meta = tc.get_model_metadata("affine", headers=headers)
        assert meta["name"] == "affine" and meta["platform"] == "maas_jax"
        assert tc.get_server_metadata(headers=headers)["extensions"][0] == "binary_tensor_data"
        for in_binary in (False, True):
            for out_binary in (None, False, True):
                inputs = [
                    httpclient.InferInput("x", [5, 4], "FP32"),
                    httpclient.InferInput("k", [5, 2], "INT32"),
                ]
                inputs[0].set_data_from_numpy(f["x"], binary_data=in_binary)
                inputs[1].set_data_from_numpy(f["k"], binary_data=in_binary)
                outputs = (
                    None
                    if out_binary is None
                    else [
                        httpclient.InferRequestedOutput("y", binary_data=out_binary),
                        httpclient.InferRequestedOutput("k2", binary_data=out_binary),
                    ]
                )
                res = tc.infer(
                    "affine",
                    inputs,
                    outputs=outputs,
                    request_id="tc-1",
                    headers=headers,
                    timeout=5_000_000,
                )
                np.testing.assert_array_equal(res.as_numpy("y"), want["y"])
                np.testing.assert_array_equal(res.as_numpy("k2"), want["k2"])
                assert res.get_response()["id"] == "tc-1"
        bad = httpclient.InferInput("x", [5, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((5, 3), np.float32))
        with pytest.raises(InferenceServerException, match=r"input 'x': expected FP32 shape"):
            tc.infer("affine", [bad], headers=headers)
        with pytest.raises(InferenceServerException, match="Unauthorized"):
            tc.infer("affine", inputs)
    finally:
        tc.close()


def test_a_jitted_jax_model():
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(W)
    f = jax.jit(lambda x: jnp.tanh(x @ w) * 2)
    model = from_callable(
        lambda x: {"y": np.asarray(f(x))},
        name="jaxmodel",
        inputs=[TensorSpec("x", "float32", (-1, 4))],
        outputs=[TensorSpec("y", "float32", (-1, 3))],
        batch_sizes=(2, 8),
    )
    with serve_in_thread([model]) as s, Client(s.url) as c:  # ready = both buckets compiled
        for rows in (1, 3, 8):
            x = feed(rows, seed=rows)["x"]
            np.testing.assert_allclose(
                c.infer("jaxmodel", {"x": x})["y"], np.tanh(x @ W) * 2, rtol=1e-5, atol=1e-6
            )
