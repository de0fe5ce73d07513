"""Compile-pipeline overhead on a 24-layer transformer: trace, passes, lower, compile, run.

Prints each stage's median time over repeats and the ratio (trace + passes) / XLA compile,
which says what maas_jax adds to the time from model to first compiled result (target <= 0.2).

    python benchmarks/bench_pipeline.py                 # full run, writes benchmarks/results/
    python benchmarks/bench_pipeline.py --quick         # tiny model, used by a smoke test
    python benchmarks/bench_pipeline.py --layout scan   # layers under nn.scan instead of unrolled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import maas_jax
from maas_jax import passes


class Block(nn.Module):
    d_model: int
    d_ff: int
    heads: int

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm()(x)
        attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
        x = x + attn
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.d_ff, name="mlp_in")(h)
        x = x + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h))
        return x, None


class Transformer(nn.Module):
    layers: int
    d_model: int
    d_ff: int
    heads: int
    vocab: int
    layout: str = "unrolled"

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(ids)
        if self.layout == "scan":
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
            )
            x, _ = stack(self.d_model, self.d_ff, self.heads, name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.d_model, self.d_ff, self.heads, name=f"layer_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def _median_time(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if isinstance(out, jax.Array):
            out.block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (min(times), max(times)), out


def run(quick: bool, layout: str, repeats: int) -> dict:
    cfg = (
        dict(layers=2, d_model=64, d_ff=128, heads=4, vocab=256, batch=2, seq=16)
        if quick
        else dict(layers=24, d_model=512, d_ff=2048, heads=8, vocab=8192, batch=4, seq=128)
    )
    model = Transformer(
        cfg["layers"], cfg["d_model"], cfg["d_ff"], cfg["heads"], cfg["vocab"], layout
    )
    ids = jnp.zeros((cfg["batch"], cfg["seq"]), jnp.int32)
    # Shapes alone: tracing and compiling need no weights (and no slow random init).
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    pipe = maas_jax.pipeline(passes.clip_weights(4.0), passes.dce())

    t_trace, r_trace, program = _median_time(
        lambda: maas_jax.trace_linen(model, variables, ids), repeats
    )
    t_pass, r_pass, optimized = _median_time(lambda: pipe(program), repeats)

    def lower():
        return jax.jit(maas_jax.to_fn(optimized)).trace(variables, ids).lower()

    t_lower, r_lower, lowered = _median_time(lower, repeats)

    def compile_cold():
        # A fresh lowering each time and no caches: every repeat is a cold XLA compile.
        jax.clear_caches()
        fresh = jax.jit(maas_jax.to_fn(optimized)).trace(variables, ids).lower()
        t0 = time.perf_counter()
        compiled = fresh.compile()
        return time.perf_counter() - t0, compiled

    compile_runs = [compile_cold() for _ in range(repeats)]
    compile_times = [t for t, _ in compile_runs]
    t_compile = statistics.median(compile_times)
    r_compile = (min(compile_times), max(compile_times))
    compiled = compile_runs[-1][1]

    def baseline_cold():
        # What the user pays without maas_jax: jit(model.apply) traced, lowered, compiled.
        jax.clear_caches()
        t0 = time.perf_counter()
        jax.jit(model.apply).trace(variables, ids).lower().compile()
        return time.perf_counter() - t0

    def ours_cold():
        # The same path with maas_jax, measured the same way (caches cleared, end to end):
        # trace, passes, lower, compile.
        jax.clear_caches()
        t0 = time.perf_counter()
        prog = pipe(maas_jax.trace_linen(model, variables, ids))
        jax.jit(maas_jax.to_fn(prog)).trace(variables, ids).lower().compile()
        return time.perf_counter() - t0

    # Interleaved, so drift in the machine's speed hits both sides alike.
    pairs = [(baseline_cold(), ours_cold()) for _ in range(repeats)]
    baseline = [b for b, _ in pairs]
    t_baseline = statistics.median(baseline)
    t_ours_cold = statistics.median(o for _, o in pairs)

    real = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), variables)
    compiled(real, ids).block_until_ready()  # warm-up
    t_run, r_run, _ = _median_time(lambda: compiled(real, ids), repeats)

    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(variables))
    return {
        "config": {**cfg, "layout": layout, "params": n_params},
        "top_level_equations": len(program.jaxpr.jaxpr.eqns),
        "clipped_weights": len(optimized.history[0].touched),
        "seconds": {
            "trace": t_trace,
            "passes": t_pass,
            "lower": t_lower,
            "compile": t_compile,
            "run": t_run,
            "baseline_jit_trace_lower_compile": t_baseline,
            "ours_cold_trace_passes_lower_compile": t_ours_cold,
        },
        "ranges": {
            "trace": r_trace,
            "passes": r_pass,
            "lower": r_lower,
            "compile": r_compile,
            "run": r_run,
        },
        "ratio_trace_plus_passes_over_compile": (t_trace + t_pass) / t_compile,
        # both sides cold (caches cleared), end to end, interleaved
        "ratio_model_to_compiled_vs_plain_jit": t_ours_cold / t_baseline,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
        },
        "command": "python " + " ".join(sys.argv),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke test)")
    ap.add_argument("--layout", choices=("unrolled", "scan"), default="unrolled")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    ns = ap.parse_args(argv)
    res = run(ns.quick, ns.layout, 1 if ns.quick else ns.repeats)
    s = res["seconds"]
    c = res["config"]
    print(
        f"model: {c['layers']}-layer transformer ({c['layout']}), d_model {c['d_model']}, "
        f"{c['params'] / 1e6:.1f} M params, {res['top_level_equations']} top-level equations"
    )
    for stage in ("trace", "passes", "lower", "compile", "run"):
        lo, hi = res["ranges"][stage]
        print(f"  {stage:<8} {s[stage] * 1e3:9.1f} ms   (min {lo * 1e3:.1f}, max {hi * 1e3:.1f})")
    ratio = res["ratio_trace_plus_passes_over_compile"]
    print(f"(trace + passes) / compile = {ratio:.3f}   (target <= 0.2)")
    print(
        f"model -> compiled, caches cleared, with maas_jax: "
        f"{s['ours_cold_trace_passes_lower_compile']:.3f} s; plain jax.jit(model.apply) "
        f"trace+lower+compile: {s['baseline_jit_trace_lower_compile']:.3f} s "
        f"(ratio {res['ratio_model_to_compiled_vs_plain_jit']:.2f}, cold vs cold, interleaved)"
    )
    print(f"machine: {res['machine']}")
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
