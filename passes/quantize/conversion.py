"""``convert``: turn a fake-quant Program into a real integer Program.

The fake-quant program computes each quantized weight's integers and scale inside a marker
region at the weight's entry, then uses them (integer contractions, dequantization). Converting
is graph surgery on that program:

1. the straight-through estimators are replaced by their forward values (inference needs no
   float gradients), and the code only they used is removed;
2. every marker's outputs become program inputs — the stored integers and scales — and the
   float weight, now unused, leaves the signature;
3. every *precomputed* region (a top-level ``jit`` named ``precomputed[...]`` computing values
   from parameters only: ``fold_batchnorm``'s folded per-channel bias) becomes stored inputs
   too, at the paths its name lists; parameters that only fed removed computations (the
   BatchNorm scale, bias, mean and var) leave the signature;
4. int4 (and narrower) values are stored packed two per byte and unpacked in the graph.

Non-finite weights: :func:`convert_params` raises on a NaN or inf in a quantized weight (or in
the value quantized for it, or in a precomputed value), naming the parameter path.

Because the rest of the program is untouched, the converted forward equals the fake-quant
forward bit for bit. :func:`convert_params` computes the stored values by running exactly the
program slice that computed them, one weight at a time (bounded peak memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from maas_jax.passes.dce import dce
from maas_jax.passes.fold_batchnorm import precomputed_paths
from maas_jax.passes.quantize import qarray as qa
from maas_jax.passes.quantize.numerics import check_finite, pack_int4, unpack_int4

from maas_jax import MaasError, ParamRef, PassRecord, Program, Rewrite, rewrite
from maas_jax.extend import (
    Site,
    custom_call_name,
    flatten_leaves,
    initial_tags,
    jit_name,
    live_equations,
    region_kind,
    source_line,
    walk,
)


class ConvertError(MaasError, ValueError):
    """The program cannot be converted (not fake-quantized, or floats still needed)."""


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """How one quantized weight is stored in the converted parameter tree."""

    path: str
    shape: tuple[int, ...]  # the unpacked integer shape
    packed: bool  # int4 and narrower: two values per byte along the last axis
    names: tuple[str, ...]  # "qvalue", "scale"[, "zero_point"]


@dataclasses.dataclass(frozen=True)
class Convert:
    """The pass :func:`convert` returns. It changes the program's signature (the parameters)."""

    pack: bool = True
    name = "convert"
    changes_signature = True

    def __repr__(self) -> str:
        return "convert()" if self.pack else "convert(pack=False)"

    def __call__(self, program: Program) -> Program:
        uncalibrated = program.meta.get("uncalibrated_sites", ())
        if uncalibrated:
            raise ConvertError(
                f"convert: {len(uncalibrated)} contraction(s) use static activation scales that "
                f"were never calibrated (sites {list(uncalibrated)[:5]}). Run "
                "maas_jax.passes.calibrate(program, params, batches) before convert."
            )
        markers = _entry_markers(program)
        if not markers:
            if any(r.name == "fake_quant" for r in program.history):
                raise ConvertError("convert: no quantized weights left to convert")
            raise ConvertError(
                f"convert: {program.name!r} has no fake-quantized weights. Run "
                "maas_jax.passes.fake_quant(...) first: convert stores what it computed."
            )
        stripped = dce()(_strip_ste(program))
        return _surgery(stripped, self.pack)


def convert(*, pack: bool = True) -> Convert:
    """Convert a fake-quant program into an integer program (float weights dropped).

    Call the result with :func:`convert_params` of the float parameters.

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> fq = passes.fake_quant("int8", act="int8")(
    ...     maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((1, 2))))
    >>> int8 = passes.convert()(fq)
    >>> stored = passes.convert_params(int8, fq, {"w": w})
    >>> stored["w"]["qvalue"].dtype.name, stored["w"]["qvalue"].tolist()
    ('int8', [[127, -64], [64, 127]])
    >>> bool((int8(stored, jnp.ones((1, 2))) == fq({"w": w}, jnp.ones((1, 2)))).all())
    True
    """
    return Convert(pack)


# ---- step 1: drop the straight-through estimators --------------------------------------


def _is_ste(eqn: Any) -> bool:
    return region_kind(eqn) == "custom_jvp" and custom_call_name(eqn) in (
        qa.STE_NAME,
        qa.STE_IDENTITY_NAME,
    )


