"""The OpenAPI 3.0 document of the server, written by hand (no pydantic in the hot path).

It describes what the handlers really answer, status by status, so that a fuzzer
(schemathesis) can check responses against it: the path parameters are enums of the served
model names and versions, and the request schemas carry the same constraints the server
enforces (a schema-invalid request is always refused with a 4xx). What JSON Schema cannot say
(``len(data) == prod(shape)``, a datatype matching the model's input) is checked by the server
and answered 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maas_jax.serve.protocol import OIP_DATATYPES, Signature, oip_datatype

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    r = _json(_ref("Error"), description)
    if retry:
        r["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}
        }
    return r


def _tensor_meta(sig_tensors: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)}
        for t in sig_tensors
    ]


def openapi_document(
    sigs: Sequence[Signature], *, secured: bool, server_version: str
) -> dict[str, Any]:
    """The OpenAPI document of an app serving ``sigs`` (``secured``: API keys configured)."""
    names = sorted({s.name for s in sigs})
    versions = sorted({s.version for s in sigs})
    input_names = sorted({t.name for s in sigs for t in s.inputs})
    output_names = sorted({t.name for s in sigs for t in s.outputs})

    model_param = {
        "name": "model_name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": names},
    }
    version_param = {
        "name": "model_version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": versions},
    }
    common = {
        "404": _error("Unknown model, version or path"),
        "405": _error("Method not allowed"),
    }
    if secured:
        common["401"] = _error("Missing or wrong API key")

    def get(op_id: str, ok: dict[str, Any], extra: dict[str, Any] | None = None, public=False):
        responses = {"200": ok, **common, **(extra or {})}
        if public:
            responses.pop("401", None)
        op: dict[str, Any] = {"operationId": op_id, "responses": responses}
        if public and secured:
            op["security"] = []
        return {"get": op}

    def with_params(item: dict[str, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"parameters": params, **item}

    infer_responses = {
        "200": {
            "description": "Outputs (JSON, or a JSON header then raw bytes with the binary "
            "tensor extension)",
            "headers": {
                "Inference-Header-Content-Length": {
                    "description": "Length of the JSON header when binary outputs follow",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
            "content": {
                "application/json": {"schema": _ref("InferResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "400": _error("Malformed request, wrong input name, datatype or shape"),
        **common,
        "413": _error("Body larger than max_body_bytes"),
        "415": _error("Content-Type is not application/json or application/octet-stream"),
        "500": _error("The model failed (a server fault)"),
        "503": _error("Queue full, model not ready, or shutting down", retry=True),
        "504": _error("The request's deadline passed"),
    }
    infer_op = {
        "post": {
            "operationId": "infer",
            "parameters": [
                {
                    "name": "Inference-Header-Content-Length",
                    "in": "header",
                    "required": False,
                    "description": "Binary tensor extension: length of the JSON header",
                    "schema": {"type": "integer", "minimum": 0},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("InferRequest")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": infer_responses,
        }
    }
    infer_v = {"post": {**infer_op["post"], "operationId": "infer_version"}}

    ready_resp = {"503": _json(_ref("ModelReady"), "Not ready (warming up)")}
    paths = {
        "/v2": get("server_metadata", _json(_ref("ServerMetadata"), "Server metadata")),
        "/v2/health/live": get("server_live", _json(_ref("Live"), "Live"), public=True),
        "/v2/health/ready": get(
            "server_ready",
            _json(_ref("Ready"), "Every model warmed up"),
            {"503": _json(_ref("Ready"), "Not ready (warming up)")},
            public=True,
        ),
        "/v2/models/{model_name}": with_params(
            get("model_metadata", _json(_ref("ModelMetadata"), "Model metadata")),
            [model_param],
        ),
        "/v2/models/{model_name}/versions/{model_version}": with_params(
            get("model_version_metadata", _json(_ref("ModelMetadata"), "Model metadata")),
            [model_param, version_param],
        ),
        "/v2/models/{model_name}/ready": with_params(
            get("model_ready", _json(_ref("ModelReady"), "Ready"), ready_resp), [model_param]
        ),
        "/v2/models/{model_name}/versions/{model_version}/ready": with_params(
            get("model_version_ready", _json(_ref("ModelReady"), "Ready"), ready_resp),
            [model_param, version_param],
        ),
        "/v2/models/{model_name}/infer": with_params(infer_op, [model_param]),
        "/v2/models/{model_name}/versions/{model_version}/infer": with_params(
            infer_v, [model_param, version_param]
        ),
        "/metrics": get(
            "metrics",
            {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            public=True,
        ),
        "/openapi.json": get("openapi", _json({"type": "object"}, "This document"), public=True),
    }

    tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": list(OIP_DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Live": {
            "type": "object",
            "required": ["live"],
            "properties": {"live": {"type": "boolean"}},
        },
        "Ready": {
            "type": "object",
            "required": ["ready"],
            "properties": {"ready": {"type": "boolean"}},
        },
        "ModelReady": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "ready": {"type": "boolean"},
            },
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "TensorMetadata": tensor_meta,
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("TensorMetadata")},
                "parameters": {"type": "object"},
            },
        },
        "InferInput": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string", "enum": input_names}
                if input_names
                else {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"type": "string", "enum": list(OIP_DATATYPES)},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                },
                "data": {"type": "array"},
            },
        },
        "RequestedOutput": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "enum": output_names}
                if output_names
                else {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data": {"type": "boolean"}},
                },
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {
                        "timeout_ms": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                        "timeout": {"type": "integer", "minimum": 1},
                        "binary_data_output": {"type": "boolean"},
                    },
                },
                "inputs": {"type": "array", "minItems": 1, "items": _ref("InferInput")},
                "outputs": {"type": "array", "items": _ref("RequestedOutput")},
            },
        },
        "InferOutput": {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"type": "string"},
                "datatype": {"type": "string", "enum": list(OIP_DATATYPES)},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "id", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "outputs": {"type": "array", "items": _ref("InferOutput")},
            },
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "maas_jax model server (Open Inference Protocol v2)",
            "version": server_version,
            "description": "KServe v2 / Open Inference Protocol REST with Triton's binary tensor "
            'extension. Errors are {"error": message}.',
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if secured:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc
