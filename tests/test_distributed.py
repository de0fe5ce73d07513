"""maas_jax.distributed: MeshSpec on the 8 fake CPU devices, batch slicing, initialize, and a
real 2-process data-parallel run over gloo on 127.0.0.1 checked against numpy."""

from __future__ import annotations

import doctest
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from maas_jax import distributed as dist

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "_two_process_train.py"


def test_docstring_examples_run():
    result = doctest.testmod(dist, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---- MeshSpec ------------------------------------------------------------------------------


def test_fill_minus_one_uses_all_devices():
    mesh = dist.MeshSpec({"data": -1}).build()
    assert dict(mesh.shape) == {"data": 8}
    mesh = dist.MeshSpec({"data": -1, "model": 2}).build()
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert mesh.axis_names == ("data", "model")
    mesh = dist.MeshSpec((("data", 2), ("model", -1))).build()
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert dist.MeshSpec({"a": -1, "b": 2}).shape(16) == (8, 2)
    assert dist.MeshSpec({"a": -1, "b": 2}).resolve(8) == {"a": 4, "b": 2}


def test_every_device_used_once():
    mesh = dist.MeshSpec({"data": 2, "model": 4}).build()
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_smaller_mesh_uses_first_devices():
    mesh = dist.MeshSpec({"data": 4}).build()
    assert [d.id for d in mesh.devices.flat] == [0, 1, 2, 3]
    mesh = dist.MeshSpec({"data": -1}).build(jax.devices()[4:])
    assert [d.id for d in mesh.devices.flat] == [4, 5, 6, 7]


def test_axis_types_auto_by_default_explicit_on_request():
    auto = dist.MeshSpec({"data": -1, "model": 2}).build()
    assert auto.axis_types == (AxisType.Auto, AxisType.Auto)
    explicit = dist.MeshSpec({"data": -1, "model": 2}, explicit=True).build()
    assert explicit.axis_types == (AxisType.Explicit, AxisType.Explicit)
    dcn = dist.MeshSpec({"data": 2, "model": 4}, dcn_axes={"data": 2}, explicit=True).build()
    assert dcn.axis_types == (AxisType.Explicit, AxisType.Explicit)


def test_auto_mesh_runs_unannotated_code():
    mesh = dist.MeshSpec({"data": -1}).build()
    x = jax.device_put(np.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("data")))
    w = jax.device_put(np.ones((2, 3)), NamedSharding(mesh, P()))
    y = jax.jit(lambda x, w: x @ w)(x, w)
    np.testing.assert_allclose(np.asarray(y), np.arange(16.0).reshape(8, 2) @ np.ones((2, 3)))


def test_spec_repr_eq_hash():
    a = dist.MeshSpec({"data": -1, "model": 2}, dcn_axes={"data": 2})
    b = dist.MeshSpec((("data", -1), ("model", 2)), dcn_axes={"data": 2, "model": 1})
    assert a == b and hash(a) == hash(b)
    assert a != dist.MeshSpec({"data": -1, "model": 2})
    assert repr(a) == "MeshSpec({'data': -1, 'model': 2}, dcn_axes={'data': 2})"
    assert a.names == ("data", "model") and a.dcn_axes == {"data": 2, "model": 1}


def test_error_two_minus_one():
    with pytest.raises(
        ValueError, match=r"at most one size may be -1, got -1 for 'data' and 'model'"
    ):
        dist.MeshSpec({"data": -1, "model": -1})


def test_error_sizes_do_not_divide_device_count():
    with pytest.raises(ValueError, match=r"\(product 3\) do not divide the device count 8"):
        dist.MeshSpec({"data": -1, "model": 3}).build()
    with pytest.raises(ValueError, match=r"mesh 3 \(data=3\).*do not divide the device count 8"):
        dist.MeshSpec({"data": 3}).build()


def test_error_mesh_larger_than_device_count():
    with pytest.raises(ValueError, match=r"^mesh 2x8 needs 16 devices, only 8 available"):
        dist.MeshSpec({"data": 2, "model": 8}).build()
    with pytest.raises(ValueError, match=r"mesh -1x16 needs at least 16 devices, only 8 available"):
        dist.MeshSpec({"data": -1, "model": 16}).build()


