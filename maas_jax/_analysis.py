"""Analyses of compiled programs: memory, FLOPs and collectives, per device.

What a sharding plan really does is only known after XLA has compiled it: which collectives it
inserted, how many bytes they move, which layer each comes from. These helpers read it from the
compiled executable (``jax.jit(f).trace(...).lower().compile()``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

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
