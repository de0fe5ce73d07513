"""The ``maas-jax`` command line (also ``python -m maas_jax``).

One module per subcommand, each with ``add_parser(subparsers)``:

- ``demo``: the product end to end on the bundled all-MiniLM-L6-v2 (recipe file, artifact,
  server, client, load test), then it stops the server;
- ``optimize``: run a recipe file on a model and write an artifact;
- ``inspect``: an artifact's signature, sizes, recipe and versions (verified, not loaded);
- ``serve``: serve artifacts over the Open Inference Protocol (KServe v2) REST API;
- ``bench``: a bounded load test against a running server;
- ``tour``: the optimizer's reports and passes on MiniLM and a digits CNN;
- ``version``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maas_jax.cli import bench, demo, inspect_artifact, optimize, serve, tour

__all__ = ["main"]


def _versions() -> str:
    import jax

    import maas_jax

    return f"maas_jax {maas_jax.__version__}, jax {jax.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maas-jax", description="Optimize JAX models like a compiler and serve them."
    )
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, optimize, inspect_artifact, serve, bench, tour):
        module.add_parser(sub)
    sub.add_parser("version", help="print versions").set_defaults(
        run=lambda ns: print(_versions()) or 0
    )
    ns = parser.parse_args(argv)
    try:
        return int(ns.run(ns) or 0)
    except ModuleNotFoundError as e:
        print(
            f"maas-jax {ns.command}: {e} (install with: pip install 'maas_jax[serve]')",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
