"""``maas-jax optimize --recipe FILE --model SPEC --out DIR``: recipe file in, artifact out."""

from __future__ import annotations

import argparse
from typing import Any


def _buckets(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,32, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("optimize", help="run a recipe file on a model and write an artifact")
    p.add_argument("--recipe", required=True, help="recipe file (TOML, see maas_jax.recipe)")
    p.add_argument("--model", required=True, help="'minilm' or module:function")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--batch-sizes", type=_buckets, default=(1, 8, 32), help="default 1,8,32")
    p.add_argument("--calibration", help=".npz of input rows for static activation ranges")
    p.add_argument("--calibration-rows", type=int, default=64)
    p.add_argument("--name", help="served model name (default: the model's)")
    p.add_argument("--model-version", default="1")
    p.add_argument("--platforms", help="comma-separated lowering platforms (cpu,cuda,tpu)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import maas_jax
    from maas_jax import export, recipe
    from maas_jax.cli._models import calibration_from_file, resolve
    from maas_jax.cli._progress import step

    try:
        pipe = recipe.load(ns.recipe)
    except maas_jax.MaasError as e:
        print(f"maas-jax optimize: {e}")
        return 2
    with step(f"loading model {ns.model}"):
        spec = resolve(ns.model)
    program = maas_jax.trace(spec.fn, spec.params, *spec.example_inputs, name=spec.name)
    calibration = spec.calibration
    if ns.calibration:
        calibration = calibration_from_file(
            ns.calibration, len(spec.example_inputs), ns.calibration_rows
        )
    with step(f"running the recipe ({len(list(pipe.leaves()))} passes)"):
        optimized, stored = maas_jax.optimize(
            program, spec.params, pipe, calibration_data=calibration
        )
    float_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(spec.params))
    with step(f"exporting for batch sizes {list(ns.batch_sizes)}"):
        out = export.save(
            optimized,
            stored,
            ns.out,
            batch_sizes=ns.batch_sizes,
            name=ns.name or spec.name,
            version=ns.model_version,
            platforms=ns.platforms.split(",") if ns.platforms else None,
            recipe=pipe,
            warmup_inputs=spec.example_inputs,
            reference_bytes=float_bytes,
            overwrite=ns.overwrite,
        )
    m = export.read_manifest(out)
    print(f"wrote {out}: {_summary(m)}")
    print(maas_jax.coverage_report(optimized).splitlines()[-1])
    return 0


def _summary(m: dict[str, Any]) -> str:
    s = m["sizes"]
    ratio = (
        f" = {s['stored_bytes'] / s['reference_bytes']:.3f}x the float weights"
        if s.get("reference_bytes")
        else ""
    )
    return f"{s['stored_bytes']:,} bytes of weights{ratio}, buckets {m['batch_sizes']}"
