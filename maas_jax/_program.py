"""Program: a traced function as a closed jaxpr plus the role of every input.

A Program is what passes read and return. It keeps the caller's pytree structures, so it is
called exactly like the function it came from and returns the same pytree; it is an ordinary
JAX callable, so ``jax.jit``, ``jax.grad`` and ``jax.vmap`` compose with it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from maas_jax import _compat
from maas_jax._errors import ProgramCallError, TraceError
from maas_jax._paths import describe_value, flatten_leaves, key_path_str

# ---- roles ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """A jaxpr input that is a leaf of the parameter tree (the first argument).

    ``collection`` is the Linen collection (``params``, ``batch_stats``) or, for NNX, the
    variable type (``Param``, ``BatchStat``). ``logical_axes`` are the names the model declared
    (``nn.with_logical_partitioning``, NNX ``sharding``), if any.
    """

    path: str
    collection: str
    shape: tuple[int, ...]
    dtype: np.dtype
    logical_axes: tuple[str | None, ...] | None = None

    @property
    def trainable(self) -> bool:
        return self.collection in ("params", "Param")


@dataclasses.dataclass(frozen=True)
class StateRef:
    """A jaxpr input a pass added (masks, scales, observer statistics)."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class InputRef:
    """A jaxpr input that is a leaf of the positional inputs after the parameters."""

    path: str  # "args/0", "args/1/mask", ...
    shape: tuple[int, ...]
    dtype: np.dtype


Role = ParamRef | StateRef | InputRef


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did to a Program: kept in ``Program.history`` for reports and idempotence."""

    name: str
    config: str
    touched: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


# ---- Program -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A traced function: ``jaxpr`` over flat inputs, their ``roles``, and the pytree shapes.

    Call it like the traced function: ``program(params, *inputs)``.
    """

    jaxpr: jcore.ClosedJaxpr
    in_tree: Any
    out_tree: Any
    roles: tuple[Role, ...]
    name: str = "program"
    history: tuple[PassRecord, ...] = ()
    # Structured facts passes leave for later passes (e.g. fake_quant's spec per weight, read
    # by convert). Treated as immutable: passes copy it before adding to it.
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- views ------------------------------------------------------------------------
    @property
    def params(self) -> tuple[ParamRef, ...]:
        return tuple(r for r in self.roles if isinstance(r, ParamRef))

    @property
    def param_paths(self) -> tuple[str, ...]:
        return tuple(r.path for r in self.params)

    def role(self, path: str) -> Role:
        for r in self.roles:
            if r.path == path:
                return r
        raise KeyError(f"{self.name} has no input with path {path!r}")

    def replace(self, **changes: Any) -> Program:
        return dataclasses.replace(self, **changes)

    def with_record(self, record: PassRecord, **changes: Any) -> Program:
        return dataclasses.replace(self, history=(*self.history, record), **changes)

    # -- calling ----------------------------------------------------------------------
    def flat_fn(self) -> Callable[..., list[Any]]:
        """The program as a function of its flat inputs, returning flat outputs."""
        return jcore.jaxpr_as_fun(self.jaxpr)

    def __call__(self, params: Any, *inputs: Any) -> Any:
        flat = self._check_args(params, inputs)
        outs = jcore.jaxpr_as_fun(self.jaxpr)(*flat)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)

    def _check_args(self, params: Any, inputs: tuple[Any, ...]) -> list[Any]:
        flat, tree = jax.tree_util.tree_flatten((params, inputs))
        if tree != self.in_tree:
            raise ProgramCallError(
                f"{self.name} was traced with arguments structured as\n  {self.in_tree}\n"
                f"but was called with\n  {tree}\n"
                "Call it with a parameter tree and inputs of the same structure as at trace time."
            )
        for role, x, var in zip(self.roles, flat, self.jaxpr.jaxpr.invars, strict=True):
            aval = var.aval
            shape = tuple(np.shape(x))
            dtype = getattr(x, "dtype", None)
            if shape != tuple(aval.shape) or (
                dtype is not None and np.dtype(dtype) != np.dtype(aval.dtype)
            ):
                raise ProgramCallError(
                    f"{self.name}: argument {role.path} was traced as "
                    f"{describe_value(aval)} but got {describe_value(x)}. "
                    "A Program is specialized to the shapes it was traced with: trace again "
                    "with example inputs of the new shape (maas_jax.trace)."
                )
        return flat

    def __repr__(self) -> str:
        n_eqns = len(self.jaxpr.jaxpr.eqns)
        return (
            f"Program({self.name!r}, {len(self.params)} params, "
            f"{len(self.roles) - len(self.params)} other inputs, {n_eqns} top-level equations, "
            f"passes={[r.name for r in self.history]})"
        )

    def pretty(self) -> str:
        """The jaxpr as text."""
        return str(self.jaxpr)