def _strip_ste(program: Program) -> Program:
    def rule(site: Site, invals: list[Any]) -> list[Any] | None:
        if not _is_ste(site.eqn):
            return None
        name = custom_call_name(site.eqn)
        return [invals[0]] if name == qa.STE_NAME else [invals[1]]

    spec = Rewrite(
        "convert", rule=rule, rule_primitives=frozenset({"custom_jvp_call"}), wants=_is_ste
    )
    return program.replace(jaxpr=rewrite(program, spec))


# ---- step 2: markers become inputs --------------------------------------------------------


def _entry_markers(program: Program) -> dict[str, jcore.JaxprEqn]:
    """Top-level fake-quant marker equations, by the parameter path they quantize."""
    found: dict[str, jcore.JaxprEqn] = {}

    def visit(site: Site) -> None:
        eqn = site.eqn
        if site.regions or region_kind(eqn) != "jit" or jit_name(eqn) != qa.MARKER:
            return
        tag = site.in_tags[0]
        if tag is None:
            raise ConvertError(f"convert: a quantization marker at {site.source} has no parameter")
        found[tag.path] = eqn

    walk(program.jaxpr.jaxpr, initial_tags(program), visit)
    return found


def _precomputed(program: Program) -> dict[tuple[str, ...], jcore.JaxprEqn]:
    """Top-level precomputed regions reading parameters only, by the paths they store."""
    jaxpr = program.jaxpr.jaxpr
    # Variables that depend on something other than parameters and constants.
    data = {
        v for v, r in zip(jaxpr.invars, program.roles, strict=True) if not isinstance(r, ParamRef)
    }
    found: dict[tuple[str, ...], jcore.JaxprEqn] = {}
    for eqn in jaxpr.eqns:
        reads_data = eqn.effects or any(
            not isinstance(v, jcore.Literal) and v in data for v in eqn.invars
        )
        paths = precomputed_paths(eqn)
        if paths is not None and not reads_data:
            found[paths] = eqn
        if reads_data:
            data.update(eqn.outvars)
    return found


def _stored_layout(program: Program, pack: bool) -> dict[str, StoredWeight]:
    specs = program.meta.get("fake_quant", {})
    out = {}
    for path, eqn in _entry_markers(program).items():
        q_aval = eqn.outvars[0].aval
        spec = specs.get(path)
        bits = None if spec is None or spec.fmt.is_float else spec.fmt.bits
        names = ("qvalue", "scale", "zero_point")[: len(eqn.outvars)]
        packed = pack and bits is not None and bits <= 4 and q_aval.ndim > 0
        out[path] = StoredWeight(path, tuple(q_aval.shape), packed, names)
    return out


