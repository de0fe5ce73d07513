"""Passes and pipelines.

A pass is anything that maps a Program to a Program (the protocol is one ``__call__``, like
optax's ``GradientTransformation``). :func:`pipeline` composes passes and is itself a pass, so
pipelines nest like ``optax.chain``. After every pass the pipeline verifies the result: the
jaxpr type-checks (``jax.extend.core.check_jaxpr``) and the signature — input/output pytrees,
shapes and dtypes, roles — is what it was. A failure raises :class:`PassError` naming the pass,
the passes run before it, and (when the type checker names one) the equation with its user
source line and a window of the jaxpr around it.

Errors raised *by* a pass get the same context, like torch.fx's pass manager: any exception
from a user pass becomes a :class:`PassError` chained to the original (``raise ... from e``);
a maas_jax error (a :class:`MaasError` such as ``SelectionError``) becomes a PassError that is
*also* an instance of its original type, so both ``except PassError`` and
``except SelectionError`` catch it; a PassError passes through unchanged. Calling a pipeline
on anything but a Program (a plain function, say) is a TypeError saying to trace it first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from jax.extend import core as jcore

from maas_jax._errors import MaasError, PassError
from maas_jax._program import Program, require_program


@runtime_checkable
class Pass(Protocol):
    def __call__(self, program: Program) -> Program: ...


def pass_name(p: Any) -> str:
    name = getattr(p, "name", None)
    if isinstance(name, str):
        return name
    return getattr(p, "__name__", type(p).__name__)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Passes applied in order, with verification after each. Build with :func:`pipeline`."""

    passes: tuple[Any, ...]
    verify: bool = True

    name = "pipeline"

    def leaves(self) -> Iterator[Any]:
        """The passes in execution order, nested pipelines flattened."""
        for p in self.passes:
            if isinstance(p, Pipeline):
                yield from p.leaves()
            else:
                yield p

    def __call__(self, program: Program) -> Program:
        require_program(program, self._short())
        done: list[Any] = []
        for p in self.leaves():
            try:
                result = p(program)
            except PassError:
                raise  # already names its pass
            except MaasError as e:
                # A library error keeps its type (``pytest.raises(SelectionError)`` still
                # catches it) and gains the pipeline context as a PassError.
                raise _pass_error_like(e, _context(p, done) + f"\n{type(e).__name__}: {e}") from e
            except Exception as e:
                raise PassError(
                    _context(p, done) + f"\nit raised {type(e).__name__}: {e}\n"
                    "The pass itself raised it (the original traceback is chained above): fix "
                    f"the pass, or debug it alone on the program it got, {pass_name(p)}(program)."
                ) from e
            if not isinstance(result, Program):
                raise PassError(
                    _context(p, done) + f"\nthe pass returned a {type(result).__name__}, "
                    "not a Program. A pass maps a Program to a Program."
                )
            if self.verify and result is not program:
                verify(program, result, p, done)
            program = result
            done.append(p)
        return program

    def __repr__(self) -> str:
        inner = ", ".join(repr(p) for p in self.passes)
        return f"pipeline({inner})"

    def _short(self) -> str:
        text = repr(self)
        return text if len(text) <= 80 else "maas_jax.pipeline(...)"


def pipeline(*passes: Any, verify: bool = True) -> Pipeline:
    """Compose passes; the result is itself a pass.

    >>> import maas_jax
    >>> from maas_jax import passes
    >>> p = maas_jax.pipeline(passes.clip_weights(3.0), passes.dce())
    >>> p
    pipeline(clip_weights(max_abs=3.0), dce())
    """
    for p in passes:
        if not callable(p):
            raise TypeError(
                f"pipeline: {p!r} is not a pass. A pass is a callable Program -> Program, "
                "e.g. maas_jax.passes.clip_weights(3.0)."
            )
    return Pipeline(tuple(passes), verify)


_PASS_ERROR_TYPES: dict[type, type] = {}


def _pass_error_like(e: MaasError, message: str) -> PassError:
    """A PassError that is also an instance of ``type(e)`` (one class per error type)."""
    cls = type(e)
    if cls not in _PASS_ERROR_TYPES:
        try:
            _PASS_ERROR_TYPES[cls] = type(
                f"PassError[{cls.__name__}]",
                (PassError, cls),
                {"__module__": PassError.__module__, "__reduce__": _reduce_as_pass_error},
            )
        except TypeError:  # an incompatible layout: fall back to a plain PassError
            _PASS_ERROR_TYPES[cls] = PassError
    try:
        return _PASS_ERROR_TYPES[cls](message)
    except Exception:  # a subclass whose __init__ wants more than a message
        return PassError(message)


def _reduce_as_pass_error(self: BaseException) -> tuple[Any, ...]:
    return (PassError, self.args)


def _context(p: Any, done: list[Any]) -> str:
    before = ", ".join(pass_name(d) for d in done) or "none"
    return f"pass {pass_name(p)} ({p!r}) failed; passes run before it: {before}."


def _signature(program: Program) -> tuple[Any, ...]:
    j = program.jaxpr.jaxpr
    return (
        program.in_tree,
        program.out_tree,
        [(v.aval.shape, v.aval.dtype) for v in j.invars],
        [(v.aval.shape, v.aval.dtype) for v in j.outvars],
        program.roles,
    )


def verify(before: Program, after: Program, p: Any, done: list[Any]) -> None:
    """Type-check ``after`` and check that ``p`` kept the program's signature."""
    try:
        jcore.check_jaxpr(after.jaxpr.jaxpr)
    except Exception as e:
        raise PassError(
            _context(p, done) + "\nthe program it produced does not type-check:\n"
            f"{e}\n{_jaxpr_window(after.jaxpr, str(e))}"
        ) from e
    if not getattr(p, "changes_signature", False) and _signature(before) != _signature(after):
        raise PassError(
            _context(p, done) + "\nit changed the program's signature (input/output "
            "structure, shapes, dtypes or roles) without declaring `changes_signature = True`."
        )


def _jaxpr_window(closed: jcore.ClosedJaxpr, message: str, radius: int = 4) -> str:
    """Lines of the jaxpr around the first variable named in ``message``."""
    lines = str(closed).splitlines()
    for name in re.findall(r"\b([a-z]{1,3})(?=:)", message):
        for i, line in enumerate(lines):
            if re.search(rf"\b{name}:", line):
                lo, hi = max(0, i - radius), min(len(lines), i + radius + 1)
                return "jaxpr around it:\n" + "\n".join(lines[lo:hi])
    return "jaxpr:\n" + "\n".join(lines[: 2 * radius])


Transform = Callable[[Program], Program]