def to_fn(program: Program) -> Callable[..., Any]:
    """A plain function with the program's calling convention (for APIs that want functions)."""

    @functools.wraps(program.__call__)
    def fn(params: Any, *inputs: Any) -> Any:
        return program(params, *inputs)

    return fn


def require_program(obj: Any, who: str) -> None:
    """Raise a TypeError that teaches unless ``obj`` is a Program (passes call this first).

    ``who`` is how the pass is written, e.g. ``"dce()"``.
    """
    if isinstance(obj, Program):
        return
    if callable(obj):
        name = getattr(obj, "__name__", None) or type(obj).__name__
        got = f"the function {name!r}"
    else:
        got = f"a {type(obj).__name__} ({obj!r:.60})"
    raise TypeError(
        f"{who} was given {got}, not a Program. Passes rewrite traced programs: trace it "
        f"first with maas_jax.trace(fn, params, *inputs), then apply the pass:\n"
        f"    program = maas_jax.trace(fn, params, *inputs)\n"
        f"    out = {who}(program)"
    )


# ---- tracing -------------------------------------------------------------------------


def _is_array_like(x: Any) -> bool:
    if isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct):
        return True
    # A Python bool is rejected: it is almost always a flag (``train``, ``deterministic``),
    # and traced it becomes an abstract array that ``if flag:`` cannot branch on.
    return isinstance(x, int | float | complex) and not isinstance(x, bool)


_LINEN_BOXES = ("Partitioned", "LogicallyPartitioned", "AxisMetadata")


def _collection(path: str, box_type: str | None, linen_variables: bool) -> str:
    """Linen: the top-level collection; NNX: the Variable type; plain pytrees: "params"."""
    if box_type is not None and box_type not in _LINEN_BOXES:
        return box_type  # NNX variable type: Param, BatchStat, ...
    if linen_variables:
        return path.split("/", 1)[0]
    return "params"


def _is_linen_variables(params: Any) -> bool:
    from collections.abc import Mapping

    return isinstance(params, Mapping) and "params" in params


def _roles_for(
    params: Any, inputs: tuple[Any, ...], fn_name: str, fn: Any = None
) -> tuple[Role, ...]:
    roles: list[Role] = []
    linen = _is_linen_variables(params)
    for leaf in flatten_leaves(params):
        _check_leaf(leaf.path, leaf.value, fn_name)
        roles.append(
            ParamRef(
                path=leaf.path,
                collection=_collection(leaf.path, leaf.box_type, linen),
                shape=tuple(np.shape(leaf.value)),
                dtype=np.dtype(jax.numpy.result_type(leaf.value)),
                logical_axes=leaf.logical_axes,
            )
        )
    for key_path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        path = "args/" + key_path_str(key_path)
        _check_leaf(path, x, fn_name, positional=_positional_index(key_path), fn=fn)
        roles.append(InputRef(path, tuple(np.shape(x)), np.dtype(jax.numpy.result_type(x))))
    return tuple(roles)


def _positional_index(key_path: tuple[Any, ...]) -> int | None:
    """The index in ``inputs`` of a leaf that *is* a positional input (not inside one)."""
    if len(key_path) == 1 and isinstance(key_path[0], jax.tree_util.SequenceKey):
        return key_path[0].idx
    return None


