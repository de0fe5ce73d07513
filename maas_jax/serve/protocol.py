"""The Open Inference Protocol (KServe v2) over REST, with Triton's binary tensor extension.

This module turns HTTP bodies into validated numpy arrays and back; it knows nothing of HTTP
frameworks, queues or models beyond their signature, so it is tested on its own.

Request (``POST /v2/models/{m}/infer``)::

    {"id": "42", "parameters": {"timeout_ms": 100},
     "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}],
     "outputs": [{"name": "y", "parameters": {"binary_data": true}}]}

``data`` is the tensor flattened in row-major order (nested lists are accepted too). With the
binary extension the JSON above is followed by raw little-endian bytes: the header's length
goes in the ``Inference-Header-Content-Length`` HTTP header and each binary input carries
``parameters.binary_data_size`` instead of ``data``. Outputs asked for with
``parameters.binary_data: true`` (or every output, with the request parameter
``binary_data_output: true``) come back the same way.

Every problem with a request raises :class:`Rejected` with an HTTP status and a message that
names the input and the expected signature:

>>> import numpy as np
>>> from maas_jax.serve import TensorSpec
>>> sig = Signature("m", "1", [TensorSpec("x", "float32", (-1, 3))],
...                 [TensorSpec("y", "float32", (-1, 3))], (1, 4))
>>> req = parse_infer_request(
...     b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}',
...     None, sig)
>>> req.rows, req.inputs["x"].dtype.name
(1, 'float32')
>>> parse_infer_request(
...     b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]}',
...     None, sig)
Traceback (most recent call last):
...
maas_jax.serve.protocol.Rejected: 400: input 'x': expected FP32 shape [-1, 3], got INT32 [1, 3]
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maas_jax._signature import NUMPY_TO_OIP, TensorSpec

__all__ = [
    "OIP_DATATYPES",
    "InferRequest",
    "Rejected",
    "Signature",
    "encode_infer_response",
    "numpy_dtype",
    "oip_datatype",
    "parse_infer_request",
]

# numpy dtype name -> OIP datatype. BYTES (length-prefixed strings) has no numpy twin here:
# the served models take numeric tensors only, so a BYTES input is refused with a 400.
_NP_TO_OIP: dict[str, str] = NUMPY_TO_OIP
_OIP_TO_NP = {v: k for k, v in _NP_TO_OIP.items()}
OIP_DATATYPES: tuple[str, ...] = (*_NP_TO_OIP.values(), "BYTES")


class Rejected(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``.

    ``reason`` is the short label the failure counter uses (``bad_request``, ``queue_full``,
    ...); ``headers`` go on the response (``Retry-After`` on a 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str = "bad_request",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = dict(headers or {})


def _bad(message: str) -> Rejected:
    return Rejected(400, message)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a :class:`TensorSpec` dtype name (``"bfloat16"`` via ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency; numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def oip_datatype(dtype: str | np.dtype) -> str:
    """The OIP datatype (``"FP32"``, ``"INT8"``, ...) of a numpy dtype or dtype name."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _NP_TO_OIP[np.dtype(name).name if name != "bfloat16" else name]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype {name!r} has no Open Inference Protocol datatype; served tensors must be one "
            f"of {sorted(_NP_TO_OIP)}"
        ) from None


def _sig_str(spec: TensorSpec) -> str:
    return f"{oip_datatype(spec.dtype)} shape {list(spec.shape)}"


@dataclass(frozen=True)
class Signature:
    """What the protocol layer needs of a model: names, specs and the largest bucket."""

    name: str
    version: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    batch_sizes: Sequence[int]

    @property
    def max_rows(self) -> int:
        return int(self.batch_sizes[-1])

    def describe(self, specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name} {_sig_str(s)}" for s in specs)

    @property
    def label(self) -> str:
        return f"model '{self.name}' version '{self.version}'"


@dataclass
class InferRequest:
    """A validated inference request: arrays with the model's dtypes, all with ``rows`` rows."""

    inputs: dict[str, np.ndarray]
    rows: int
    outputs: list[tuple[str, bool]]  # (output name, send as binary)
    id: str
    timeout_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- request parsing --------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _object(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"{where} must be a JSON object, got {type(v).__name__}")
    return v


def _timeout(params: dict[str, Any]) -> float | None:
    """``timeout_ms`` (ours) and ``timeout`` (Triton's, in microseconds) -> seconds."""
    found = []
    if "timeout_ms" in params:
        t = params["timeout_ms"]
        if not _is_number(t) or not math.isfinite(t) or t <= 0:
            raise _bad(
                f"parameters.timeout_ms must be a positive number of milliseconds, got {t!r}"
            )
        found.append(t / 1e3)
    if "timeout" in params:
        t = params["timeout"]
        if not _is_int(t) or t <= 0:
            raise _bad(
                f"parameters.timeout (microseconds, as tritonclient sends it) must be a positive "
                f"integer, got {t!r}"
            )
        found.append(t / 1e6)
    return min(found) if found else None


