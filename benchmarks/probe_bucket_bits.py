"""Find the first equation of a served program whose value differs between batch buckets.

An artifact's bucket-N module is the batch-1 program ``vmap``-ed to N rows, so every row
should have the same bits in every bucket. When it does not, this probe bisects the program's
top-level float equations: for a prefix ending at equation k it compiles the prefix at batch 1
(row by row) and vmapped at batch N (parameters passed as arguments in both, as the artifact
does: closing over them lets XLA constant-fold and hides or invents differences) and compares.

    python benchmarks/probe_bucket_bits.py [--rows 8] [--recipe minilm-w8a8.toml]

Prints whether the whole program is bucket-invariant and, if not, the first differing
equation with the equations before it. A diagnostic, not a benchmark: nothing is recorded.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import recipe  # noqa: E402


def prefix_fn(closed: jcore.ClosedJaxpr, k: int):
    """The program's first ``k`` equations as a function returning equation k's first output."""
    jaxpr = closed.jaxpr
    eqns = jaxpr.eqns[:k]
    sub = jcore.Jaxpr(jaxpr.constvars, jaxpr.invars, [eqns[-1].outvars[0]], eqns)
    return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub, closed.consts))


def same_bits(closed: jcore.ClosedJaxpr, k: int, params: list, xs: list) -> tuple[bool, float]:
    f = prefix_fn(closed, k)
    one = jax.jit(lambda *a: f(*a)[0])
    rows = np.stack(
        [np.asarray(one(*params, *[x[i : i + 1] for x in xs]))[0] for i in range(len(xs[0]))]
    )
    batched = jax.jit(
        jax.vmap(
            lambda p, *r: f(*p, *[t[None] for t in r])[0][0],
            in_axes=(None,) + (0,) * len(xs),
        )
    )
    full = np.asarray(batched(params, *xs))
    return bool(np.array_equal(rows, full)), float(np.abs(rows.astype(np.float64) - full).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="the bigger bucket (default 8)")
    ap.add_argument("--recipe", default="minilm-w8a8.toml", help="a bundled recipe")
    ns = ap.parse_args()

    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tok, embed_fn = load_minilm()
    names = ("input_ids", "attention_mask", "token_type_ids")
    one = tok.encode([SENTENCES[0]], pad_to=64)
    program = maas_jax.trace(embed_fn, variables, *(one[k] for k in names), name="minilm")
    pipe = recipe.load(resources.files("maas_jax.recipes") / ns.recipe)
    converted, stored = maas_jax.optimize(program, variables, pipe)
    closed = converted.jaxpr
    params = [np.asarray(p) for p in jax.tree.leaves(stored)]
    enc = tok.encode(list(SENTENCES[: ns.rows]), pad_to=64)
    xs = [np.asarray(enc[k], np.int32) for k in names]

    n = len(closed.jaxpr.eqns)
    whole, diff = same_bits(closed, n, params, xs)
    print(
        f"{ns.recipe}: bucket 1 vs {ns.rows}: {'the same bits' if whole else f'differs {diff:.3g}'}"
    )
    if whole:
        return 0
    floats = [
        k
        for k in range(1, n + 1)
        if np.issubdtype(np.dtype(closed.jaxpr.eqns[k - 1].outvars[0].aval.dtype), np.floating)
    ]
    lo, hi = -1, len(floats) - 1  # invariant: floats[hi] differs; floats[lo] (if any) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same_bits(closed, floats[mid], params, xs)[0]:
            lo = mid
        else:
            hi = mid
    k = floats[hi]
    print(
        f"first float equation that differs: #{k} (max difference {same_bits(closed, k, params, xs)[1]:.3g})"
    )
    for j in range(max(1, k - 8), k + 1):
        e = closed.jaxpr.eqns[j - 1]
        ins = ", ".join(str(v.aval) for v in e.invars[:3])
        outs = ", ".join(str(v.aval) for v in e.outvars)
        print(f"  #{j:<4} {e.primitive.name:<22} {e.params.get('name', '')!s:<10} {ins} -> {outs}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