def _check_leaf(
    path: str, x: Any, fn_name: str, *, positional: int | None = None, fn: Any = None
) -> None:
    if _is_array_like(x):
        return
    head = f"maas_jax.trace({fn_name}): leaf {path!r} is a {type(x).__name__} ({x!r:.60}), "
    if isinstance(x, bool | str):
        if positional is not None:
            name = _param_name(fn, positional + 1) or "flag"
            where = f"positional argument {positional + 2} of {fn_name} (after params) is"
            fix = (
                "Bind it as a keyword before tracing: "
                f"maas_jax.trace(functools.partial({fn_name}, {name}={x!r}), params, ...)"
            )
        else:
            name = path.rsplit("/", 1)[-1]
            where = "a leaf like this is"
            fix = (
                "Take it out of the pytree and bind it before tracing with "
                f"functools.partial({fn_name}, ...)"
            )
        why = ""
        if isinstance(x, bool):
            why = (
                "A Program's inputs are traced to abstract arrays, so the function would not "
                f"see {x!r} and `if {name}:` would fail while tracing. "
            )
            fix += f"; if it really is data, pass an array: jnp.asarray({x!r})"
        raise TraceError(
            head + f"not an array: {where} static configuration, not an input. {why}{fix}."
        )
    raise TraceError(
        head + "not an array. Every leaf of the parameters and inputs must be an "
        "array (or a Python number / jax.ShapeDtypeStruct). Bind static configuration "
        "with functools.partial(fn, ...) before tracing."
    )


def _param_name(fn: Any, index: int) -> str | None:
    """The name of ``fn``'s ``index``-th positional parameter, if its signature says."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if index < len(params) and params[index].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return params[index].name
    return None


def trace(fn: Callable[..., Any], params: Any, *inputs: Any, name: str | None = None) -> Program:
    """Trace ``fn(params, *inputs)`` into a :class:`Program`.

    ``params`` is the parameter pytree (a Linen variables dict, an NNX ``State``, a dict of
    arrays); every leaf becomes a :class:`ParamRef` named by its path. Leaves may be
    ``jax.ShapeDtypeStruct`` to trace from shapes alone.

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}, jnp.ones(2))
    >>> [r.path for r in prog.roles]
    ['w', 'args/0']
    >>> prog({"w": jnp.ones((2, 3))}, jnp.ones(2)).tolist()
    [2.0, 2.0, 2.0]
    """
    fn_name = name or getattr(fn, "__name__", None) or type(fn).__name__
    roles = _roles_for(params, inputs, fn_name, fn)
    flat, in_tree = jax.tree_util.tree_flatten((params, inputs))

    def flat_fn(*flat_args: Any) -> Any:
        p, xs = jax.tree_util.tree_unflatten(in_tree, flat_args)
        return fn(p, *xs)

    structs = [
        x if isinstance(x, jax.ShapeDtypeStruct) else _compat.aval_struct(jax.typeof(x))
        for x in flat
    ]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*structs)
    out_tree = jax.tree_util.tree_structure(out_shape)
    # The inputs' parameter names (``input_ids`` ...), when the signature says: artifacts and the
    # server name their tensors after them.
    arg_names = tuple(_param_name(fn, i + 1) for i in range(len(inputs)))
    return Program(closed, in_tree, out_tree, roles, name=fn_name, meta={"arg_names": arg_names})


def trace_linen(
    module: Any, variables: Any, *inputs: Any, method: Any = None, **apply_kwargs: Any
) -> Program:
    """Trace a Flax Linen module: ``module.apply(variables, *inputs, **apply_kwargs)``.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import maas_jax
    >>> model = nn.Dense(3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> maas_jax.trace_linen(model, variables, jnp.ones((1, 2))).param_paths
    ('params/bias', 'params/kernel')
    """
    kwargs = dict(apply_kwargs)
    if method is not None:
        kwargs["method"] = method
    apply = functools.partial(module.apply, **kwargs) if kwargs else module.apply
    return trace(apply, variables, *inputs, name=type(module).__name__)


def trace_nnx(model: Any, *inputs: Any) -> tuple[Program, Any]:
    """Trace a Flax NNX module called as ``model(*inputs)``.

    Returns ``(program, state)``: the program is called as ``program(state, *inputs)``.
    Mutations the model makes to its own state while running (BatchNorm statistics in training
    mode) are not returned; put the model in eval mode for inference.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> prog, state = maas_jax.trace_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))
    >>> prog.param_paths
    ('bias', 'kernel')
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    def call(state: Any, *xs: Any) -> Any:
        return nnx.merge(graphdef, state)(*xs)

    return trace(call, state, *inputs, name=type(model).__name__), state
