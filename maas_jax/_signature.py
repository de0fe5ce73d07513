"""A served tensor's name, dtype and shape: shared by artifacts and the server."""

from __future__ import annotations

from dataclasses import dataclass

#: numpy dtype name -> Open Inference Protocol (KServe v2) datatype, for every dtype a served
#: tensor may have. BYTES (length-prefixed strings) has no numpy twin and is not served.
NUMPY_TO_OIP: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape[0] == -1`` is the batch dimension."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int32", "int8", "bool", ...
    shape: tuple[int, ...]