def _surgery(program: Program, pack: bool) -> Program:
    layout = _stored_layout(program, pack)
    markers = _entry_markers(program)
    precomputed = _precomputed(program)
    jaxpr = program.jaxpr.jaxpr
    read_before = {v for e in jaxpr.eqns for v in e.invars if not isinstance(v, jcore.Literal)}
    read_before |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    marker_ids = {id(e) for e in (*markers.values(), *precomputed.values())}
    eqns = [e for e in jaxpr.eqns if id(e) not in marker_ids]
    body = jaxpr.replace(eqns=eqns)
    live = live_equations(body)
    body = body.replace(eqns=[e for e, keep in zip(eqns, live, strict=True) if keep])
    used = {v for e in body.eqns for v in e.invars if not isinstance(v, jcore.Literal)}
    used |= {v for v in body.outvars if not isinstance(v, jcore.Literal)}

    # New inputs: every old input but the quantized floats, then the stored values.
    kept_roles, kept_vars = [], []
    for role, var in zip(program.roles, jaxpr.invars, strict=True):
        if isinstance(role, ParamRef) and role.path in markers:
            if var in used:
                use = next(e for e in body.eqns if var in e.invars)
                raise ConvertError(
                    f"convert: parameter {role.path!r} is still used as a float by "
                    f"`{use.primitive.name}` at {source_line(use)}; only its quantized form is "
                    "stored. Quantize every use or exclude it from fake_quant."
                )
            continue
        if isinstance(role, ParamRef) and var in read_before and var not in used:
            continue  # it only fed what is now stored (BatchNorm statistics folded away)
        kept_roles.append(role)
        kept_vars.append(var)
    stored_vars = {path: list(eqn.outvars) for path, eqn in markers.items()}
    pre_vars = {
        path: var
        for paths, eqn in precomputed.items()
        for path, var in zip(paths, eqn.outvars, strict=True)
    }
    invars = kept_vars + [v for path in sorted(stored_vars) for v in stored_vars[path]]
    invars += [pre_vars[path] for path in sorted(pre_vars)]
    body = body.replace(invars=invars)
    jcore.check_jaxpr(body)
    closed = jcore.ClosedJaxpr(body, program.jaxpr.consts)

    # The converted parameter tree: the old paths, quantized leaves replaced by a dict.
    param_structs = {
        r.path: jax.ShapeDtypeStruct(r.shape, r.dtype)
        for r in kept_roles
        if isinstance(r, ParamRef)
    }
    for path, sw in layout.items():
        for name, var in zip(sw.names, stored_vars[path], strict=True):
            aval = var.aval
            shape, dtype = tuple(aval.shape), aval.dtype
            if name == "qvalue" and sw.packed:
                shape, dtype = (*shape[:-1], (shape[-1] + 1) // 2), jnp.uint8
            param_structs[f"{path}/{name}"] = jax.ShapeDtypeStruct(shape, dtype)
    for path, var in sorted(pre_vars.items()):
        clash = [p for p in param_structs if p == path or p.startswith(f"{path}/")]
        clash += [p for p in param_structs if path.startswith(f"{p}/")]
        if clash:
            raise ConvertError(
                f"convert: the precomputed value {path!r} would be stored where {clash[0]!r} "
                "already is; rename the parameter."
            )
        param_structs[path] = jax.ShapeDtypeStruct(tuple(var.aval.shape), var.aval.dtype)
    new_params = _nest(param_structs)
    old_params, inputs = jax.tree.unflatten(program.in_tree, [0] * len(program.roles))
    del old_params
    new_leaves = flatten_leaves(new_params)
    kept_by_path = {r.path: v for r, v in zip(kept_roles, kept_vars, strict=True)}
    position = {id(v): i for i, v in enumerate(invars)}

    def run(*flat: Any) -> list[Any]:
        n_params = len(new_leaves)
        args: list[Any] = [None] * len(invars)
        for leaf, value in zip(new_leaves, flat[:n_params], strict=True):
            if leaf.path in kept_by_path:
                args[position[id(kept_by_path[leaf.path])]] = value
                continue
            if leaf.path in pre_vars:
                args[position[id(pre_vars[leaf.path])]] = value
                continue
            path, name = leaf.path.rsplit("/", 1)
            sw = layout[path]
            k = sw.names.index(name)
            if name == "qvalue" and sw.packed:
                value = unpack_int4(value, sw.shape[-1], axis=-1)
            args[position[id(stored_vars[path][k])]] = value
        input_roles = [r for r in kept_roles if not isinstance(r, ParamRef)]
        for role, value in zip(input_roles, flat[n_params:], strict=True):
            args[position[id(kept_by_path[role.path])]] = value
        return jcore.jaxpr_as_fun(closed)(*args)

    structs = [leaf.value for leaf in new_leaves] + [
        jax.ShapeDtypeStruct(r.shape, r.dtype) for r in kept_roles if not isinstance(r, ParamRef)
    ]
    new_jaxpr = jax.make_jaxpr(run)(*structs)
    roles = tuple(
        ParamRef(leaf.path, "params", tuple(leaf.value.shape), np.dtype(leaf.value.dtype))
        for leaf in new_leaves
    ) + tuple(r for r in kept_roles if not isinstance(r, ParamRef))
    in_tree = jax.tree.structure((new_params, inputs))
    record = PassRecord("convert", "convert()", tuple(sorted(layout)), ())
    meta = dict(program.meta)
    meta["convert"] = {
        "layout": layout,
        "precomputed": tuple(sorted(pre_vars)),
        "source_roles": program.roles,
    }
    return Program(
        new_jaxpr,
        in_tree,
        program.out_tree,
        roles,
        name=program.name,
        history=(*program.history, record),
        meta=meta,
    )


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return root


# ---- the stored values -----------------------------------------------------------------


def convert_params(converted: Program, fake_quant_program: Program, params: Any) -> dict[str, Any]:
    """The parameter tree ``converted`` is called with, from the float ``params``.

    Each weight's integers and scale are computed by the slice of ``fake_quant_program`` that
    computes them there (so they are identical), one weight at a time; the float weights are
    not kept. Precomputed values (``fold_batchnorm``'s folded bias) are computed the same way,
    and the parameters only they read are not kept either.

    Raises:
      ConvertError: a quantized weight holds a NaN or an inf (the error names its path), or
        the value quantized for it or a precomputed value is not finite (e.g. a BatchNorm
        variance below ``-eps``): an integer model cannot represent it, and a fake-quant
        program would answer NaN there.
    """
    info = converted.meta["convert"]
    layout: dict[str, StoredWeight] = info["layout"]
    wanted = {r.path for r in converted.params}
    stripped = fake_quant_program
    markers = _entry_markers(stripped)
    jaxpr = stripped.jaxpr.jaxpr
    flat = jax.tree.leaves(params)
    by_var = dict(zip(jaxpr.invars, flat[: len(jaxpr.invars)], strict=False))
    by_path = {
        r.path: v for r, v in zip(stripped.roles, flat, strict=False) if isinstance(r, ParamRef)
    }
    path_of = {v: r.path for v, r in zip(jaxpr.invars, stripped.roles, strict=True)}
    out: dict[str, Any] = {}
    for path, value in by_path.items():
        if path not in markers and path in wanted:
            out[path] = value
    for path, eqn in sorted(markers.items()):
        if path not in layout:
            continue
        _check(path, by_path.get(path), f"parameter {path!r}", "")
        fn, needed = _slice(jaxpr, stripped.jaxpr.consts, eqn)
        values = jax.jit(fn)(*[by_var[v] for v in needed])
        sw = layout[path]
        for name, value in zip(sw.names, values, strict=True):
            if name == "scale":
                _check(
                    path,
                    value,
                    f"the value quantized for parameter {path!r}",
                    f" It is computed from {[path_of[v] for v in needed]} by earlier passes "
                    f"({_transforms(stripped, path)}).",
                )
            if name == "qvalue" and sw.packed:
                value = pack_int4(value, axis=-1)
            out[f"{path}/{name}"] = value
    for paths, eqn in sorted(_precomputed(stripped).items()):
        if not any(p in wanted for p in paths):
            continue
        fn, needed = _slice(jaxpr, stripped.jaxpr.consts, eqn)
        values = jax.jit(fn)(*[by_var[v] for v in needed])
        sources = [path_of[v] for v in needed]
        for path, value in zip(paths, values, strict=True):
            _check(
                path,
                value,
                f"the precomputed value {path!r}",
                f" It is computed from parameters {sources}; check them (a BatchNorm variance "
                "below -epsilon gives NaN).",
            )
            out[path] = value
    kept = {leaf.path for leaf in flatten_leaves(_nest(dict.fromkeys(out, 0)))}
    missing = [r.path for r in converted.params if r.path not in kept]
    if missing:
        raise ConvertError(f"convert_params: no value for {missing[:5]}")
    return _nest(out)


def _check(path: str, value: Any, what: str, hint: str) -> None:
    if value is None:
        return
    check_finite(
        "convert_params",
        what,
        value,
        ConvertError,
        hint=f"{hint} An integer model cannot represent it: fix the parameters, or exclude "
        f"{path!r} from fake_quant(where=...).",
    )


def _transforms(program: Program, path: str) -> str:
    passes = [r.name for r in program.history if path in r.touched and r.name != "fake_quant"]
    return ", ".join(passes) or "none"


def _slice(jaxpr: jcore.Jaxpr, consts: list[Any], target: jcore.JaxprEqn) -> tuple[Any, list[Any]]:
    """A function computing ``target``'s outputs from the program inputs it depends on."""
    k = next(i for i, e in enumerate(jaxpr.eqns) if e is target)
    sub = jaxpr.replace(eqns=jaxpr.eqns[: k + 1], outvars=list(target.outvars))
    live = live_equations(sub)
    eqns = [e for e, keep in zip(sub.eqns, live, strict=True) if keep]
    needed_vars = {v for e in eqns for v in e.invars if not isinstance(v, jcore.Literal)}
    needed = [v for v in jaxpr.invars if v in needed_vars]
    sub = sub.replace(eqns=eqns, invars=needed)
    closed = jcore.ClosedJaxpr(sub, consts)
    return jcore.jaxpr_as_fun(closed), needed
