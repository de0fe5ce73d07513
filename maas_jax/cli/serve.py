"""``maas-jax serve DIR [DIR...]``: serve artifacts over the Open Inference Protocol."""

from __future__ import annotations

import argparse
import os
from typing import Any

from maas_jax.cli._args import positive


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve artifacts (KServe v2 / Open Inference Protocol)")
    p.add_argument("directories", nargs="+", metavar="DIR")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-keys-file",
        help="one API key per line; or set MAAS_JAX_API_KEYS=key1,key2 (default: no auth)",
    )
    p.add_argument("--max-batch-size", type=positive(int), help="default: largest bucket")
    p.add_argument(
        "--max-queue-delay-ms",
        type=positive(float, zero_ok=True),
        default=5.0,
        help="how long the oldest request waits for others (0: batch what is waiting)",
    )
    p.add_argument("--max-queue-size", type=positive(int), default=256)
    p.add_argument("--timeout", type=positive(float), default=30.0, help="request deadline, s")
    p.add_argument("--max-body-mb", type=positive(float), default=64.0)
    p.add_argument("--no-batching", action="store_true", help="run every request alone")
    p.add_argument("--log-level", default="info")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    from maas_jax import export
    from maas_jax import serve as serving
    from maas_jax.cli._progress import step

    if ns.api_keys_file and not os.path.isfile(ns.api_keys_file):
        print(f"maas-jax serve: no API key file {ns.api_keys_file}")
        return 2
    models = []
    for d in ns.directories:
        try:
            with step(f"verifying and loading {d}"):
                models.append(export.load(d))
        except export.ArtifactError as e:
            print(f"maas-jax serve: {e}")
            return 2
    keys = serving.load_api_keys(ns.api_keys_file)
    serving.serve(
        models,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        api_keys=keys or None,
        max_batch_size=ns.max_batch_size,
        max_queue_delay_ms=ns.max_queue_delay_ms,
        max_queue_size=ns.max_queue_size,
        request_timeout_s=ns.timeout,
        max_body_bytes=int(ns.max_body_mb * 2**20),
        batching=not ns.no_batching,
    )
    return 0
