"""Every piece of jax-version knowledge in maas_jax lives here.

jax renames primitives and their parameters between releases (0.11 merged ``ClosedJaxpr``
into ``Jaxpr`` and renamed scan's ``num_consts``/``num_carry`` to ``ft_in``/``ft_out``;
0.12 renamed ``closed_call`` to ``eval_jaxpr``; the 0.10.2 patch renamed shard_map's
``manual_axes``). The engine never reads ``eqn.params`` of a higher-order primitive
directly: it asks this module, so supporting a new jax release means editing one file.

Only public modules are used: ``jax``, ``jax.extend`` and ``jax.sharding``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from jax.extend import core as jcore
from jax.extend import source_info_util

# Canonical kinds of higher-order primitive, keyed by the primitive names jax has used.
_HOP_KINDS: dict[str, str] = {
    "jit": "jit",
    "pjit": "jit",
    "closed_call": "call",
    "core_call": "call",
    "eval_jaxpr": "call",
    "scan": "scan",
    "while": "while",
    "cond": "cond",
    "remat2": "remat",
    "checkpoint": "remat",
    "custom_jvp_call": "custom_jvp",
    "custom_vjp_call": "custom_vjp",
    "custom_vjp_call_jaxpr": "custom_vjp",
    "shard_map": "shard_map",
}

# Ops whose output is the operand seen through another shape, dtype or layout: a parameter
# keeps its identity through them (``params/w`` transposed is still ``params/w``).
VIEW_PRIMITIVES = frozenset(
    {
        "convert_element_type",
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "copy",
        "copy_p",
        "pvary",
        "sharding_constraint",
        "mesh_cast",
        "reshard",
        "reduce_precision",
        # Sub-blocks of the operand (``W[i]``, ``W[:, 1:3]``, ``dynamic_slice`` in a loop): the
        # value is still (part of) the parameter; dimensions map back one-to-one.
        "slice",
        "dynamic_slice",
    }
)

# A ``gather`` whose indices are constants (``W[jnp.array([0, 2])]``) is a view too; one whose
# indices come from the inputs (an embedding lookup) is a *use* of the table.
GATHER_PRIMITIVE = "gather"

CONTRACTION_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated", "ragged_dot_general"})


def hop_kind(eqn: jcore.JaxprEqn) -> str | None:
    """The canonical kind of a known higher-order primitive, or None."""
    return _HOP_KINDS.get(eqn.primitive.name)


def sub_jaxprs(eqn: jcore.JaxprEqn) -> list[jcore.Jaxpr]:
    """All open jaxprs nested directly in ``eqn``'s params (any primitive, known or not)."""
    return list(jcore.jaxprs_in_params(eqn.params))


def as_closed(j: Any) -> jcore.ClosedJaxpr:
    """Wrap an open ``Jaxpr`` (remat, shard_map bodies) as a ``ClosedJaxpr`` with no consts."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j
    return jcore.ClosedJaxpr(j, [])


def bind_eqn(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Re-bind ``eqn`` on the current trace with new operands; always returns a list.

    ``get_bind_params`` turns call-like params (custom_jvp's ``jvp_jaxpr_fun``, ...) back into
    the form ``bind`` expects; binding ``**eqn.params`` directly fails on them.
    """
    return bind_with_params(eqn.primitive, eqn.params, invals)


def bind_with_params(primitive: Any, params: dict[str, Any], invals: list[Any]) -> list[Any]:
    """Bind ``primitive`` with jaxpr-form ``params``; always returns a list."""
    bound = primitive.get_bind_params(params)
    # jax < 0.5 returned (subfuns, params); newer releases return params only.
    if isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], dict):
        subfuns, bound = bound
    else:
        subfuns = []
    out = primitive.bind(*subfuns, *invals, **bound)
    return list(out) if primitive.multiple_results else [out]


