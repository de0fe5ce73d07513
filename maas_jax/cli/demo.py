"""``maas-jax demo``: the product end to end on the bundled all-MiniLM-L6-v2.

Optimize with a recipe file -> export verified artifacts (int8 and the fp32 baseline) ->
start ``maas-jax serve`` on 127.0.0.1 with an API key -> query it with the client -> check the
served embeddings equal the in-process program's bit for bit -> a short load test with
dynamic batching on and off -> stop the server. Every step prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from maas_jax.cli._args import positive

RECIPE = "minilm-w8a8.toml"
SEQ_LEN = 64


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="optimize, export, serve and query MiniLM end to end")
    p.add_argument(
        "--load-seconds", type=positive(float), default=4.0, help="per load test (default 4)"
    )
    p.add_argument("--concurrency", type=positive(int), default=32)
    p.add_argument("--out", help="keep the artifacts here (default: a temporary directory)")
    p.set_defaults(run=run)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(artifact: Path, key: str, *extra: str) -> Iterator[tuple[str, int]]:
    """``maas-jax serve`` in a child process; yields ``(url, pid)`` once ready, stops it after."""
    from maas_jax.serve import Client

    port = _free_port()
    env = dict(os.environ, MAAS_JAX_API_KEYS=key)
    cmd = [sys.executable, "-m", "maas_jax", "serve", str(artifact), "--port", str(port)]
    cmd += ["--log-level", "warning", *extra]
    # stderr to a file, not a pipe: a pipe nobody reads would block the server once full.
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    url = f"http://127.0.0.1:{port}"

    def stderr_tail() -> str:
        errors.seek(0)
        return errors.read().decode(errors="replace")[-2000:]

    try:
        t0 = time.perf_counter()
        with Client(url, timeout=2.0) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {stderr_tail()}")
                with contextlib.suppress(Exception):
                    if c.ready():
                        break
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError("server not ready after 300 s")
                time.sleep(0.2)
        print(
            f"server {' '.join(extra) or '(batching on)'} ready at {url} in "
            f"{time.perf_counter() - t0:.1f} s (every bucket compiled and warmed)"
        )
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        # uvicorn drains, then re-raises the signal it caught: -SIGTERM is a clean stop here.
        how = "drained and stopped on SIGTERM" if rc == -signal.SIGTERM else f"exit code {rc}"
        print(f"server {how}")
        if rc not in (0, -signal.SIGTERM):
            print(stderr_tail())
        errors.close()


def run(ns: argparse.Namespace) -> int:
    import jax

    import maas_jax
    from maas_jax import export, recipe
    from maas_jax.cli.bench import load_test
    from maas_jax.cli.inspect_artifact import describe
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES
    from maas_jax.serve import Client, ServeError

    ok = True
    work = Path(ns.out or tempfile.mkdtemp(prefix="maas_jax_demo_"))
    _section("1. model: all-MiniLM-L6-v2 (bundled weights) traced with a batch of one")
    _, variables, tokenizer, embed_fn = load_minilm()

    def rows(sentences: list[str]) -> dict[str, np.ndarray]:
        return tokenizer.encode(sentences, pad_to=SEQ_LEN)

    names = ("input_ids", "attention_mask", "token_type_ids")
    one = rows([SENTENCES[0]])
    program = maas_jax.trace(embed_fn, variables, *(one[k] for k in names), name="minilm")
    print(program)

    _section(f"2. optimize with the recipe file {RECIPE}")
    recipe_path = resources.files("maas_jax.recipes") / RECIPE
    print(recipe_path.read_text().strip())
    pipe = recipe.load(recipe_path)
    t0 = time.perf_counter()
    int8, stored = maas_jax.optimize(program, variables, pipe)
    print(
        f"optimized in {time.perf_counter() - t0:.1f} s; "
        + maas_jax.coverage_report(int8).splitlines()[-1]
    )

    _section("3. export verified artifacts (int8 and the fp32 baseline)")
    float_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables))
    art_dir = export.save(
        int8,
        stored,
        work / "minilm-int8",
        batch_sizes=(1, 8, 32),
        name="minilm",
        recipe=pipe,
        warmup_inputs=tuple(one[k] for k in names),
        reference_bytes=float_bytes,
        overwrite=True,
    )
    fp32_dir = export.save(
        program,
        variables,
        work / "minilm-fp32",
        batch_sizes=(1,),
        name="minilm-fp32",
        overwrite=True,
    )
    ratio = export.directory_bytes(art_dir) / export.directory_bytes(fp32_dir)
    print(describe(export.read_manifest(art_dir)))
    print(
        f"artifact size: {export.directory_bytes(art_dir):,} bytes = {ratio:.3f}x the fp32 "
        f"artifact ({export.directory_bytes(fp32_dir):,} bytes)"
    )
    ok &= ratio <= 0.30

    _section("4. serve on 127.0.0.1 with an API key, query with the client")
    key = "demo-" + os.urandom(8).hex()
    sentences = list(SENTENCES[:8])
    batch = rows(sentences)
    reference = export.reference_fn(int8)
    expected = np.asarray(reference(jax.tree.leaves(stored), *(batch[k] for k in names))[0])
    float_emb = np.asarray(embed_fn(variables, **batch))
    with server(art_dir, key) as (url, _):
        with Client(url, api_key=key) as client:
            served = client.infer("minilm", {k: batch[k] for k in names})["output"]
            exact = np.array_equal(served, expected)
            print(f"8 sentences served; equal to the in-process program bit for bit: {exact}")
            cos = (served * float_emb).sum(-1)
            print(f"cosine to the fp32 model: mean {cos.mean():.5f}, min {cos.min():.5f}")
            ok &= exact and cos.min() > 0.99
            try:
                with Client(url, api_key="wrong") as intruder:
                    intruder.infer("minilm", {k: batch[k] for k in names})
                print("a wrong API key was accepted: FAIL")
                ok = False
            except ServeError as e:
                print(f"a wrong API key is refused: {e}")
                ok &= e.status == 401
        pool = [{k: rows([s])[k] for k in names} for s in SENTENCES[:64]]
        _section(f"5. load test: {ns.concurrency} clients, single sentences, {ns.load_seconds} s")
        on = load_test(
            url,
            "minilm",
            lambda i: pool[i % len(pool)],
            concurrency=ns.concurrency,
            duration_s=ns.load_seconds,
            api_key=key,
        )
    with server(art_dir, key, "--max-batch-size", "1") as (url, _):
        off = load_test(
            url,
            "minilm",
            lambda i: pool[i % len(pool)],
            concurrency=ns.concurrency,
            duration_s=ns.load_seconds,
            api_key=key,
        )
    for label, r in (("batching on ", on), ("batching off", off)):
        print(
            f"{label}: {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  ok {r['requests_ok']}  failed {r['failures']}"
        )
    gain = on["throughput_rps"] / max(off["throughput_rps"], 1e-9)
    print(f"dynamic batching: {gain:.2f}x the throughput of one request at a time")
    ok &= not on["failures"] and not off["failures"]
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1
