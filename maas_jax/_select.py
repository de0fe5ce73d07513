"""Selecting parameters: one ``where=`` vocabulary for every pass.

A selector is normalised to a predicate over :class:`ParamInfo` (path, role, uses), as flax's
``nnx.filterlib`` does for variables:

* ``str`` / ``re.Pattern`` — a regex searched in the parameter path (``"Dense_0/kernel$"``).
  A regex *narrows the candidates* — floating weights a dot_general / convolution consumes,
  and tables a lookup (``gather``) reads — so ``where="layers"`` never picks a bias or a norm
  scale that happens to live under ``layers/``;
* :class:`Path` — a regex over *every* parameter leaf (the explicit opt-in for biases, norm
  scales and other leaves);
* :class:`Op` — parameters consumed by a primitive and/or inside a name stack matching a regex;
* a callable ``fn(path, info) -> bool``;
* a list or tuple of selectors — *rules* tried in order, first match wins (qwix semantics). Each
  rule that selects nothing (or only what earlier rules took) is reported as unused.
* ``None`` — the pass's default (for weight passes: floating parameters of the ``params``
  collection that a dot_general or conv_general_dilated consumes).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from maas_jax._compat import CONTRACTION_PRIMITIVES, is_floating
from maas_jax._errors import SelectionError, UnusedRuleWarning
from maas_jax._program import ParamRef, Program
from maas_jax._provenance import Use, consumers


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What a selector sees of one parameter."""

    path: str
    role: ParamRef
    uses: tuple[Use, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.role.shape

    @property
    def dtype(self) -> Any:
        return self.role.dtype

    @property
    def is_weight(self) -> bool:
        """A trainable floating parameter that a dot_general or convolution sums over.

        A ``dot_general`` that contracts none of the parameter's axes is a broadcast product
        (named-axis libraries such as penzai scale by a norm's ``scale`` that way): it does
        not make the parameter a weight.
        """
        return (
            self.role.trainable
            and is_floating(self.role.dtype)
            and any(_sums_over(u) for u in self.uses)
        )

    @property
    def is_table(self) -> bool:
        """A trainable floating parameter read by a lookup (``gather``): an embedding table."""
        return (
            self.role.trainable
            and is_floating(self.role.dtype)
            and any(u.primitive == "gather" and u.operand == 0 for u in self.uses)
        )

    @property
    def is_candidate(self) -> bool:
        """What a path regex may select: weights of contractions and lookup tables.

        A parameter flowing into a region nobody can see into may be a weight too: it stays a
        candidate, so a pass selecting it says why it cannot handle it instead of skipping it.
        """
        opaque = any(u.opaque for u in self.uses) and is_floating(self.role.dtype)
        return self.is_weight or self.is_table or opaque


def _sums_over(use: Use) -> bool:
    if use.primitive not in CONTRACTION_PRIMITIVES:
        return False
    if use.primitive != "dot_general":
        return True
    contracting = dict(use.dims).get("contracting")
    return contracting is None or bool(contracting[use.operand])


@dataclasses.dataclass(frozen=True)
class Op:
    """Select parameters by how they are used.

    ``primitive``: a primitive name or tuple of names (``"dot_general"``,
    ``"conv_general_dilated"``); ``name_stack``: a regex searched in the full name stack of the
    consuming equation (Flax module path, e.g. ``"encoder/layer_0/attention"``).

    >>> Op("dot_general", name_stack="attention").primitive
    'dot_general'
    """

    primitive: str | tuple[str, ...] | None = None
    name_stack: str | None = None

    def __post_init__(self) -> None:
        if self.name_stack is not None:
            _compile_regex(self.name_stack, "Op(name_stack=...)")


@dataclasses.dataclass(frozen=True)
class Path:
    """Select *any* parameter leaf whose path matches ``pattern`` (biases and norm scales too).

    A plain regex only narrows the default candidates (contraction weights, lookup tables);
    ``Path`` is the explicit opt-in for everything else.

    >>> Path(r"bias$").pattern
    'bias$'
    """

    pattern: str

    def __post_init__(self) -> None:
        _compile_regex(self.pattern, "Path(...)")


Selector = Any  # str | re.Pattern | Path | Op | Callable | Sequence[Selector] | None
Predicate = Callable[[ParamInfo], bool]


def _compile_regex(pattern: str | re.Pattern, what: str) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SelectionError(
            f"{what}: {pattern!r} is not a valid regular expression ({e}). "
            "Selectors are Python regexes searched in the parameter path, "
            "e.g. r'encoder/layer_\\d+/attention/.*kernel$'."
        ) from None


def predicate(where: Selector, *, what: str = "where") -> Predicate:
    """Normalise one selector (not a rule list) to a predicate over :class:`ParamInfo`."""
    if isinstance(where, str | re.Pattern):
        rx = _compile_regex(where, what)
        return lambda info: info.is_candidate and rx.search(info.path) is not None
    if isinstance(where, Path):
        rx_all = _compile_regex(where.pattern, what)
        return lambda info: rx_all.search(info.path) is not None
    if isinstance(where, Op):
        prims = (where.primitive,) if isinstance(where.primitive, str) else where.primitive
        ns = _compile_regex(where.name_stack, what) if where.name_stack is not None else None

        def op_pred(info: ParamInfo) -> bool:
            return any(
                (prims is None or u.primitive in prims)
                and (ns is None or ns.search(u.name_stack) is not None)
                for u in info.uses
            )

        return op_pred
    if callable(where):
        return lambda info: bool(where(info.path, info))
    if isinstance(where, Sequence) and not isinstance(where, str):
        preds = [predicate(w, what=what) for w in where]
        return lambda info: any(p(info) for p in preds)
    raise SelectionError(
        f"{what}: cannot select with a {type(where).__name__} ({where!r}). Use a path regex "
        "string, maas_jax.Path(regex) (any leaf), maas_jax.Op(primitive=..., name_stack=...), "
        "a callable (path, info) -> bool, or a list of these."
    )


def param_infos(program: Program) -> list[ParamInfo]:
    """A :class:`ParamInfo` (path, role, uses) for every parameter, in the program's order."""
    table = consumers(program)
    return [ParamInfo(r.path, r, table[r.path]) for r in program.params]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which parameters each rule took (first match wins) and which rules took nothing."""

    chosen: Mapping[str, int]  # path -> index of the rule that selected it
    infos: Mapping[str, ParamInfo]
    unused: tuple[int, ...]
    rules: tuple[Any, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.chosen)


def select(
    program: Program,
    where: Selector,
    *,
    pass_name: str,
    default: Predicate | None = None,
    warn_unused: bool = True,
) -> Selection:
    """Apply ``where`` to the program's parameters, first match wins; warn on unused rules."""
    default = default or (lambda info: info.is_weight)
    if where is None:
        rules: tuple[Any, ...] = (None,)
        preds = [default]
    else:
        rules = tuple(where) if isinstance(where, list | tuple) else (where,)
        preds = [predicate(r, what=f"{pass_name}(where=...)") for r in rules]
    infos = {i.path: i for i in param_infos(program)}
    chosen: dict[str, int] = {}
    for path, info in infos.items():
        for k, pred in enumerate(preds):
            if pred(info):
                chosen[path] = k
                break
    unused = tuple(k for k in range(len(rules)) if k not in chosen.values())
    if warn_unused and unused and where is not None:
        names = ", ".join(repr(rules[k]) for k in unused)
        warnings.warn(
            f"{pass_name}: rule(s) {names} matched no parameter of {program.name!r} "
            f"(or only parameters an earlier rule took). Parameters: "
            f"{', '.join(list(infos)[:8])}{', ...' if len(infos) > 8 else ''}",
            UnusedRuleWarning,
            stacklevel=_user_stacklevel(),
        )
    return Selection(chosen, infos, unused, rules)


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, seen from its caller, of the first frame outside
    maas_jax: the user's line that called the pass, directly or through a pipeline."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and _in_package(frame):
        level, frame = level + 1, frame.f_back
    return level


def _in_package(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == "maas_jax" or name.startswith("maas_jax.")
