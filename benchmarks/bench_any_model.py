"""Issue 8 figures: embedding tables quantized per row, and baked vs in-graph pruning masks.

1. MiniLM (bundled all-MiniLM-L6-v2), ``quantize_model(recipe="w8")`` with and without the
   embedding tables: stored bytes / fp32 and mean embedding cosine to fp32 on 64 sentences.
2. A 512-1024-1024-512 MLP at batch 8: dense vs ``prune(sparsity=0.5)`` with in-graph masks
   (a sort per weight per call) vs ``prune(sparsity=0.5).bake(params)`` (masks computed once),
   timed in interleaved rounds in one run.

    python benchmarks/bench_any_model.py [--quick] [--out benchmarks/results/any_model.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_quant import interleaved  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import passes  # noqa: E402


def minilm_section(quick: bool) -> dict:
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tokenizer, embed_fn = load_minilm()
    batch = tokenizer.encode(list(SENTENCES[: 16 if quick else 64]))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref = np.asarray(jax.jit(embed_fn)(variables, *args))
    out = {}
    for label, tables in (("w8 matmuls only", False), ("w8 + tables per row", True)):
        q = passes.quantize_model(
            embed_fn, variables, *args, recipe="w8", fold_batchnorm=False, tables=tables
        )
        emb = np.asarray(jax.jit(q.program)(q.params, *args))
        cos = np.sum(emb * ref, -1)
        out[label] = {
            "bytes_ratio": round(q.bytes_ratio, 4),
            "mean_cosine": round(float(cos.mean()), 6),
            "min_cosine": round(float(cos.min()), 6),
        }
    return out


def prune_section(quick: bool) -> dict:
    sizes = (512, 1024, 1024, 512)
    rng = np.random.default_rng(0)
    params = {
        f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    x = jnp.asarray(rng.normal(size=(8, sizes[0])), jnp.float32)

    def mlp(p, x):
        for i in range(len(sizes) - 1):
            x = jax.nn.relu(x @ p[f"w{i}"])
        return x

    prog = maas_jax.trace(mlp, params, x)
    in_graph = passes.prune(sparsity=0.5)(prog)
    baked = passes.prune(sparsity=0.5).bake(params)(prog)
    same = bool(np.array_equal(np.asarray(in_graph(params, x)), np.asarray(baked(params, x))))
    timings = interleaved(
        {
            "dense": (jax.jit(mlp), (params, x)),
            "prune in-graph masks": (jax.jit(in_graph), (params, x)),
            "prune baked masks": (jax.jit(baked), (params, x)),
        },
        rounds=3 if quick else 5,
        reps=2 if quick else 5,
    )
    dense = timings["dense"]["median_ms"]
    for t in timings.values():
        t["vs_dense"] = round(t["median_ms"] / dense, 2)
    sorts = maas_jax.primitive_counts(baked).get("sort", 0)
    return {"timings": timings, "baked_equals_in_graph": same, "sorts_in_baked_program": sorts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "command": "python benchmarks/bench_any_model.py" + (" --quick" if a.quick else ""),
        "minilm_w8_tables": minilm_section(a.quick),
        "prune_masks_512_1024_1024_512_b8": prune_section(a.quick),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
