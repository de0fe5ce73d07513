"""``maas-jax inspect DIR``: an artifact's signature, sizes, recipe and versions.

Every file's checksum is verified; nothing is deserialized (safe on untrusted directories).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show an artifact's signature, sizes, recipe, versions")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    from maas_jax import export

    try:
        m = export.read_manifest(ns.directory)
    except export.ArtifactError as e:
        print(f"maas-jax inspect: {e}")
        return 2
    if ns.json:
        print(json.dumps(m, indent=2))
        return 0
    print(describe(m))
    return 0


def describe(m: dict[str, Any]) -> str:
    lines = [f"{m['name']} version {m['version']}  (created {m.get('created', '?')})"]
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        for s in m[kind]:
            lines.append(f"  {s['name']:<24} {s['datatype']:<6} {s['shape']}")
    lines.append(f"batch buckets: {m['batch_sizes']}")
    s = m.get("sizes", {})
    ref = s.get("reference_bytes")
    lines.append(
        f"weights: {s.get('stored_bytes', 0):,} bytes"
        + (f" = {s['stored_bytes'] / ref:.3f}x the float model ({ref:,} bytes)" if ref else "")
        + f"; modules {s.get('module_bytes', 0):,} bytes"
    )
    tensors = m["weights"]["tensors"]
    by_dtype: dict[str, int] = {}
    for t in tensors.values():
        by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + 1
    lines.append(
        f"stored tensors: {len(tensors)} ("
        + ", ".join(f"{n} {k}" for k, n in sorted(by_dtype.items()))
        + ")"
    )
    if m.get("mesh"):
        lines.append(f"mesh: {m['mesh']['axes']}")
    lines.append(f"recipe: {json.dumps(m.get('recipe'))}")
    lines.append("passes: " + ", ".join(p["name"] for p in m.get("passes", [])))
    v = m["versions"]
    lines.append(
        f"exported with jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, maas_jax "
        f"{v.get('maas_jax')}, python {v.get('python')}; platforms {m['platforms']}"
    )
    lines.append(f"files verified: {', '.join(sorted(m['files']))}")
    return "\n".join(lines)
