"""The Open Inference Protocol layer on its own: parsing, validation messages, encoding."""

import json

import httpx
import numpy as np
import pytest

from maas_jax.serve import TensorSpec
from maas_jax.serve.auth import check_key, hash_keys, load_api_keys
from maas_jax.serve.client import _decode
from maas_jax.serve.protocol import (
    InferRequest,
    Rejected,
    Signature,
    encode_infer_response,
    oip_datatype,
    parse_infer_request,
)

SIG = Signature(
    "m",
    "1",
    [
        TensorSpec("input_ids", "int32", (-1, 4)),
        TensorSpec("mask", "bool", (-1, 4)),
        TensorSpec("scale", "float32", (-1,)),
    ],
    [TensorSpec("y", "float32", (-1, 4)), TensorSpec("q", "int8", (-1, 2))],
    (1, 2, 8),
)


def _inp(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _ok_inputs(rows=2):
    return [
        _inp("input_ids", "INT32", [rows, 4], list(range(rows * 4))),
        _inp("mask", "BOOL", [rows, 4], [True, False] * (rows * 2)),
        _inp("scale", "FP32", [rows], [0.5] * rows),
    ]


def _parse(obj, sig=SIG):
    return parse_infer_request(json.dumps(obj).encode(), None, sig)


def _binary_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    h = json.dumps(header).encode()
    return h + b"".join(chunks), len(h)


def test_json_flat_and_nested_parse_to_model_dtypes():
    req = _parse({"id": "r1", "inputs": _ok_inputs()})
    assert req.rows == 2 and req.id == "r1"
    np.testing.assert_array_equal(
        req.inputs["input_ids"], np.arange(8, dtype=np.int32).reshape(2, 4)
    )
    assert req.inputs["input_ids"].dtype == np.int32
    assert req.inputs["mask"].dtype == np.bool_ and req.inputs["mask"][0].tolist() == [
        True,
        False,
        True,
        False,
    ]
    assert req.inputs["scale"].dtype == np.float32
    assert req.outputs == [("y", False), ("q", False)]
    nested = _ok_inputs()
    nested[0]["data"] = [[0, 1, 2, 3], [4, 5, 6, 7]]
    np.testing.assert_array_equal(
        _parse({"inputs": nested}).inputs["input_ids"], req.inputs["input_ids"]
    )


def test_generated_id_when_absent():
    assert len(_parse({"inputs": _ok_inputs()}).id) == 32


def test_binary_inputs_and_mixed_json():
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    mask = np.array([[1, 0, 2, 0]] * 2, np.uint8)  # any non-zero byte is true
    header = {
        "inputs": [
            {
                "name": "input_ids",
                "datatype": "INT32",
                "shape": [2, 4],
                "parameters": {"binary_data_size": 32},
            },
            {
                "name": "mask",
                "datatype": "BOOL",
                "shape": [2, 4],
                "parameters": {"binary_data_size": 8},
            },
            _inp("scale", "FP32", [2], [1.0, 2.0]),
        ],
        "outputs": [{"name": "q", "parameters": {"binary_data": True}}],
    }
    body, n = _binary_body(header, ids.tobytes(), mask.tobytes())
    req = parse_infer_request(body, n, SIG)
    np.testing.assert_array_equal(req.inputs["input_ids"], ids)
    assert req.inputs["mask"].tolist() == [[True, False, True, False]] * 2
    assert req.outputs == [("q", True)]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda o: o["inputs"][2].update(datatype="FP64"),
            r"input 'scale': expected FP32 shape \[-1\], got FP64 \[2\]",
        ),
        (
            lambda o: o["inputs"][0].update(datatype="FP32"),
            r"input 'input_ids': expected INT32 shape \[-1, 4\], got FP32 \[2, 4\]",
        ),
        (
            lambda o: o["inputs"][0].update(shape=[2, 64]),
            r"input 'input_ids': expected INT32 shape \[-1, 4\], got INT32 \[2, 64\]",
        ),
        (
            lambda o: o["inputs"][0].update(shape=[8]),
            r"expected INT32 shape \[-1, 4\], got INT32 \[8\]",
        ),
        (
            lambda o: o["inputs"][0].update(shape=[0, 4], data=[]),
            r"batch dimension must be at least 1",
        ),
        (
            lambda o: o["inputs"][0].update(name="ids"),
            r"unknown input 'ids'; model 'm' version '1' takes input_ids INT32 shape \[-1, 4\]",
        ),
        (lambda o: o["inputs"].pop(1), r"missing input 'mask'; model 'm' version '1' takes"),
        (lambda o: o["inputs"].append(o["inputs"][0]), r"input 'input_ids' is given twice"),
        (
            lambda o: o["inputs"][0].update(data=[1, 2, 3]),
            r"input 'input_ids': shape \[2, 4\] needs 8 values, 'data' has 3",
        ),
        (
            lambda o: o["inputs"][0].update(data=[1.5] * 8),
            r"input 'input_ids': INT32 data must be integers",
        ),
        (
            lambda o: o["inputs"][0].update(data=[2**40] * 8),
            r"value 1099511627776 is out of range for INT32",
        ),
        (lambda o: o["inputs"][0].update(data=["a"] * 8), r"INT32 data must be integers"),
        (
            lambda o: o["inputs"][0].update(data=[[1, 2], [3]]),
            r"'data' must be a flat \(row-major\) or nested list",
        ),
        (lambda o: o["inputs"][0].update(data=None), r"'data' must be a list"),
        (lambda o: o["inputs"][1].update(data=[1] * 8), r"BOOL data must be true/false"),
        (lambda o: o["inputs"][2].update(data=[True, False]), r"FP32 data must be numbers"),
        (
            lambda o: o["inputs"][2].update(shape=[3], data=[1, 2, 3]),
            r"same batch size.*'scale': 3",
        ),
        (lambda o: o["inputs"][0].pop("data"), r"input 'input_ids' has neither 'data' nor"),
        (lambda o: o["inputs"][0].update(shape=[2, True]), r"'shape' must be a list of integers"),
        (lambda o: o["inputs"][0].update(datatype=3), r"'datatype' must be a string"),
        (lambda o: o.update(id=7), r"'id' must be a string"),
        (lambda o: o.update(inputs=[]), r"'inputs' must be a non-empty list"),
        (lambda o: o.update(inputs={"a": 1}), r"'inputs' must be a non-empty list"),
        (
            lambda o: o.update(outputs=[{"name": "z"}]),
            r"unknown output 'z'; model 'm' version '1' returns y FP32",
        ),
        (
            lambda o: o.update(outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
            r"binary_data must be true or false",
        ),
        (
            lambda o: o.update(parameters={"timeout_ms": -1}),
            r"timeout_ms must be a positive number",
        ),
        (lambda o: o.update(parameters={"timeout": 1.5}), r"parameters.timeout \(microseconds"),
        (lambda o: o.update(parameters=[]), r"'parameters' must be a JSON object"),
        (
            lambda o: (
                o["inputs"][0].update(parameters={"binary_data_size": 32}, data=None)
                or o["inputs"][0].pop("data")
            ),
            r"no Inference-Header-Content-Length header",
        ),
    ],
)
def test_invalid_requests_name_the_input_and_signature(mutate, match):
    obj = {"inputs": _ok_inputs()}
    mutate(obj)
    with pytest.raises(Rejected, match=match) as info:
        _parse(obj)
    assert info.value.status == 400


