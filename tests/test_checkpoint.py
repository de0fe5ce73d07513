"""maas_jax.checkpoint: save on one mesh, restore bit-exactly onto others; async, atomic, errors.

The fixture trains a small MLP two steps with ``optax.adam`` on a 2×4 mesh, adds a pass state
(pruning masks and quantization scales) and a recipe, and saves once; the tests restore that
checkpoint onto 4×2, 8×1 and one device, and break copies of it in several ways.
"""

from __future__ import annotations

import doctest
import gc
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import maas_jax
from maas_jax import checkpoint
from maas_jax.checkpoint import Checkpointer, CheckpointError

AUTO = jax.sharding.AxisType.Auto
SPECS = {
    "dense_0": {"kernel": P("data", "model"), "bias": P("model")},
    "dense_1": {"kernel": P(None, "model"), "bias": P()},
    "dense_2": {"kernel": P("model", None), "bias": P()},
}
RECIPE = [
    {"pass": "fold_batchnorm", "repr": "fold_batchnorm()"},
    {"pass": "fake_quant", "repr": "fake_quant(rules=[QuantRule(weight='int8')])"},
]
METADATA = {"run": "unit-test", "lr": 0.01, "tags": ["mlp", "adam"]}

# Orbax 0.12.8 closes its private asyncio loop as soon as one tensorstore read fails; reads still
# in flight then complete into the closed loop and Python reports "RuntimeError: Event loop is
# closed" as an unraisable exception (pytest: PytestUnraisableExceptionWarning). It is harmless
# noise from a third-party error path we cannot reach, so the tests that restore broken files
# ignore it, and wait for the stragglers so that they land inside the test that caused them.
orbax_error_path = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def let_stragglers_land() -> None:
    time.sleep(0.3)
    gc.collect()


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AUTO, AUTO))


def shardings_on(m: jax.sharding.Mesh) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(m, spec), SPECS)


def mlp(params: dict, x: jax.Array) -> jax.Array:
    for i in range(3):
        layer = params[f"dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < 2:
            x = jax.nn.relu(x)
    return x


def init_params() -> dict:
    sizes = [16, 32, 16, 8]
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        f"dense_{i}": {
            "kernel": jax.random.normal(keys[i], (sizes[i], sizes[i + 1])) / sizes[i] ** 0.5,
            "bias": jnp.full((sizes[i + 1],), 0.01 * (i + 1)),
        }
        for i in range(3)
    }


