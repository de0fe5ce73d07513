"""One of two processes saving and restoring a globally sharded checkpoint (run by a test).

Usage: ``python tests/_two_process_checkpoint.py PROCESS_ID PORT DIRECTORY``.

Each process owns 4 CPU devices; together they form a 2×4 mesh. The parameters are built from
per-process data (``jax.make_array_from_callback``), saved with :class:`Checkpointer` (each
process writes its own shards), then restored onto a 4×2 mesh, and every process checks the
shards it can address against the global numpy array. Prints ``OK <process id>`` on success.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from maas_jax import checkpoint  # noqa: E402


def expected() -> dict[str, np.ndarray]:
    return {
        "dense": {
            "kernel": np.arange(16 * 32, dtype=np.float32).reshape(16, 32) / 7.0,
            "bias": np.linspace(-1.0, 1.0, 32, dtype=np.float32),
        },
        "mask": (np.arange(16 * 32).reshape(16, 32) % 3 == 0),
    }


def main(process_id: int, port: int, directory: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(auto, auto))
    specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "mask": P("data")}
    want = expected()

    def build(value: np.ndarray, spec: P) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    params = jax.tree.map(build, want, specs)
    assert not params["dense"]["kernel"].is_fully_addressable
    tx = optax.adam(0.1)
    opt_state = tx.init(params)

    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2, async_save=True)
    ckpt.save(3, params=params, opt_state=opt_state, recipe=[{"pass": "dce"}], metadata={"n": 2})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3], ckpt.all_steps()

    new_mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
    new_specs = {
        "dense": {"kernel": P("model", "data"), "bias": P("data")},
        "mask": P(None, "data"),
    }
    shardings = jax.tree.map(lambda s: NamedSharding(new_mesh, s), new_specs)
    abstract = jax.eval_shape(lambda: want)
    restored = checkpoint.restore(
        ckpt,
        target_params=abstract,
        target_opt_state=jax.eval_shape(tx.init, abstract),
        shardings=shardings,
    )
    assert restored.step == 3 and restored.recipe == [{"pass": "dce"}], restored
    assert restored.metadata == {"n": 2}, restored.metadata
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)

    n_shards = 0
    for got, value, sharding in zip(
        jax.tree.leaves(restored.params),
        jax.tree.leaves(want),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        assert got.sharding.is_equivalent_to(sharding, value.ndim), got.sharding
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
            n_shards += 1
    mu = restored.opt_state[0].mu["dense"]["kernel"]
    assert mu.sharding.is_equivalent_to(shardings["dense"]["kernel"], 2), mu.sharding
    for shard in mu.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), 0.0)
    ckpt.close()
    print(f"OK {process_id} shards={n_shards}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