def test_too_many_rows_is_refused_naming_the_limit():
    with pytest.raises(
        Rejected, match=r"9 rows but model 'm' version '1' accepts at most 8 rows per request"
    ) as info:
        _parse({"inputs": _ok_inputs(rows=9)})
    assert info.value.status == 400


@pytest.mark.parametrize(
    "body, match",
    [
        (b"{", r"malformed JSON"),
        (b"", r"malformed JSON"),
        (b"\xff\xfe\x00", r"malformed JSON"),
        (b"[" * 100_000, r"malformed JSON"),
        (b"[1, 2]", r"must be a JSON object with an 'inputs' list, got list"),
        (b"null", r"got NoneType"),
    ],
)
def test_malformed_json(body, match):
    with pytest.raises(Rejected, match=match):
        parse_infer_request(body, None, SIG)


def test_binary_framing_errors():
    ids = np.zeros((2, 4), np.int32).tobytes()
    header = {
        "inputs": [
            {
                "name": "input_ids",
                "datatype": "INT32",
                "shape": [2, 4],
                "parameters": {"binary_data_size": 32},
            },
            _inp("mask", "BOOL", [2, 4], [True] * 8),
            _inp("scale", "FP32", [2], [1.0, 2.0]),
        ]
    }
    body, n = _binary_body(header, ids)
    with pytest.raises(
        Rejected, match=r"Inference-Header-Content-Length is 99999 but the body has"
    ):
        parse_infer_request(body, 99999, SIG)
    with pytest.raises(Rejected, match=r"ends after 31 of its 32 bytes"):
        parse_infer_request(body[:-1], n, SIG)
    with pytest.raises(Rejected, match=r"has 3 bytes after the last binary input"):
        parse_infer_request(body + b"abc", n, SIG)
    header["inputs"][0]["parameters"]["binary_data_size"] = 16
    body, n = _binary_body(header, ids[:16])
    with pytest.raises(Rejected, match=r"needs 32 bytes, parameters.binary_data_size is 16"):
        parse_infer_request(body, n, SIG)


