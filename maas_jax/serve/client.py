"""A small synchronous client: numpy in, numpy out, over JSON or the binary tensor extension.

>>> from maas_jax.serve import Client
>>> c = Client("http://127.0.0.1:8000", api_key=None)  # doctest: +SKIP
>>> c.wait_ready()  # doctest: +SKIP
>>> c.infer("double", {"x": np.ones((2, 3), np.float32)})["y"]  # doctest: +SKIP
array([[2., 2., 2.],
       [2., 2., 2.]], dtype=float32)

Any server (tritonclient's endpoints are the same) that speaks the Open Inference Protocol
answers it. A 4xx/5xx answer raises :class:`ServeError` with the status and the server's
message.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from maas_jax.serve.protocol import numpy_dtype, oip_datatype, tensor_bytes

__all__ = ["Client", "ServeError"]

_OIP_TO_NP = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}


class ServeError(Exception):
    """A 4xx/5xx answer: ``status``, the server's ``message``, and ``retry_after`` (s) if sent."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        message = r.json()["error"]
    except Exception:  # not our JSON error body (a proxy, a crash)
        message = r.text[:500]
    retry = r.headers.get("retry-after")
    try:
        retry_s = float(retry) if retry is not None else None
    except ValueError:
        retry_s = None
    raise ServeError(r.status_code, str(message), retry_s)


class Client:
    """Talk to a maas_jax (or any OIP v2) server.

    Args:
      url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
      api_key: sent as ``Authorization: Bearer <key>``.
      binary: send and receive tensors as raw bytes (binary tensor extension) rather than as
        JSON lists; faster and exact for every dtype.
      timeout: seconds per HTTP request.
      http_client: an :class:`httpx.Client` to use instead of a new one (for example a
        :class:`starlette.testclient.TestClient`); its ``base_url`` is then ``url``'s.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        binary: bool = True,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.binary = binary
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own = http_client is None
        self._http = http_client or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._url = "" if http_client is not None else url.rstrip("/")
        # ``timeout`` lives on our own httpx.Client; a caller's http_client (e.g. starlette's
        # TestClient, which refuses per-request timeouts) keeps its own.

    def __repr__(self) -> str:  # never show the key
        return f"Client({str(self._http.base_url)!r}, binary={self.binary})"

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, path: str) -> httpx.Response:
        return self._http.get(path, headers=self._headers)

    @staticmethod
    def _model_path(model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{quote(str(version), safe='')}"
        return path

    # -- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return self._get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self._get("/v2/health/ready").status_code == 200

    def model_ready(self, model: str, version: str | None = None) -> bool:
        r = self._get(self._model_path(model, version) + "/ready")
        if r.status_code == 503:
            return False
        _raise_for(r)
        return bool(r.json()["ready"])

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> None:
        """Poll ``/v2/health/ready`` until it is true; :class:`TimeoutError` after ``timeout``."""
        t_end = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > t_end:
                raise TimeoutError(f"server not ready after {timeout} s")
            time.sleep(interval)

    def server_metadata(self) -> dict[str, Any]:
        r = self._get("/v2")
        _raise_for(r)
        return r.json()

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        r = self._get(self._model_path(model, version))
        _raise_for(r)
        return r.json()

    def metrics(self) -> str:
        r = self._get("/metrics")
        _raise_for(r)
        return r.text

    # -- inference ---------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        *,
        timeout_ms: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (name -> array, batch first) and return its outputs.

        Arrays are sent with their own dtype (the server says which it expects if they
        differ). ``outputs`` selects outputs by name (default all); ``timeout_ms`` sets the
        request's deadline on the server.
        """
        arrays = {name: np.asarray(v) for name, v in inputs.items()}
        entries, chunks = [], []
        for name, arr in arrays.items():
            entry: dict[str, Any] = {
                "name": name,
                "datatype": oip_datatype(arr.dtype),
                "shape": list(arr.shape),
            }
            if self.binary:
                raw = tensor_bytes(arr)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                flat = arr.ravel()
                if flat.dtype.name == "bfloat16":
                    flat = flat.astype(np.float32)
                entry["data"] = flat.tolist()
            entries.append(entry)
        body: dict[str, Any] = {"inputs": entries}
        if request_id is not None:
            body["id"] = request_id
        params: dict[str, Any] = {}
        if timeout_ms is not None:
            params["timeout_ms"] = timeout_ms
        if outputs is not None:
            body["outputs"] = [
                {"name": n, "parameters": {"binary_data": self.binary}} for n in outputs
            ]
        elif self.binary:
            params["binary_data_output"] = True
        if params:
            body["parameters"] = params
        header = json.dumps(body).encode()
        if self.binary:
            content = b"".join([header, *chunks])
            headers = {
                **self._headers,
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            }
        else:
            content = header
            headers = {**self._headers, "Content-Type": "application/json"}
        r = self._http.post(
            self._model_path(model, version) + "/infer",
            content=content,
            headers=headers,
        )
        _raise_for(r)
        return _decode(r)


def _decode(r: httpx.Response) -> dict[str, np.ndarray]:
    data = r.content
    hlen = r.headers.get("inference-header-content-length")
    if hlen is None:
        head, tail = json.loads(data), b""
    else:
        n = int(hlen)
        head, tail = json.loads(data[:n]), memoryview(data)[n:]
    out, offset = {}, 0
    for o in head["outputs"]:
        dtype = numpy_dtype(_OIP_TO_NP[o["datatype"]])
        shape = o["shape"]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            buf = tail[offset : offset + size]
            offset += size
            if dtype == np.bool_:
                arr = np.frombuffer(buf, np.uint8) != 0
            else:
                arr = np.frombuffer(buf, dtype).copy()
                if sys.byteorder == "big":
                    arr = arr.byteswap()
        else:
            arr = np.asarray(o["data"], dtype=np.float64 if dtype.name == "bfloat16" else dtype)
            arr = arr.astype(dtype, copy=False)
        out[o["name"]] = arr.reshape(shape)
    return out
