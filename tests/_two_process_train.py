"""One process of a 2-process data-parallel training run on CPU (driven by test_distributed.py).

Usage: ``python tests/_two_process_train.py <process_id> <port> <outfile>``

Each process exposes 4 CPU devices, joins the job through ``127.0.0.1:<port>`` (gloo CPU
collectives), builds one 8-device ``data`` mesh over both processes, loads only its own rows
of a deterministic linear-regression batch, and runs 5 jitted SGD steps with replicated
parameters; the gradient all-reduce crosses the process boundary. It writes the final
parameters, the loss history and a few facts about the run to ``<outfile>`` as JSON.

The data and the training constants are importable (``make_dataset``, ``LR``, ``STEPS``) so
that the test computes its numpy reference from exactly the same batch.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

GLOBAL_BATCH = 32
FEATURES = 3
STEPS = 5
LR = 0.1
SEED = 0
LOCAL_DEVICES = 4


def make_dataset(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The full global batch ``(x, y)``, float32, identical in every process."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)
    w_true = np.array([1.5, -2.0, 0.5], np.float32)
    y = (x @ w_true + 0.3 + 0.1 * rng.normal(size=GLOBAL_BATCH)).astype(np.float32)
    return x, y


def main(process_id: int, port: int, outfile: str) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from maas_jax import distributed as dist

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    info = dist.initialize(
        f"127.0.0.1:{port}",
        2,
        process_id,
        local_device_count=LOCAL_DEVICES,
        initialization_timeout=120,
    )
    assert dist.initialize() == info  # idempotent
    assert (info.process_index, info.process_count) == (process_id, 2), info
    assert (info.local_device_count, info.device_count) == (LOCAL_DEVICES, 8), info

    mesh = dist.MeshSpec({"data": -1}).build()
    assert dict(mesh.shape) == {"data": 8}, mesh

    x_all, y_all = make_dataset()
    start, stop = dist.process_batch(GLOBAL_BATCH, mesh, P("data"))
    x_local, y_local = x_all[start:stop], y_all[start:stop]  # only this process's rows
    x, y = dist.make_global_batch(
        (x_local, y_local), mesh, P("data"), global_batch_size=GLOBAL_BATCH
    )
    assert x.shape == (GLOBAL_BATCH, FEATURES) and y.shape == (GLOBAL_BATCH,)
    assert not x.is_fully_addressable

    replicated = NamedSharding(mesh, P())
    params = jax.device_put(
        {"w": np.zeros(FEATURES, np.float32), "b": np.zeros((), np.float32)}, replicated
    )

    def loss_fn(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        new = jax.tree.map(lambda a, g: a - LR * g, p, grads)
        return jax.lax.with_sharding_constraint(new, replicated), loss

    losses = []
    for _ in range(STEPS):
        params, loss = step(params, x, y)
        assert loss.is_fully_replicated
        losses.append(float(np.asarray(loss.addressable_data(0))))

    # The global batch really spans both processes: its column sums equal numpy's.
    x_sum = jax.jit(lambda a: a.sum(0), out_shardings=replicated)(x)
    x_sum = np.asarray(x_sum.addressable_data(0)).tolist()

    # Gather every process's copy of the parameters: they must agree across processes.
    # (process_allgather of host-local numpy values stacks them along a new process axis.)
    local_copy = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
    gathered = multihost_utils.process_allgather(local_copy, tiled=False)
    w_all, b_all = np.asarray(gathered["w"]), np.asarray(gathered["b"])
    assert w_all.shape == (2, FEATURES), w_all.shape
    assert (w_all[0] == w_all[1]).all() and b_all[0] == b_all[1], (w_all, b_all)

    result = {
        "process_index": info.process_index,
        "process_count": info.process_count,
        "local_device_count": info.local_device_count,
        "device_count": info.device_count,
        "rows": [start, stop],
        "w": w_all[0].tolist(),
        "b": float(b_all[0]),
        "losses": losses,
        "x_sum": x_sum,
    }
    with open(outfile, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