def test_timeouts_take_the_shortest():
    req = _parse({"inputs": _ok_inputs(), "parameters": {"timeout_ms": 250, "timeout": 500_000}})
    assert req.timeout_s == pytest.approx(0.25)


def test_encode_json_and_binary_round_trip_through_the_client_decoder():
    y = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    q = np.array([[-128, 127], [0, 1]], np.int8)
    for outputs in (
        [("y", False), ("q", False)],
        [("y", True), ("q", True)],
        [("q", True), ("y", False)],
    ):
        req = InferRequest({}, 2, outputs, "id-1")
        body, n = encode_infer_response(SIG, req, {"y": y, "q": q})
        headers = {} if n is None else {"Inference-Header-Content-Length": str(n)}
        assert (n is None) == (not any(b for _, b in outputs))
        got = _decode(httpx.Response(200, content=body, headers=headers))
        assert list(got) == [name for name, _ in outputs]
        np.testing.assert_array_equal(got["y"], y)  # exact: float32 survives JSON via repr
        np.testing.assert_array_equal(got["q"], q)
        head = json.loads(body if n is None else body[:n])
        assert head["model_name"] == "m" and head["model_version"] == "1" and head["id"] == "id-1"


def test_datatypes():
    assert [
        oip_datatype(d) for d in ("float32", "int32", "int8", "bool", "bfloat16", "float16")
    ] == [
        "FP32",
        "INT32",
        "INT8",
        "BOOL",
        "BF16",
        "FP16",
    ]
    with pytest.raises(
        ValueError, match=r"dtype 'complex64' has no Open Inference Protocol datatype"
    ):
        oip_datatype("complex64")


def test_key_hashing_and_loading(tmp_path, monkeypatch):
    digests = hash_keys(["alpha", "beta"])
    assert all(len(d) == 32 for d in digests)
    assert check_key(b"Bearer beta", b"", digests)
    assert check_key(b"bearer alpha", b"", digests)
    assert check_key(b"", b"alpha", digests)
    assert not check_key(b"Bearer gamma", b"", digests)
    assert not check_key(b"Basic alpha", b"", digests)
    assert not check_key(b"", b"", digests)
    f = tmp_path / "keys"
    f.write_text("# team keys\nalpha\n\n  beta  \n#gamma\n")
    monkeypatch.setenv("MY_KEYS", "delta, alpha,")
    assert load_api_keys(f, env="MY_KEYS") == ["alpha", "beta", "delta"]
    assert load_api_keys(env="UNSET_MAAS_KEYS_VAR") == []
    with pytest.raises(ValueError, match="non-empty strings"):
        hash_keys([""])