def parse_infer_request(body: bytes, header_length: int | None, sig: Signature) -> InferRequest:
    """Parse and validate an inference request body against ``sig``.

    Args:
      body: the whole HTTP body.
      header_length: the ``Inference-Header-Content-Length`` header (binary extension), or
        ``None`` when the body is JSON only.
      sig: the model's signature.

    Raises:
      Rejected: 400 with a message naming the offending input and the expected signature.
    """
    if header_length is None:
        header, tail = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise _bad(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes"
            )
        header, tail = body[:header_length], memoryview(body)[header_length:]
    try:
        obj = json.loads(header)
    except RecursionError:
        raise _bad("malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _bad(f"malformed JSON: {e}") from None

    if not isinstance(obj, dict):
        raise _bad(
            f"the request must be a JSON object with an 'inputs' list, got {type(obj).__name__}"
        )
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise _bad(f"'id' must be a string, got {type(req_id).__name__}")
    params = _object(obj.get("parameters"), "'parameters'")
    timeout_s = _timeout(params)
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad(f"parameters.binary_data_output must be true or false, got {binary_default!r}")

    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad(
            f"'inputs' must be a non-empty list; {sig.label} takes {sig.describe(sig.inputs)}"
        )
    specs = {s.name: s for s in sig.inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise _bad(f"inputs[{i}] must be a JSON object, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str):
            raise _bad(f"inputs[{i}].name must be a string, got {name!r}")
        spec = specs.get(name)
        if spec is None:
            raise _bad(f"unknown input {name!r}; {sig.label} takes {sig.describe(sig.inputs)}")
        if name in arrays:
            raise _bad(f"input {name!r} is given twice")
        datatype, shape = item.get("datatype"), item.get("shape")
        if not isinstance(datatype, str):
            raise _bad(
                f"input {name!r}: 'datatype' must be a string such as 'FP32', got {datatype!r}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _bad(f"input {name!r}: 'shape' must be a list of integers, got {shape!r}")
        _check_signature(spec, datatype, shape)
        iparams = _object(item.get("parameters"), f"input {name!r}: 'parameters'")
        dtype = numpy_dtype(spec.dtype)
        count = math.prod(shape)
        if "binary_data_size" in iparams:
            size = iparams["binary_data_size"]
            if not _is_int(size) or size < 0:
                raise _bad(
                    f"input {name!r}: parameters.binary_data_size must be a non-negative "
                    f"integer, got {size!r}"
                )
            if "data" in item:
                raise _bad(f"input {name!r} has both 'data' and parameters.binary_data_size")
            if header_length is None:
                raise _bad(
                    f"input {name!r} sets parameters.binary_data_size but the request has no "
                    f"Inference-Header-Content-Length header (binary tensor extension)"
                )
            if size != count * dtype.itemsize:
                raise _bad(
                    f"input {name!r}: shape {shape} of {datatype} needs "
                    f"{count * dtype.itemsize} bytes, parameters.binary_data_size is {size}"
                )
            if offset + size > len(tail):
                raise _bad(
                    f"input {name!r}: the binary payload ends after {len(tail) - offset} of "
                    f"its {size} bytes"
                )
            arrays[name] = _from_bytes(tail[offset : offset + size], dtype, shape)
            offset += size
        elif "data" in item:
            arrays[name] = _from_json(item["data"], dtype, spec, shape)
        else:
            raise _bad(
                f"input {name!r} has neither 'data' nor parameters.binary_data_size (binary)"
            )
    if offset != len(tail):
        raise _bad(
            f"the binary payload has {len(tail) - offset} bytes after the last binary input "
            f"(Inference-Header-Content-Length or binary_data_size is wrong)"
        )
    missing = [s.name for s in sig.inputs if s.name not in arrays]
    if missing:
        raise _bad(
            f"missing input {', '.join(map(repr, missing))}; {sig.label} takes "
            f"{sig.describe(sig.inputs)}"
        )
    rows = {n: int(a.shape[0]) for n, a in arrays.items()}
    if len(set(rows.values())) > 1:
        raise _bad(f"all inputs must have the same batch size (first dimension), got {rows}")
    n_rows = next(iter(rows.values()))
    if n_rows > sig.max_rows:
        # Refused rather than split: a request is one unit of latency and of failure, and a
        # client that sends more rows than the largest compiled batch should know it does.
        raise _bad(
            f"the request has {n_rows} rows but {sig.label} accepts at most {sig.max_rows} rows "
            f"per request (its largest compiled batch size); split it into requests of at most "
            f"{sig.max_rows} rows"
        )
    return InferRequest(
        arrays,
        n_rows,
        _requested_outputs(obj.get("outputs"), sig, binary_default),
        req_id if req_id is not None else uuid.uuid4().hex,
        timeout_s,
        params,
    )


def _check_signature(spec: TensorSpec, datatype: str, shape: list[int]) -> None:
    want = oip_datatype(spec.dtype)
    ok = (
        datatype == want
        and len(shape) == len(spec.shape)
        and shape[0] >= 1
        and all(d == e for d, e in zip(shape[1:], spec.shape[1:], strict=True) if e != -1)
        and all(d >= 0 for d in shape)
    )
    if not ok:
        msg = f"input {spec.name!r}: expected {_sig_str(spec)}, got {datatype} {shape}"
        if datatype == want and len(shape) == len(spec.shape) and shape and shape[0] < 1:
            msg += " (the batch dimension must be at least 1)"
        raise _bad(msg)


def _from_bytes(buf: memoryview, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype == np.bool_:
        # Triton sends BOOL as one byte per element; any non-zero byte is true.
        return np.frombuffer(buf, np.uint8).reshape(shape) != 0
    arr = np.frombuffer(buf, dtype).reshape(shape)
    if sys.byteorder == "big":  # the wire format is little-endian
        arr = arr.byteswap()
    return arr


def _from_json(data: Any, dtype: np.dtype, spec: TensorSpec, shape: list[int]) -> np.ndarray:
    name, oip = spec.name, oip_datatype(spec.dtype)
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a list (row-major), got {type(data).__name__}")
    try:
        with np.errstate(all="ignore"):
            arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise _bad(
            f"input {name!r}: 'data' must be a flat (row-major) or nested list of {oip} values"
        ) from None
    count = math.prod(shape)
    if arr.size != count:
        raise _bad(f"input {name!r}: shape {shape} needs {count} values, 'data' has {arr.size}")
    kind = arr.dtype.kind
    if count == 0:
        return np.zeros(shape, dtype)
    if dtype == np.bool_:
        if kind != "b":
            raise _bad(f"input {name!r}: BOOL data must be true/false values")
    elif dtype.kind in "iu":
        if kind not in "iu":
            raise _bad(f"input {name!r}: {oip} data must be integers")
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise _bad(
                f"input {name!r}: value {lo if lo < info.min else hi} is out of range for {oip} "
                f"[{info.min}, {info.max}]"
            )
    elif kind not in "iuf":  # floating input: ints and floats are fine, bools and strings not
        raise _bad(f"input {name!r}: {oip} data must be numbers")
    with np.errstate(all="ignore"):  # 1e300 as FP32 is inf, as numpy casts it
        return arr.reshape(shape).astype(dtype)


def _requested_outputs(raw: Any, sig: Signature, binary_default: bool) -> list[tuple[str, bool]]:
    if raw is None:
        return [(s.name, binary_default) for s in sig.outputs]
    if not isinstance(raw, list):
        raise _bad(f"'outputs' must be a list, got {type(raw).__name__}")
    names = {s.name for s in sig.outputs}
    out: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"outputs[{i}] must be a JSON object, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str):
            raise _bad(f"outputs[{i}].name must be a string, got {name!r}")
        if name not in names:
            raise _bad(f"unknown output {name!r}; {sig.label} returns {sig.describe(sig.outputs)}")
        oparams = _object(item.get("parameters"), f"output {name!r}: 'parameters'")
        binary = oparams.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: parameters.binary_data must be true or false")
        if name not in seen:
            seen.add(name)
            out.append((name, binary))
    return out or [(s.name, binary_default) for s in sig.outputs]


# -- responses --------------------------------------------------------------------------------


def tensor_bytes(arr: np.ndarray) -> bytes:
    """The binary-tensor-extension bytes of ``arr``: little-endian, C order, bools as bytes."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8).tobytes()
    if sys.byteorder == "big":
        arr = arr.byteswap()
    return np.ascontiguousarray(arr).tobytes()


def _to_json_list(arr: np.ndarray) -> list[Any]:
    flat = arr.ravel()
    if flat.dtype.name == "bfloat16":
        flat = flat.astype(np.float32)  # exact: every bfloat16 is a float32
    return flat.tolist()


def encode_infer_response(
    sig: Signature, req: InferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body for ``outputs``, and the JSON header length when binary data follows.

    >>> import numpy as np
    >>> sig = Signature("m", "1", [], [TensorSpec("y", "int8", (-1,))], (4,))
    >>> req = InferRequest({}, 2, [("y", False)], "7")
    >>> encode_infer_response(sig, req, {"y": np.array([1, -1], np.int8)})[0]
    b'{"model_name": "m", "model_version": "1", "id": "7", "outputs": [{"name": "y", "datatype": "INT8", "shape": [2], "data": [1, -1]}]}'
    """
    specs = {s.name: s for s in sig.outputs}
    entries, chunks = [], []
    for name, binary in req.outputs:
        arr = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": oip_datatype(specs[name].dtype),
            "shape": [int(d) for d in arr.shape],
        }
        if binary:
            raw = tensor_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json_list(arr)
        entries.append(entry)
    head = {"model_name": sig.name, "model_version": sig.version, "id": req.id, "outputs": entries}
    header = json.dumps(head).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
