"""Analyses of compiled programs: memory, FLOPs and collectives, per device.

What a sharding plan really does is only known after XLA has compiled it: which collectives it
inserted, how many bytes they move, which layer each comes from. These helpers read it from the
compiled executable (``jax.jit(f).trace(...).lower().compile()``); :func:`plan_report` does it
for a Program under its sharding plan (``_runtime``) and :func:`format_report` prints it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import numpy as np

from maas_jax._program import Program
from maas_jax._runtime import in_shardings, named_fn, plan_of

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>\([^=]*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
    re.M,
)
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "s8": 1, "u8": 1, "s64": 8,
          "u32": 4, "pred": 1, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of compiled HLO: its kind, result bytes, replica groups and op name."""

    kind: str
    bytes: int
    replica_groups: str
    op_name: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in compiled HLO text: kind, result bytes, replica groups, op name.

    >>> text = '  %ar = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), replica_groups={{0,1}}, '
    >>> text += 'to_apply=%add, metadata={op_name="jit(f)/dense/dot_general"}'
    >>> c = collectives(text)[0]
    >>> (c.kind, c.bytes, c.replica_groups, c.op_name)
    ('all-reduce', 128, '{{0,1}}', 'jit(f)/dense/dot_general')
    """
    out = []
    for m in _COLLECTIVE.finditer(hlo_text):
        line_end = hlo_text.find("\n", m.end())
        line = hlo_text[m.start() : line_end if line_end >= 0 else None]
        nbytes = 0
        for dtype, dims in _ARRAY.findall(m.group("type")):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            nbytes += n * _BYTES.get(dtype, 4)
        groups = re.search(r"replica_groups=(.*?)(?=, [a-z_]+=|$)", line)
        op = re.search(r'op_name="([^"]*)"', line)
        out.append(
            Collective(
                m.group("op"),
                nbytes,
                groups.group(1) if groups else "",
                op.group(1) if op else "",
            )
        )
    return out


def compiled_report(compiled: Any) -> dict[str, Any]:
    """Per-device memory (``memory_analysis``), FLOPs (``cost_analysis``) and collectives."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    colls = collectives(compiled.as_text())
    return {
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
        "flops": float((cost or {}).get("flops", 0.0)),
        "collectives": [c.as_dict() for c in colls],
        "collective_bytes": int(sum(c.bytes for c in colls)),
    }


# ---- a sharding plan, compiled -------------------------------------------------------------


def plan_report(program: Program, params: Any, *inputs: Any) -> dict[str, Any]:
    """The plan, compiled: per-device parameter bytes (static and from XLA), FLOPs, collectives.

    ``params``/``inputs`` may be ``jax.ShapeDtypeStruct``s: nothing is run, only compiled.
    Returns a JSON-able dict; ``format_report`` renders it as text.
    """
    plan = plan_of(program)
    shardings = in_shardings(program)
    args = (params, *inputs)
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), args, shardings
    )
    compiled = jax.jit(named_fn(program), in_shardings=shardings).trace(*structs).lower().compile()
    report = compiled_report(compiled)
    for c in report["collectives"]:
        c["replica_groups"] = _name_mesh_axes(c["replica_groups"], plan.mesh)
    total = sum(int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize for r in program.params)
    report.update(
        {
            "mesh": dict(zip(plan.mesh.axis_names, map(int, plan.mesh.devices.shape), strict=True)),
            "param_bytes_total": total,
            "param_bytes_per_device": plan.bytes_per_device(program),
            "replicated_param_fraction": plan.replicated_fraction(program),
            "param_specs": {k: str(v) for k, v in plan.param_specs.items()},
            "notes": list(plan.notes),
        }
    )
    json.dumps(report)  # must stay JSON-able
    return report


def _name_mesh_axes(groups: str, mesh: Any) -> str:
    """XLA prints iota replica groups over ``mesh['axis_0'=2,'axis_1'=4]``: the mesh's axes in
    order, unnamed. Put the mesh's own names back (only when the sizes match)."""
    m = re.search(r"mesh\[([^\]]*)\]", groups)
    if m is None:
        return groups
    found = re.findall(r"'axis_(\d+)'=(\d+)", m.group(1))
    sizes = [int(s) for s in mesh.devices.shape]
    if not found or [(int(i), int(n)) for i, n in found] != list(enumerate(sizes)):
        return groups
    return re.sub(
        r"'axis_(\d+)'",
        lambda a: repr(str(mesh.axis_names[int(a.group(1))])),
        groups,
    )


def format_bytes(n: float) -> str:
    """``n`` bytes in the unit that keeps it readable: B, KiB, MiB or GiB.

    >>> format_bytes(64), format_bytes(1536), format_bytes(3 * 2**20), format_bytes(2**31)
    ('64 B', '1.5 KiB', '3.0 MiB', '2.0 GiB')
    """
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _format_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def format_report(report: dict[str, Any], *, max_collectives: int = 12) -> str:
    """``plan_report`` as text: sizes in B/KiB/MiB/GiB, mesh axes and op names as named."""
    b = format_bytes
    lines = [
        f"mesh {report['mesh']}",
        f"parameters: {b(report['param_bytes_total'])} total, "
        f"{b(report['param_bytes_per_device'])} per device, "
        f"{100 * report['replicated_param_fraction']:.1f}% of bytes replicated",
        f"compiled, per device: arguments {b(report['argument_bytes'])}, temporaries "
        f"{b(report['temp_bytes'])}, {_format_flops(report['flops'])}",
        f"{len(report['collectives'])} collectives, {b(report['collective_bytes'])}:",
    ]
    for c in report["collectives"][:max_collectives]:
        lines.append(
            f"  {c['kind']:<18} {b(c['bytes']):>10}  groups {c['replica_groups'][:48]:<48}"
            f"  {c['op_name'][-60:]}"
        )
    if len(report["collectives"]) > max_collectives:
        lines.append(f"  ... {len(report['collectives']) - max_collectives} more")
    lines += [f"note: {n}" for n in report["notes"][:10]]
    return "\n".join(lines)
