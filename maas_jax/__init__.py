"""maas_jax: optimize JAX/Flax models the way a compiler does.

Trace a function to a :class:`Program`, run passes over it (``maas_jax.passes``), get back an
ordinary JAX callable that jits, differentiates, vmaps and shards.

>>> import jax.numpy as jnp
>>> import maas_jax
>>> from maas_jax import passes
>>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.eye(2) * 5}, jnp.ones(2))
>>> out = maas_jax.pipeline(passes.clip_weights(1.0), passes.dce())(prog)
>>> out({"w": jnp.eye(2) * 5}, jnp.ones(2)).tolist()
[1.0, 1.0]
"""

from maas_jax import checkpoint, distributed, recipe  # noqa: E402  (public submodules)
from maas_jax._analysis import Collective, collectives, compiled_report
from maas_jax._errors import (
    MaasError,
    OpaqueRegionWarning,
    PassError,
    ProgramCallError,
    RewriteError,
    SelectionError,
    TraceError,
    UnsupportedPrimitiveError,
    UnusedRuleWarning,
)
from maas_jax._interpreter import Rewrite, apply_marked, rewrite
from maas_jax._optimize import optimize
from maas_jax._pipeline import Pass, Pipeline, pipeline, verify
from maas_jax._program import (
    InputRef,
    ParamRef,
    PassRecord,
    Program,
    StateRef,
    to_fn,
    trace,
    trace_linen,
    trace_nnx,
)
from maas_jax._provenance import Site, Tag, Use, consumers, contraction_sites
from maas_jax._report import (
    CoverageEntry,
    coverage,
    coverage_report,
    param_report,
    primitive_counts,
)
from maas_jax._select import Op, ParamInfo, Path, Selection, param_infos, predicate, select
from maas_jax.distributed import MeshSpec  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``import maas_jax`` then ``maas_jax.passes``: the pass library imports the core, so it
    # is loaded on first access rather than here (that would be a circular import).
    if name in ("passes", "extend", "runtime"):  # extend/runtime: public submodules, on demand
        import importlib

        return importlib.import_module(f"maas_jax.{name}")
    raise AttributeError(f"module 'maas_jax' has no attribute {name!r}")


__all__ = [
    "MeshSpec",
    "checkpoint",
    "recipe",
    "distributed",
    "Collective",
    "collectives",
    "compiled_report",
    "CoverageEntry",
    "InputRef",
    "MaasError",
    "Op",
    "OpaqueRegionWarning",
    "ParamInfo",
    "ParamRef",
    "Path",
    "Pass",
    "PassError",
    "PassRecord",
    "Pipeline",
    "Program",
    "ProgramCallError",
    "Rewrite",
    "RewriteError",
    "Selection",
    "SelectionError",
    "Site",
    "StateRef",
    "Tag",
    "TraceError",
    "UnsupportedPrimitiveError",
    "UnusedRuleWarning",
    "Use",
    "apply_marked",
    "consumers",
    "contraction_sites",
    "coverage",
    "coverage_report",
    "optimize",
    "param_infos",
    "param_report",
    "pipeline",
    "predicate",
    "primitive_counts",
    "rewrite",
    "select",
    "to_fn",
    "trace",
    "trace_linen",
    "trace_nnx",
    "verify",
]