def eqn_context(eqn: jcore.JaxprEqn, name_stack: Any) -> contextlib.AbstractContextManager:
    """Context that re-creates ``eqn``'s provenance (user traceback, name stack, eqn ctx).

    Re-binding inside it keeps op names and source lines in the lowered HLO metadata.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(
        source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)
    )
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None)
    if manager is not None:
        stack.enter_context(manager)
    return stack


def current_name_stack() -> Any:
    """The name stack jax is tracing under now (prefix it to a re-bound equation's own)."""
    return source_info_util.current_name_stack()


def eqn_name_stack(eqn: jcore.JaxprEqn) -> Any:
    """``eqn``'s own name stack, relative to the jaxpr it sits in (a jax ``NameStack``)."""
    return eqn.source_info.name_stack


def source_line(eqn: jcore.JaxprEqn) -> str:
    """The user's source line for ``eqn`` ("file.py:12:4 (fn)"), or "<unknown>"."""
    try:
        return source_info_util.summarize(eqn.source_info) or "<unknown>"
    except Exception:  # summarize can fail on synthetic equations
        return "<unknown>"


# ---- per-primitive parameter access -------------------------------------------------


def jit_jaxpr(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    return as_closed(eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"])


def jit_name(eqn: jcore.JaxprEqn) -> str:
    """The function name of a ``jit`` equation (``"maas_fake_quant"`` for a marker), or ""."""
    return str(eqn.params.get("name", ""))


def jit_with_jaxpr(eqn: jcore.JaxprEqn, closed: jcore.ClosedJaxpr) -> dict[str, Any]:
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    return {**eqn.params, key: closed}


def scan_layout(eqn: jcore.JaxprEqn) -> tuple[int, int]:
    """(number of consts, number of carries) of a scan."""
    p = eqn.params
    if "num_consts" in p:
        return p["num_consts"], p["num_carry"]
    # jax >= 0.11 names them by forwarding counts.
    return p["ft_in"], p["ft_out"]  # pragma: no cover - newer jax only


def scan_body(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    return as_closed(eqn.params["jaxpr"])


def scan_options(eqn: jcore.JaxprEqn) -> dict[str, Any]:
    p = eqn.params
    return {"length": p["length"], "reverse": p["reverse"], "unroll": p["unroll"]}


def while_parts(eqn: jcore.JaxprEqn) -> tuple[jcore.ClosedJaxpr, int, jcore.ClosedJaxpr, int]:
    p = eqn.params
    return (
        as_closed(p["cond_jaxpr"]),
        p["cond_nconsts"],
        as_closed(p["body_jaxpr"]),
        p["body_nconsts"],
    )


def cond_branches(eqn: jcore.JaxprEqn) -> list[jcore.ClosedJaxpr]:
    return [as_closed(b) for b in eqn.params["branches"]]


def remat_body(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    return as_closed(eqn.params["jaxpr"])


def remat_options(eqn: jcore.JaxprEqn) -> dict[str, Any]:
    return {"prevent_cse": eqn.params["prevent_cse"], "policy": eqn.params["policy"]}


def custom_call_body(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    return as_closed(eqn.params["call_jaxpr"])


def custom_call_name(eqn: jcore.JaxprEqn) -> str:
    """The user function name of a custom_jvp / custom_vjp equation (for messages)."""
    p = eqn.params
    if "name" in p:
        return str(p["name"])
    body = custom_call_body(eqn)
    return str(getattr(body.jaxpr.debug_info, "func_name", "") or eqn.primitive.name)


def shard_map_body(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    return as_closed(eqn.params["jaxpr"])


def shard_map_options(eqn: jcore.JaxprEqn) -> dict[str, Any]:
    p = eqn.params
    manual = p.get("newly_manual_axes", p.get("manual_axes", p.get("axis_names")))
    return {
        "mesh": p["mesh"],
        "in_specs": tuple(p["in_specs"]),
        "out_specs": tuple(p["out_specs"]),
        "axis_names": frozenset(manual) if manual is not None else frozenset(),
        "check_vma": p.get("check_vma", p.get("check_rep", True)),
    }


def shard_map_in_specs(eqn: jcore.JaxprEqn) -> tuple[Any, ...]:
    return tuple(eqn.params["in_specs"])


def contraction_summary(eqn: jcore.JaxprEqn) -> dict[str, Any]:
    """The dimension numbers of a dot/conv, as plain data for the consumer table."""
    p = eqn.params
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        return {
            "contracting": (tuple(lc), tuple(rc)),
            "batch": (tuple(lb), tuple(rb)),
        }
    if eqn.primitive.name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        return {
            "lhs_spec": tuple(dn.lhs_spec),
            "rhs_spec": tuple(dn.rhs_spec),
            "out_spec": tuple(dn.out_spec),
            "feature_group_count": p["feature_group_count"],
        }
    return {}


def gather_summary(eqn: jcore.JaxprEqn) -> dict[str, Any]:
    """A gather's dimension numbers and slice sizes, as plain data."""
    dn = eqn.params["dimension_numbers"]
    return {
        "offset_dims": tuple(dn.offset_dims),
        "collapsed_slice_dims": tuple(dn.collapsed_slice_dims),
        "start_index_map": tuple(dn.start_index_map),
        "operand_batching_dims": tuple(getattr(dn, "operand_batching_dims", ())),
        "slice_sizes": tuple(eqn.params["slice_sizes"]),
    }


def aval_struct(aval: Any) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct for an abstract value, keeping weak types."""
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def is_floating(dtype: Any) -> bool:
    """True for float and complex dtypes, bfloat16 and float8 included (numpy kind is 'V')."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.inexact))
