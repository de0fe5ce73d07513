"""Serving figures: dynamic batching vs one request at a time, MiniLM and digits w8a8 artifacts.

Exports MiniLM (bundled all-MiniLM-L6-v2) with the bundled ``minilm-w8a8.toml`` recipe, and
the digits CNN (w8a8), starts ``maas-jax serve`` on 127.0.0.1 (a child process) with dynamic batching and again with
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
from collections.abc import Callable
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


def minilm_artifact(work: Path) -> tuple[Path, Callable[[int], dict], dict]:
    """MiniLM with the bundled w8a8 recipe; requests are single real sentences."""
    from importlib import resources

    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _, variables, tok, embed_fn = load_minilm()
    names = ("input_ids", "attention_mask", "token_type_ids")
    one = tok.encode([SENTENCES[0]], pad_to=SEQ_LEN)
    program = maas_jax.trace(embed_fn, variables, *(one[k] for k in names), name="minilm")
    pipe = recipe.load(resources.files("maas_jax.recipes") / RECIPE)
    int8, stored = maas_jax.optimize(program, variables, pipe)
    art = export.save(
        int8,
        stored,
        work / "minilm",
        name="minilm",
        batch_sizes=BUCKETS,
        warmup_inputs=tuple(one[k] for k in names),
        recipe=pipe,
    )
    pool = [{k: tok.encode([s], pad_to=SEQ_LEN)[k] for k in names} for s in SENTENCES]
    setup = {"model": "all-MiniLM-L6-v2, recipe " + RECIPE, "seq_len": SEQ_LEN}
    return art, lambda i: pool[i % len(pool)], setup


def digits_artifact(work: Path) -> tuple[Path, Callable[[int], dict], dict]:
    """The digits CNN (random weights: throughput does not depend on them), w8a8; requests
    are single 8x8 images from scikit-learn's digits."""
    from maas_jax import passes
    from maas_jax.models.digits import load_digits_split, make_apply, make_model

    model = make_model("cnn")
    x_one = np.zeros((1, 8, 8, 1), np.float32)
    variables = model.init(jax.random.key(0), x_one)
    program = maas_jax.trace(make_apply(model), variables, x_one, name="digits")
    pipe = maas_jax.pipeline(passes.fake_quant("int8", act="int8"), passes.convert())
    int8, stored = maas_jax.optimize(program, variables, pipe)
    art = export.save(int8, stored, work / "digits", name="digits", batch_sizes=BUCKETS)
    images = load_digits_split()[2]
    pool = [{"x": images[i : i + 1]} for i in range(64)]
    return art, lambda i: pool[i % len(pool)], {"model": "digits CNN (flax), w8a8"}


def bucket_times_ms(art_dir: Path, feed: Callable[[int], dict]) -> dict[int, float]:
    """Each bucket's compute time in this process (best of 5): how much a batch amortizes."""
    art = export.load(art_dir)
    one = feed(0)
    out = {}
    for b in BUCKETS:
        rows = {k: np.repeat(v, b, axis=0) for k, v in one.items()}
        art.run(rows)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            art.run(rows)
            times.append(time.perf_counter() - t0)
        out[b] = round(min(times) * 1e3, 3)
    return out


MODELS = {"minilm": minilm_artifact, "digits": digits_artifact}
BUCKETS = (1, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per load test")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--models", default="minilm,digits", help="comma-separated: minilm, digits")
    ap.add_argument(
        "--max-queue-delay-ms", type=float, default=None, help="the server's, when batching"
    )
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    key = "bench-" + os.urandom(6).hex()
    results = {}
    for model_name in ns.models.split(","):
        art, feed, setup = MODELS[model_name](work)
        runs: dict[str, list] = {"batching": [], "max_batch_size_1": []}
        on = (
            ()
            if ns.max_queue_delay_ms is None
            else ("--max-queue-delay-ms", str(ns.max_queue_delay_ms))
        )
        for r in range(ns.rounds):  # interleaved: on, off, on, off, ...
            for label, extra in (("batching", on), ("max_batch_size_1", ("--max-batch-size", "1"))):
                with server(art, key, *extra) as (url, pid):
                    rss0 = rss_bytes(pid) if pid else 0
                    res = load_test(
                        url,
                        model_name,
                        feed,
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
                print(model_name, label, json.dumps(res), flush=True)

        def med(label: str, key: str, runs: dict = runs) -> float:
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
        print(model_name, json.dumps(summary, indent=2), flush=True)
        setup |= {
            "buckets": list(BUCKETS),
            "artifact_bytes": export.directory_bytes(art),
            "bucket_ms_in_process": bucket_times_ms(art, feed),
        }
        results[model_name] = {"setup": setup, "runs": runs, "summary": summary}
    result = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "note": "server and the load-generating clients share the machine's cores",
        },
        "concurrency": ns.concurrency,
        "seconds_per_run": ns.seconds,
        "rounds": ns.rounds,
        "client": "maas_jax.serve.Client (httpx, binary tensors), one thread each",
        "models": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