def test_error_unknown_axis_name():
    with pytest.raises(
        ValueError, match=r"unknown axis name 'modle'; the axes are \('data', 'model'\)"
    ):
        dist.MeshSpec({"data": 2, "model": 4}, dcn_axes={"modle": 2})
    mesh = dist.MeshSpec({"data": -1}).build()
    with pytest.raises(ValueError, match=r"unknown mesh axis 'batch'"):
        dist.process_batch(8, mesh, P("batch"))
    with pytest.raises(ValueError, match=r"unknown mesh axis 'batch'"):
        dist.make_global_batch(np.zeros((8, 2)), mesh, P("batch"))


def test_error_duplicate_axis_name():
    with pytest.raises(ValueError, match=r"duplicate axis name 'data'"):
        dist.MeshSpec((("data", 2), ("data", 4)))
    with pytest.raises(ValueError, match=r"duplicate axis name 'data'"):
        dist.MeshSpec({"data": 2}, dcn_axes=(("data", 2), ("data", 2)))


def test_error_bad_sizes():
    with pytest.raises(ValueError, match=r"size of axis 'data' must be positive or -1, got 0"):
        dist.MeshSpec({"data": 0})
    with pytest.raises(ValueError, match=r"DCN size 3 of axis 'data' does not divide its size 4"):
        dist.MeshSpec({"data": 4, "model": 2}, dcn_axes={"data": 3})
    with pytest.raises(ValueError, match=r"axis 'data' filled to 2, which is not a multiple of"):
        dist.MeshSpec({"data": -1, "model": 4}, dcn_axes={"data": 4}).build()
    with pytest.raises(ValueError, match=r"must be an int"):
        dist.MeshSpec({"data": 2.0})


# ---- DCN (multi-slice / multi-node) layouts --------------------------------------------------


def test_dcn_layout_builds_on_one_process():
    mesh = dist.MeshSpec({"data": 2, "model": 4}, dcn_axes={"data": 2}).build()
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    # one "slice" of 4 consecutive devices per data row
    assert [[d.id for d in row] for row in mesh.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    mesh = dist.MeshSpec({"data": -1, "model": 2}, dcn_axes={"data": 2}).build()
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert {d.id for d in mesh.devices[:2].flat} == {0, 1, 2, 3}


def test_dcn_layout_shards_and_computes():
    mesh = dist.MeshSpec({"data": 4, "model": 2}, dcn_axes={"data": 2}).build()
    x = np.arange(32.0).reshape(8, 4)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a: (a * 2).sum(0))(xs)), 2 * x.sum(0))


def _fake_devices(process_of, slice_of=None):
    """Device stand-ins with the attributes the layout code reads."""
    out = []
    for i, p in enumerate(process_of):
        d = types.SimpleNamespace(id=i, process_index=p, platform="cpu", device_kind="cpu")
        if slice_of is not None:
            d.slice_index = slice_of[i]
        out.append(d)
    return out


def _grid(devices, ici, dcn):
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = dist._hybrid_device_grid(ordered, ici, dcn)
    return np.vectorize(lambda d: d.id)(grid), np.vectorize(lambda d: d.process_index)(grid)


def test_dcn_processes_as_granules_keep_process_contiguous():
    # 2 processes whose device ids interleave: each data row must be one process.
    devs = _fake_devices([i % 2 for i in range(8)])
    ids, procs = _grid(devs, (1, 4), (2, 1))
    assert procs.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert ids.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_dcn_fallback_several_processes_per_granule():
    # 4 processes x 2 devices, 2 DCN granules: the fallback reshape groups processes 0-1, 2-3.
    devs = _fake_devices([i % 4 for i in range(8)])
    ids, procs = _grid(devs, (1, 4), (2, 1))
    assert procs.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    # DCN on the inner axis: the granule index is the major part of 'model'.
    ids, procs = _grid(devs, (2, 2), (1, 2))
    # Columns 0-1 are granule 0 (processes 0, 1), columns 2-3 granule 1 (processes 2, 3).
    assert procs.tolist() == [[0, 0, 2, 2], [1, 1, 3, 3]]


def test_dcn_slices_as_granules():
    # one process, two TPU-like slices given by slice_index (not by device id order)
    devs = _fake_devices([0] * 8, slice_of=[1, 1, 0, 0, 1, 1, 0, 0])
    ids, _ = _grid(devs, (1, 2, 2), (2, 1, 1))
    slices = np.vectorize(lambda i: devs[i].slice_index)(ids)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()


# ---- process_batch / make_global_batch -------------------------------------------------------


