"""Serving figures: dynamic batching vs one request at a time, MiniLM w8a8 artifact.

Exports MiniLM (bundled all-MiniLM-L6-v2) with the bundled ``minilm-w8a8.toml`` recipe,
starts ``maas-jax serve`` on 127.0.0.1 (a child process) with dynamic batching and again with
``--max-batch-size 1``, and drives each with 32 concurrent clients sending single sentences
for a bounded time, in interleaved rounds (on, off, on, off, ...). Records throughput,
p50/p99 latency, failed requests and the server's RSS after warmup vs at the end.

    python benchmarks/bench_serve.py [--seconds 8] [--rounds 2] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import export, recipe  # noqa: E402
from maas_jax.cli.bench import load_test  # noqa: E402
from maas_jax.cli.demo import RECIPE, SEQ_LEN, server  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per load test")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()

    from importlib import resources

    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tok, embed_fn = load_minilm()
    names = ("input_ids", "attention_mask", "token_type_ids")
    one = tok.encode([SENTENCES[0]], pad_to=SEQ_LEN)
    program = maas_jax.trace(embed_fn, variables, *(one[k] for k in names), name="minilm")
    pipe = recipe.load(resources.files("maas_jax.recipes") / RECIPE)
    int8, stored = maas_jax.optimize(program, variables, pipe)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    art = export.save(
        int8,
        stored,
        work / "minilm",
        name="minilm",
        batch_sizes=(1, 8, 32),
        warmup_inputs=tuple(one[k] for k in names),
        recipe=pipe,
    )
    pool = [{k: tok.encode([s], pad_to=SEQ_LEN)[k] for k in names} for s in SENTENCES]
    key = "bench-" + os.urandom(6).hex()
    runs: dict[str, list] = {"batching": [], "max_batch_size_1": []}
    for r in range(ns.rounds):
        for label, extra in (("batching", ()), ("max_batch_size_1", ("--max-batch-size", "1"))):
            with server(art, key, *extra) as (url, pid):
                rss0 = rss_bytes(pid) if pid else 0
                res = load_test(
                    url,
                    "minilm",
                    lambda i: pool[i % len(pool)],
                    concurrency=ns.concurrency,
                    duration_s=ns.seconds,
                    api_key=key,
                )
                rss1 = rss_bytes(pid) if pid else 0
            res["rss_after_warmup"] = rss0
            res["rss_end"] = rss1
            res["rss_growth"] = round(rss1 / rss0 - 1, 4) if rss0 else None
            res["round"] = r
            runs[label].append(res)
            print(label, json.dumps(res), flush=True)

    def med(label: str, key: str) -> float:
        return float(np.median([x[key] for x in runs[label]]))

    summary = {
        "throughput_ratio": round(
            med("batching", "throughput_rps") / med("max_batch_size_1", "throughput_rps"), 2
        ),
        "p50_ms": {k: med(k, "p50_ms") for k in runs},
        "p99_ms": {k: med(k, "p99_ms") for k in runs},
        "throughput_rps": {k: med(k, "throughput_rps") for k in runs},
        "failed_requests": sum(sum(x["failures"].values()) for v in runs.values() for x in v),
        "max_rss_growth": max((x["rss_growth"] or 0) for v in runs.values() for x in v),
    }
    print(json.dumps(summary, indent=2))
    result = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "setup": {
            "model": "all-MiniLM-L6-v2, recipe " + RECIPE,
            "seq_len": SEQ_LEN,
            "buckets": [1, 8, 32],
            "concurrency": ns.concurrency,
            "seconds_per_run": ns.seconds,
            "rounds": ns.rounds,
            "client": "maas_jax.serve.Client (httpx, binary tensors), one thread each",
            "artifact_bytes": export.directory_bytes(art),
        },
        "runs": runs,
        "summary": summary,
        "date": time.strftime("%Y-%m-%d"),
    }
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
