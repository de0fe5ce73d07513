"""schemathesis against the live ``/openapi.json``: no 5xx, every answer conforms to the schema.

Positive (schema-valid) and negative (schema-invalid) requests for every operation, with the
API key configured, as vLLM's schema test does. ``positive_data_acceptance`` is not checked:
the schema cannot say that ``len(data) == prod(shape)`` or that a datatype matches the
model's, so a schema-valid request may rightly get a 400; every other default check runs
(no server error, status codes, content types, headers and bodies as documented, negative
data rejected, missing auth refused).
"""

import numpy as np
import pytest

from maas_jax.serve import TensorSpec, from_callable, serve_in_thread

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def models():
    def affine(x):
        with np.errstate(all="ignore"):  # fuzzers send 1e308; inf is a fine answer
            return {"y": x * np.float32(2) + 1}

    def mixed(ids, flags):
        return {"out": ids.astype(np.int64).sum(axis=1).astype(np.int32), "any": flags.any(axis=1)}

    return [
        from_callable(
            affine,
            name="affine",
            inputs=[TensorSpec("x", "float32", (-1, 2))],
            outputs=[TensorSpec("y", "float32", (-1, 2))],
            batch_sizes=(1, 4),
        ),
        from_callable(
            mixed,
            name="mixed",
            version="3",
            inputs=[TensorSpec("ids", "int32", (-1, 3)), TensorSpec("flags", "bool", (-1, 2))],
            outputs=[TensorSpec("out", "int32", (-1,)), TensorSpec("any", "bool", (-1,))],
            batch_sizes=(2,),
        ),
    ]


@pytest.fixture(scope="module")
def server():
    with serve_in_thread(models(), api_keys=[KEY], max_queue_size=64) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, mode):
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    # every documented route of the Open Inference Protocol, with and without a version
    for route in (
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ):
        assert f"POST {route}" in labels, sorted(labels)
    assert {"GET /v2/health/live", "GET /v2/health/ready", "GET /v2"} <= labels, sorted(labels)
    generation = schemathesis.GenerationMode(mode)
    fuzzed = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        def fuzz(case):
            case.call_and_validate(
                base_url=server.url,
                headers=AUTH,
                excluded_checks=[positive_data_acceptance],
                timeout=10,
            )

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            # An operation with no parameters and no body has no invalid request to make.
            assert mode == "negative", operation.label
            continue
        fuzzed.append(operation.label)
    # The inference routes take a body, so they always have invalid requests to try.
    assert {label for label in fuzzed if label.endswith("/infer")} == {
        label for label in labels if label.endswith("/infer")
    }, fuzzed