def test_process_batch_single_process_is_whole_batch():
    mesh = dist.MeshSpec({"data": -1}).build()
    assert dist.process_batch(32, mesh) == (0, 32)
    assert dist.process_batch(32, mesh, P("data", None)) == (0, 32)
    mesh2 = dist.MeshSpec({"data": 4, "model": 2}).build()
    assert dist.process_batch(24, mesh2, P(("data", "model"))) == (0, 24)
    assert dist.process_batch(7, mesh2, P(None)) == (0, 7)
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by the 8 shards"):
        dist.process_batch(12, mesh)


def test_make_global_batch_values_and_sharding():
    mesh = dist.MeshSpec({"data": 4, "model": 2}).build()
    x = np.arange(48.0, dtype=np.float32).reshape(8, 6)
    y = np.arange(8, dtype=np.int32)
    gx, gy = dist.make_global_batch((x, y), mesh, P("data"), global_batch_size=8)
    assert gx.shape == (8, 6) and gy.shape == (8,)
    assert gx.sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(gx), x)
    np.testing.assert_array_equal(np.asarray(gy), y)
    g2 = dist.make_global_batch(x, mesh, P("data", "model"))
    assert g2.sharding == NamedSharding(mesh, P("data", "model"))
    np.testing.assert_array_equal(np.asarray(g2), x)


def test_make_global_batch_wrong_leading_size():
    mesh = dist.MeshSpec({"data": -1}).build()
    with pytest.raises(ValueError, match=r"leading size 6, but process 0 must load rows \[0, 8\)"):
        dist.make_global_batch(np.zeros((6, 2)), mesh, global_batch_size=8)
    with pytest.raises(ValueError, match=r"leading size 6.*must be a multiple of 8"):
        dist.make_global_batch(np.zeros((6, 2)), mesh)
    with pytest.raises(ValueError, match=r"fewer dims than the spec"):
        dist.make_global_batch(np.zeros(8), mesh, P("data", None))


# ---- initialize ------------------------------------------------------------------------------


def test_initialize_single_process(monkeypatch):
    for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    info = dist.initialize()
    assert (info.process_index, info.process_count) == (0, 1)
    assert (info.local_device_count, info.device_count) == (8, 8)
    assert info.is_coordinator and info.platform == "cpu"
    assert dist.initialize() == info  # idempotent
    assert dist.initialize(num_processes=1, local_device_count=8) == info
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "1")
    assert dist.initialize() == info
    assert not jax.distributed.is_initialized()
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_initialize_bad_env(monkeypatch):
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match=r"MAAS_NUM_PROCESSES='two' is not an integer"):
        dist.initialize()


# ---- two real processes ----------------------------------------------------------------------


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:  # pragma: no cover - sandbox without loopback networking
        pytest.skip(f"cannot bind a socket on 127.0.0.1: {e}")


def _numpy_reference():
    sys.path.insert(0, str(TESTS))
    try:
        import _two_process_train as script
    finally:
        sys.path.remove(str(TESTS))
    x, y = (a.astype(np.float64) for a in script.make_dataset())
    w, b, losses = np.zeros(x.shape[1]), 0.0, []
    for _ in range(script.STEPS):
        r = x @ w + b - y
        losses.append(float(np.mean(r**2)))
        w, b = w - script.LR * (2.0 * x.T @ r / len(y)), b - script.LR * 2.0 * r.mean()
    return w, b, losses, x.sum(0), len(y)


def test_two_process_data_parallel_sgd(tmp_path):
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    outs = [tmp_path / f"out_{i}.json" for i in range(2)]
    logs = [open(tmp_path / f"log_{i}.txt", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), port, str(outs[i])],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for f in logs:
            f.seek(0)
            texts.append(f.read())
            f.close()
    detail = "\n".join(
        f"--- process {i} (rc={p.returncode}):\n{t[-3000:]}"
        for i, (p, t) in enumerate(zip(procs, texts, strict=True))
    )
    assert all(p.returncode == 0 for p in procs), detail

    r0, r1 = (json.loads(o.read_text()) for o in outs)
    assert r0["rows"] == [0, 16] and r1["rows"] == [16, 32]  # each loaded only its half
    for r, i in ((r0, 0), (r1, 1)):
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["local_device_count"], r["device_count"]) == (4, 8)
    for key in ("w", "b", "losses", "x_sum"):
        assert r0[key] == r1[key], key  # bit-identical on both processes

    w, b, losses, x_sum, _ = _numpy_reference()
    np.testing.assert_allclose(r0["w"], w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r0["b"], b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r0["losses"], losses, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r0["x_sum"], x_sum, rtol=1e-6, atol=1e-5)
    assert losses[-1] < losses[0] / 3  # it trained
