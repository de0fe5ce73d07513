"""Exceptions and warnings that tell the user what happened, where, and how to fix it."""

from __future__ import annotations


class MaasError(Exception):
    """Base class of every error maas_jax raises on purpose."""


class TraceError(MaasError, TypeError):
    """The function or its arguments cannot be traced into a Program."""


class ProgramCallError(MaasError, TypeError):
    """A Program was called with arguments of another structure, shape or dtype."""


class SelectionError(MaasError, ValueError):
    """A ``where=`` selector or rule is malformed."""


class RewriteError(MaasError):
    """A rewrite rule failed on one equation; names the primitive, source line and name stack."""


class UnsupportedPrimitiveError(RewriteError):
    """A parameter flows into a primitive whose body the engine cannot see into."""


class PassError(MaasError):
    """A pass failed or produced an invalid program; names the pass and the pipeline context."""


class UnusedRuleWarning(UserWarning):
    """A selector or rule of a pass matched nothing in the program."""


class OpaqueRegionWarning(UserWarning):
    """An equation a pass would rewrite sits inside a region it leaves opaque (custom_jvp/vjp)."""
