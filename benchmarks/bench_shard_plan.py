"""Compile-only sharding plans for a >=1B-parameter transformer on 64 and 256 fake devices.

Nothing is materialised: parameters are `jax.eval_shape` structures, the program is traced from
shapes, sharded with the FSDP+TP preset and compiled; the report gives per-device parameter
bytes and every collective XLA inserted. Each device count runs in its own process (the fake
CPU device count is fixed at jax start-up).

    python benchmarks/bench_shard_plan.py [--devices 64 256] [--out benchmarks/results/shard_plan.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(devices: int, layers: int, d_model: int, d_ff: int, vocab: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import flax.linen as nn
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    import maas_jax
    from maas_jax import passes

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.LayerNorm()(x)
            attn = nn.MultiHeadDotProductAttention(num_heads=16, name="attn")(h, h)
            x = x + attn
            h = nn.LayerNorm()(x)
            h = nn.Dense(d_ff, name="mlp_in")(h)
            return x + nn.Dense(d_model, name="mlp_out")(nn.gelu(h)), None

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(vocab, d_model, name="embed")(ids)
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers
            )
            x, _ = stack(name="layers")(x, None)
            return nn.Dense(vocab, name="head")(nn.LayerNorm()(x))

    model = LM()
    model_axis = 4 if devices <= 64 else 8
    mesh = jax.make_mesh(
        (devices // model_axis, model_axis), ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )  # fmt: skip
    ids = jax.ShapeDtypeStruct((devices // model_axis * 2, 512), jnp.int32)
    t0 = time.perf_counter()
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    program = maas_jax.trace_linen(model, variables, ids)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    sharded = passes.shard(mesh, preset="fsdp_tp")(program)
    t_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = passes.plan_report(sharded, variables, ids)
    t_compile = time.perf_counter() - t0
    report["seconds"] = {"trace": t_trace, "shard_pass": t_pass, "lower_and_compile": t_compile}
    report["devices"] = devices
    report["params"] = sum(math.prod(s.shape) for s in jax.tree.leaves(variables))
    print(f"== {devices} devices, mesh {report['mesh']}, {report['params'] / 1e9:.2f} B parameters")
    print(passes.format_report(report, max_collectives=8))
    print(f"trace {t_trace:.2f} s, shard pass {t_pass:.2f} s, lower+compile {t_compile:.2f} s")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    if ns.child is not None:
        rep = run_one(ns.child, ns.layers, ns.d_model, ns.d_ff, ns.vocab)
        print("JSON " + json.dumps(rep))
        return 0
    results = []
    for n in ns.devices:
        cmd = [sys.executable, __file__, "--child", str(n), "--layers", str(ns.layers),
               "--d-model", str(ns.d_model), "--d-ff", str(ns.d_ff), "--vocab", str(ns.vocab)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
        )
        if proc.returncode:
            print(proc.stderr[-3000:])
            return proc.returncode
        for line in proc.stdout.splitlines():
            if line.startswith("JSON "):
                results.append(json.loads(line[5:]))
            else:
                print(line)
    if ns.out:
        ns.out.write_text(
            json.dumps({"command": "python " + " ".join(sys.argv), "runs": results}, indent=1)
            + "\n"
        )
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