TX = optax.adam(1e-2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint at step 2 of an MLP trained on a 2×4 mesh, and the values saved."""
    sh = shardings_on(mesh((2, 4)))
    params = jax.device_put(init_params(), sh)
    opt_state = TX.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    y = jax.random.normal(jax.random.key(2), (8, 8))

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(params)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(2):
        params, opt_state = step(params, opt_state)
    pass_state = {
        "masks": jax.tree.map(lambda p: jnp.abs(p) > 0.05, params),
        "scales": {k: jnp.max(jnp.abs(v["kernel"]), axis=0) / 127 for k, v in params.items()},
    }
    assert params["dense_0"]["kernel"].sharding.is_equivalent_to(sh["dense_0"]["kernel"], 2)
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    checkpoint.save(
        directory,
        2,
        params=params,
        opt_state=opt_state,
        pass_state=pass_state,
        recipe=RECIPE,
        metadata=METADATA,
    )
    return {
        "dir": directory,
        "params": params,
        "opt_state": opt_state,
        "pass_state": pass_state,
        "grads_x": x,
        "grads_y": y,
    }


def assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def targets(saved: dict) -> dict:
    """Abstract targets (no shardings): only the shardings argument places the arrays."""
    return {
        "target_params": jax.eval_shape(lambda: saved["params"]),
        "target_opt_state": jax.eval_shape(lambda: saved["opt_state"]),
        "target_pass_state": jax.eval_shape(lambda: saved["pass_state"]),
    }


@pytest.mark.parametrize("shape", [(4, 2), (8, 1), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_restore_onto_other_meshes_is_bit_exact(saved: dict, shape: tuple[int, int]) -> None:
    new = shardings_on(mesh(shape))
    r = checkpoint.restore(saved["dir"], **targets(saved), shardings=new)

    assert r.step == 2 and r.recipe == RECIPE and r.metadata == METADATA
    assert_trees_equal(r.params, saved["params"])
    assert_trees_equal(r.opt_state, saved["opt_state"])
    assert_trees_equal(r.pass_state, saved["pass_state"])
    # optax states come back as their own types, not dicts
    assert jax.tree.structure(r.opt_state) == jax.tree.structure(saved["opt_state"])
    assert type(r.opt_state[0]) is optax.ScaleByAdamState

    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(new), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    # mu / nu / masks follow their parameter's sharding; scalars and scales are replicated
    k0 = new["dense_0"]["kernel"]
    for leaf in (r.opt_state[0].mu, r.opt_state[0].nu, r.pass_state["masks"]):
        assert leaf["dense_0"]["kernel"].sharding.is_equivalent_to(k0, 2)
    assert r.opt_state[0].count.sharding.is_fully_replicated
    assert r.pass_state["scales"]["dense_0"].sharding.is_fully_replicated
    assert len(r.opt_state[0].count.sharding.device_set) == 8


def test_restore_onto_one_device_and_keep_training(saved: dict) -> None:
    device = jax.devices()[5]
    one = SingleDeviceSharding(device)
    r = checkpoint.restore(saved["dir"], step=2, **targets(saved), shardings=one)
    assert_trees_equal(r.params, saved["params"])
    assert_trees_equal(r.opt_state, saved["opt_state"])
    assert_trees_equal(r.pass_state, saved["pass_state"])
    for leaf in jax.tree.leaves((r.params, r.opt_state, r.pass_state)):
        assert leaf.devices() == {device}

    # The restored optax state is a working optimizer state: one more update matches.
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), saved["params"])
    update = jax.jit(TX.update)
    want, _ = update(grads, saved["opt_state"], saved["params"])
    got, _ = update(jax.device_put(grads, one), r.opt_state, r.params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=0)


def test_restore_takes_shardings_from_the_targets(saved: dict) -> None:
    new = shardings_on(mesh((4, 2)))
    abstract = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), saved["params"], new
    )
    with Checkpointer(saved["dir"]) as ckpt:
        r = ckpt.restore(target_params=abstract)  # latest step; opt/pass state skipped
    assert r.step == 2 and r.opt_state is None and r.pass_state is None
    assert_trees_equal(r.params, saved["params"])
    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(new), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)


def test_metadata_records_fingerprint_and_versions(saved: dict) -> None:
    r = checkpoint.restore(saved["dir"], target_params=saved["params"])
    assert r.info["versions"] == {
        "jax": jax.__version__,
        "maas_jax": maas_jax.__version__,
        "orbax_checkpoint": r.info["versions"]["orbax_checkpoint"],
    }
    leaves = {e[0]: e[1:3] for e in r.info["items"]["params"]["leaves"]}
    assert leaves["dense_0/kernel"] == [[16, 32], "float32"]
    assert sorted(leaves) == sorted(f"dense_{i}/{n}" for i in range(3) for n in ("bias", "kernel"))
    opt_paths = [e[0] for e in r.info["items"]["opt_state"]["leaves"]]
    assert "0/count" in opt_paths and "0/mu/dense_1/kernel" in opt_paths
    assert r.info["items"]["pass_state"]["leaves"][0][2] == "bool"


def test_async_save_wait_and_max_to_keep(tmp_path: Path) -> None:
    big = {"w": jnp.arange(1 << 20, dtype=jnp.float32).reshape(1024, 1024)}
    with Checkpointer(tmp_path / "c", max_to_keep=2, async_save=True) as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
        for step in range(4):
            t0 = time.perf_counter()
            assert ckpt.save(step, params=jax.tree.map(lambda a, s=step: a + s, big))
            blocking = time.perf_counter() - t0
            # Allowed (and usual) to return before the step is on disk; it is listed after.
            ckpt.wait_until_finished()
            assert step in ckpt.all_steps(), (step, blocking)
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        # nothing left behind by the atomic temporary-directory protocol
        assert sorted(os.listdir(ckpt.directory)) == ["2", "3"]
        r = ckpt.restore(target_params=big)
    assert r.step == 3
    np.testing.assert_array_equal(np.asarray(r.params["w"]), np.asarray(big["w"]) + 3)


def test_save_without_wait_then_wait(tmp_path: Path) -> None:
    ckpt = checkpoint.save(tmp_path, 5, params={"w": jnp.ones(4)}, wait=False)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5]
    ckpt.close()


def test_interrupted_save_is_not_a_step(saved: dict, tmp_path: Path) -> None:
    directory = tmp_path / "c"
    shutil.copytree(saved["dir"], directory)
    # What a crash in the middle of an asynchronous save of step 7 leaves behind.
    partial = directory / "7.orbax-checkpoint-tmp-1234567"
    shutil.copytree(directory / "2", partial)
    (partial / "params" / "manifest.ocdbt").unlink()
    assert Checkpointer(directory).all_steps() == [2]
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .*available steps: \[2\]"):
        checkpoint.restore(directory, 7, target_params=saved["params"])
    assert checkpoint.restore(directory, target_params=saved["params"]).step == 2


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_error_other_model(saved: dict) -> None:
    other = jax.eval_shape(lambda: saved["params"])
    other["dense_1"]["kernel"] = jax.ShapeDtypeStruct((32, 24), jnp.float32)
    with pytest.raises(
        CheckpointError,
        match=r"step 2 in .* holds another model: params leaf 'dense_1/kernel' is "
        r"float32\[32,16\] in the checkpoint but float32\[32,24\] in target_params",
    ):
        checkpoint.restore(saved["dir"], target_params=other)

    bf16 = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), saved["params"])
    with pytest.raises(CheckpointError, match=r"'dense_0/bias' is float32\[32\] .* bfloat16\[32\]"):
        checkpoint.restore(saved["dir"], target_params=bf16)

    fewer = {k: v for k, v in saved["params"].items() if k != "dense_2"}
    with pytest.raises(CheckpointError, match=r"'dense_2/bias' is float32\[8\] in the checkpoint "):
        checkpoint.restore(saved["dir"], target_params=fewer)

    sgd_state = jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, saved["params"])
    with pytest.raises(CheckpointError, match=r"another model: opt_state leaf '0/count'"):
        checkpoint.restore(saved["dir"], target_params=saved["params"], target_opt_state=sgd_state)


def test_error_missing_step_directory_and_item(saved: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 9 .*available steps: \[2\]"):
        checkpoint.restore(saved["dir"], 9, target_params=saved["params"])
    with pytest.raises(CheckpointError, match=r"no checkpoint directory .*does not exist"):
        checkpoint.restore(tmp_path / "nope", target_params=saved["params"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*empty: it holds no saved step"):
        checkpoint.restore(tmp_path / "empty", target_params=saved["params"])
    checkpoint.save(tmp_path / "p", 0, params=saved["params"])
    with pytest.raises(CheckpointError, match=r"has no opt_state \(it holds \['params'\]\)"):
        checkpoint.restore(
            tmp_path / "p", target_params=saved["params"], target_opt_state=saved["opt_state"]
        )


def test_error_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"recipe must be JSON-serialisable"):
        checkpoint.save(tmp_path, 0, params={"w": jnp.ones(2)}, recipe=[object()])
    with pytest.raises(CheckpointError, match=r"pass_state leaf 'step' is a str, not an array"):
        checkpoint.save(tmp_path, 0, params={"w": jnp.ones(2)}, pass_state={"step": "x"})
    checkpoint.save(tmp_path, 0, params={"w": jnp.ones(6)})
    with pytest.raises(CheckpointError, match=r"step 0 already exists .*steps: \[0\]"):
        checkpoint.save(tmp_path, 0, params={"w": jnp.ones(6)})
    bad = NamedSharding(mesh((2, 4)), P("model"))  # 4 does not divide 6
    with pytest.raises(CheckpointError, match=r"params leaf 'w' \(float32\[6\]\) cannot take"):
        checkpoint.restore(tmp_path, target_params={"w": jnp.ones(6)}, shardings=bad)


def test_keys_bfloat16_int4_and_flax_boxes_round_trip(tmp_path: Path) -> None:
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(8, kernel_init=init)(x)

    x = jnp.ones((2, 4))
    variables = Net().init(jax.random.key(0), x)
    pass_state = {
        "key": jax.random.key(7),
        "w_bf16": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16),
        "w_int4": jnp.arange(-8, 8, dtype=jnp.int4),
    }
    checkpoint.save(tmp_path, 0, params=variables, pass_state=pass_state)
    abstract = jax.eval_shape(Net().init, jax.random.key(0), x)
    m = mesh((2, 4))
    r = checkpoint.restore(
        tmp_path,
        target_params=abstract,
        target_pass_state=jax.eval_shape(lambda: pass_state),
        shardings=nn.get_sharding(abstract, m),
    )
    assert jax.tree.structure(r.params) == jax.tree.structure(variables)
    kernel = r.params["params"]["Dense_0"]["kernel"]
    assert isinstance(kernel, nn.Partitioned)
    assert kernel.value.sharding.is_equivalent_to(NamedSharding(m, P(None, "model")), 2)
    assert_trees_equal(r.params, variables)
    np.testing.assert_array_equal(
        jax.random.key_data(r.pass_state["key"]), jax.random.key_data(pass_state["key"])
    )
    for name in ("w_bf16", "w_int4"):
        assert r.pass_state[name].dtype == pass_state[name].dtype
        np.testing.assert_array_equal(
            np.asarray(r.pass_state[name]).astype(np.float32),
            np.asarray(pass_state[name]).astype(np.float32),
        )


def test_error_float64_without_x64(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'stats' is float64 but jax_enable_x64 is off"):
        checkpoint.save(tmp_path, 0, params={"w": jnp.ones(2)}, pass_state={"stats": np.ones(3)})


def _corrupt(step_dir: Path, how: str) -> None:
    params_dir = step_dir / "params"
    files = sorted(
        (p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    if how == "truncate manifest":
        target = params_dir / "manifest.ocdbt"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "delete array files":
        for p in params_dir.glob("d/*"):
            p.unlink()
    elif how == "truncate largest file":
        target = files[-1]
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "flip a byte":  # Orbax itself restores this silently with wrong values
        target = files[-1]
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    else:
        raise AssertionError(how)


@orbax_error_path
@pytest.mark.parametrize(
    "how", ["truncate manifest", "delete array files", "truncate largest file", "flip a byte"]
)
def test_error_corrupted_checkpoint(saved: dict, tmp_path: Path, how: str) -> None:
    directory = tmp_path / "c"
    shutil.copytree(saved["dir"], directory)
    _corrupt(directory / "2", how)
    with pytest.raises(CheckpointError, match=r"step 2 in .* is corrupted.*item 'params'"):
        checkpoint.restore(directory, **targets(saved), shardings=shardings_on(mesh((4, 2))))
    let_stragglers_land()


@orbax_error_path
def test_flipped_byte_is_silent_without_verify(tmp_path: Path) -> None:
    """Why the checksums exist: Orbax reads the altered file without complaint."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 64), dtype=np.float32))}
    checkpoint.save(tmp_path, 1, params=params)
    _corrupt(tmp_path / "1", "flip a byte")
    r = checkpoint.restore(tmp_path, target_params=params, verify=False)
    assert not np.array_equal(np.asarray(r.params["w"]), np.asarray(params["w"]))
    with pytest.raises(CheckpointError, match=r"leaf 'w' read back with checksum"):
        checkpoint.restore(tmp_path, target_params=params)
    let_stragglers_land()


@orbax_error_path
def test_error_missing_metadata_item(saved: dict, tmp_path: Path) -> None:
    directory = tmp_path / "c"
    shutil.copytree(saved["dir"], directory)
    (directory / "2" / "metadata" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step 2 in .* is corrupted.*item 'metadata'"):
        checkpoint.restore(directory, target_params=saved["params"])
    let_stragglers_land()


def test_checksum_is_sharding_independent() -> None:
    x = jax.random.normal(jax.random.key(3), (16, 32))
    sums = {
        checkpoint._checksums(
            [("x", jax.device_put(x, NamedSharding(mesh(s), P("data", "model"))))]
        )[0]
        for s in [(2, 4), (4, 2), (8, 1)]
    }
    sums.add(checkpoint._checksums([("x", np.asarray(x))])[0])
    assert len(sums) == 1
    for dtype in [jnp.bfloat16, jnp.int8, jnp.bool_, jnp.int4, jnp.complex64, jnp.uint32]:
        y = jnp.ones((4, 4), dtype)
        a, b = checkpoint._checksums([("y", y), ("y", y.at[1, 2].set(jnp.zeros((), dtype)))])
        assert a != b, dtype


def test_doctests() -> None:
    result = doctest.testmod(checkpoint, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 4 and result.failed == 0, result


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_save_and_restore(tmp_path: Path) -> None:
    """2 processes × 4 CPU devices: save from a 2×4 mesh, restore onto 4×2, check each shard."""
    script = Path(__file__).with_name("_two_process_checkpoint.py")
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        tail = "\n".join(out.splitlines()[-30:])
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{tail}"
        assert f"OK {i} shards=12" in out, tail
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]


def many_sharded_params(n: int) -> dict:
    """``n`` distinct (8, 16) parameters sharded over both axes of a 2x4 mesh."""
    sharding = NamedSharding(mesh((2, 4)), P("data", "model"))
    return {
        f"layer_{i:03d}": jax.device_put(jnp.full((8, 16), float(i), jnp.float32), sharding)
        for i in range(n)
    }


@pytest.mark.slow  # ~8 s: 720 sharded leaves; the slow CI step runs it on every landing
def test_many_sharded_leaves_with_adam_state_save_and_verify(tmp_path: Path) -> None:
    """240 sharded parameters plus Adam state (720 sharded leaves) on a 2x4 mesh: save and
    ``restore(verify=True)`` finish, bit-exact. One checksum reduction dispatched per leaf, all
    at once, aborted the process here (XLA CPU all-reduce termination timeout)."""
    params = many_sharded_params(240)
    opt_state = optax.adam(1e-3).init(params)
    checkpoint.save(tmp_path / "ckpt", step=1, params=params, opt_state=opt_state)
    r = checkpoint.restore(
        tmp_path / "ckpt",
        target_params=params,
        target_opt_state=opt_state,
        verify=True,
    )
    assert_trees_equal(r.params, params)
    assert_trees_equal(r.opt_state, opt_state)


def test_checksums_group_leaves_by_devices() -> None:
    """Leaves on one device, on a mesh, and host arrays are checksummed together."""
    x = jnp.arange(32.0).reshape(4, 8)
    on_mesh = jax.device_put(x, NamedSharding(mesh((2, 4)), P("data", "model")))
    on_one = jax.device_put(x, SingleDeviceSharding(jax.devices()[3]))
    sums = checkpoint._checksums([("a", on_mesh), ("b", np.asarray(x)), ("c", on_one)])
    assert len(set(sums)) == 1


@pytest.mark.slow
def test_many_sharded_leaves_five_saves_then_reshard(tmp_path: Path) -> None:
    """≥200 sharded leaves + Adam state saved 5 times in one process, then restored
    bit-exactly onto a 4x2 mesh and onto one device."""
    params = many_sharded_params(220)
    opt_state = optax.adam(1e-3).init(params)
    for step in range(1, 6):
        params = jax.tree.map(lambda x: x + 1.0, params)
        checkpoint.save(tmp_path / "ckpt", step=step, params=params, opt_state=opt_state)
    abstract = {
        "target_params": jax.eval_shape(lambda: params),
        "target_opt_state": jax.eval_shape(lambda: opt_state),
    }
    other = NamedSharding(mesh((4, 2)), P("data", "model"))
    one = SingleDeviceSharding(jax.devices()[0])
    for target in (other, one):
        r = checkpoint.restore(
            tmp_path / "ckpt", **abstract, shardings=jax.tree.map(lambda _, t=target: t, params)
        )
        assert r.step == 5
        assert_trees_equal(r.params, params)
        assert_trees_equal(r.opt_state, opt_state)
        leaf = r.params["layer_007"]
        assert leaf.sharding.is_equivalent_to(target, 2)
