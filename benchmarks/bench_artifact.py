"""Artifact figures for MiniLM: size vs the fp32 artifact, and whether a row has the same bits
in every batch bucket.

Exports the bundled all-MiniLM-L6-v2 (sequence length 64, buckets 1/8/32) as fp32, as int8
with the bundled ``minilm-w8a8.toml`` recipe, and as packed int4 weight-only
(``quantize_model(recipe="w4", tables="int4")``), then loads each artifact back (verified) and
compares, for real sentences: every row run alone (bucket 1) against the same rows in bucket 8,
and 20 rows in one bucket of 32 against the same rows run as 8 + 8 + 1 + 1 + 1 + 1.

    python benchmarks/bench_artifact.py [--out benchmarks/results/artifact.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import export, passes, recipe  # noqa: E402

NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQ_LEN = 64


def bucket_differences(art: export.Artifact, enc: dict) -> dict[str, float]:
    """Largest |difference| between the same rows run in different buckets (0.0: same bits)."""
    rows = {k: np.asarray(enc[k], np.int32) for k in NAMES}

    def run(lo: int, hi: int) -> np.ndarray:
        return np.asarray(art.run({k: v[lo:hi] for k, v in rows.items()})["output"])

    alone = np.concatenate([run(i, i + 1) for i in range(8)])
    bucket8 = run(0, 8)
    bucket32 = run(0, 20)  # 20 rows padded into the bucket of 32
    chunks = np.concatenate([run(0, 8), run(8, 16)] + [run(i, i + 1) for i in range(16, 20)])
    return {
        "bucket 1 vs bucket 8 (8 rows)": float(np.abs(alone - bucket8).max()),
        "bucket 32 vs 8+8+1+1+1+1 (20 rows)": float(np.abs(bucket32 - chunks).max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()

    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tok, embed_fn = load_minilm()
    one = tok.encode([SENTENCES[0]], pad_to=SEQ_LEN)
    args = [one[k] for k in NAMES]
    program = maas_jax.trace(embed_fn, variables, *args, name="minilm")
    work = Path(tempfile.mkdtemp(prefix="bench_artifact_"))
    buckets = (1, 8, 32)
    dirs = {"fp32": export.save(program, variables, work / "fp32", batch_sizes=buckets)}
    pipe = recipe.load(resources.files("maas_jax.recipes") / "minilm-w8a8.toml")
    int8, stored = maas_jax.optimize(program, variables, pipe)
    dirs["int8 (minilm-w8a8.toml)"] = export.save(
        int8, stored, work / "int8", batch_sizes=buckets, recipe=pipe
    )
    q4 = passes.quantize_model(embed_fn, variables, *args, recipe="w4", tables="int4")
    dirs["int4 weight-only, tables int4"] = export.save(
        q4, None, work / "int4", batch_sizes=buckets
    )

    enc = tok.encode(list(SENTENCES[:20]), pad_to=SEQ_LEN)
    base = export.directory_bytes(dirs["fp32"])
    results = {}
    for label, d in dirs.items():
        art = export.load(d)
        results[label] = {
            "artifact_bytes": export.directory_bytes(d),
            "ratio_to_fp32_artifact": export.directory_bytes(d) / base,
            "max_abs_difference_between_buckets": bucket_differences(art, enc),
        }
        print(label, json.dumps(results[label]), flush=True)
    out = {
        "command": "python benchmarks/bench_artifact.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "setup": {"model": "all-MiniLM-L6-v2", "seq_len": SEQ_LEN, "buckets": list(buckets)},
        "artifacts": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    if ns.out:
        ns.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
