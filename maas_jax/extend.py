"""The public API for writing passes: everything ``maas_jax.passes`` itself is built from.

A pass is any callable ``Program -> Program``. The library's passes use nothing but
``maas_jax``, this module and the other public modules (``maas_jax.runtime``, ...), so a pass
written outside the package can do whatever they do. The names, by what they are for:

**Programs** — :class:`Program` (the traced jaxpr, pytree structures, one role per input),
:class:`ParamRef` / :class:`StateRef` / :class:`InputRef` (the roles), :class:`PassRecord` (what
a pass did: ``program.with_record(record, jaxpr=...)``), :func:`require_program`.

**Rewriting** — :class:`Rewrite` describes one re-trace: ``entry=`` transforms parameters once
where they enter the program (wrapped in a marker region: a ``jit`` named ``MARKER_PREFIX``
(``"maas_"``) plus the pass name, see :func:`is_marker`, :func:`apply_marked`); ``rule=`` (a ``Rule``: ``(Site, operand values) ->
output values or None``) replaces equations of ``rule_primitives`` anywhere, regions included;
:func:`rewrite` runs it and returns the new closed jaxpr. :class:`Interpreter` is the engine
itself, for passes that drive evaluation (see ``fold_batchnorm``); :func:`materialize` turns a
value object back into an array.

**Side outputs** — a rule calls :func:`emit` to add a statistic declared as a
:class:`SideOutput`; :func:`rewrite_with_side_outputs` returns them as extra outputs, merged
across scan/while/cond/remat/jit regions (calibration observers, Wanda norms).

**Sites and provenance** — :class:`Site` (an equation with the tags of its operands — a
:class:`Tag` names the parameter a value is, seen through views — its name stack and
regions), :class:`Use` rows of :func:`consumers` (the consumer table), and
:func:`contraction_sites`. For passes that follow values themselves: :func:`walk` visits every
equation starting from :func:`initial_tags`; :func:`output_tags`, :func:`regions` (each a
:class:`Region`) and :func:`join_name_stack` are its steps. :func:`map_dims_to_param`,
:func:`map_dims_to_param_axes` and :func:`reshape_groups` map an operand's dimensions back
through views to the parameter's own.

**Selection** — one ``where=`` vocabulary: :func:`select` (first match wins, unused rules
warned) returns a :class:`Selection`; :func:`predicate` normalises one selector (regex,
:class:`Path`, :class:`Op`, callable) over :class:`ParamInfo`; :func:`param_infos`;
:func:`flatten_leaves` names the leaves of a pytree (:class:`Leaf`) as programs do.

**Liveness** — :func:`readers`, :func:`live_equations`, :func:`used_operands` (through regions).

**Jaxpr helpers** (stable across jax releases; the version knowledge stays inside maas_jax) —
:func:`region_kind` (``"jit"``, ``"scan"``, ``"while"``, ``"cond"``, ``"remat"``,
``"shard_map"``, ``"custom_jvp"``, ... or None), :func:`sub_jaxprs`, :func:`bind_eqn` /
:func:`bind_with_params` (re-bind an equation on the current trace), :func:`eqn_context`,
:func:`current_name_stack`, :func:`eqn_name_stack`, :func:`source_line`, :func:`jit_name`,
:func:`custom_call_name`, :func:`aval_struct`, :func:`is_floating`, and
``CONTRACTION_PRIMITIVES`` (the primitive names of dot_general / conv / ragged dot).

**Errors** — raise :class:`MaasError` subclasses (:class:`RewriteError`,
:class:`UnsupportedPrimitiveError`, :class:`SelectionError`; pipelines wrap failures in
:class:`PassError`), warn with :class:`UnusedRuleWarning` / :class:`OpaqueRegionWarning`.

A pass, start to finish (the same example is the "Write your own pass" guide in
``maas_jax/README.md``, run by the tests):

>>> import dataclasses
>>> import jax.numpy as jnp
>>> import maas_jax
>>> from maas_jax import extend as mx
>>> @dataclasses.dataclass(frozen=True, kw_only=True)
... class RoundWeights:
...     # Round the selected weights to ``decimals`` where they enter the program.
...
...     decimals: int = 1
...     where: object = None  # default: weights a dot_general / convolution sums over
...     name = "round_weights"
...
...     def __call__(self, program):
...         mx.require_program(program, "round_weights()")
...         chosen = mx.select(program, self.where, pass_name=self.name).paths
...         if not chosen:
...             return program  # nothing to do: the input object, unchanged
...         entry = {path: (lambda w: jnp.round(w, self.decimals)) for path in chosen}
...         new = mx.rewrite(program, mx.Rewrite(self.name, entry=entry))
...         record = mx.PassRecord(self.name, repr(self), tuple(chosen))
...         return program.with_record(record, jaxpr=new)
>>> def round_weights(*, decimals=1, where=None):
...     return RoundWeights(decimals=decimals, where=where)
>>> params = {"w": jnp.full((2, 2), 0.123), "b": jnp.zeros(2)}
>>> prog = maas_jax.trace(lambda p, x: jnp.tanh(x @ p["w"]) + p["b"], params, jnp.ones(2))
>>> [(u.primitive, u.operand) for u in mx.consumers(prog)["w"]]
[('dot_general', 1)]
>>> out = maas_jax.pipeline(round_weights(decimals=1))(prog)
>>> out.history[-1].touched  # the bias is not a weight: the default selection skips it
('w',)
>>> [round(float(v), 4) for v in out(params, jnp.ones(2))]  # tanh(0.1 + 0.1)
[0.1974, 0.1974]
>>> def hard_tanh(site, invals):  # a rule: replace each tanh with a clip
...     assert isinstance(site, mx.Site) and site.primitive == "tanh"
...     return [jnp.clip(invals[0], -1.0, 1.0)]
>>> spec = mx.Rewrite("hard_tanh", rule=hard_tanh, rule_primitives=frozenset({"tanh"}))
>>> clipped = prog.replace(jaxpr=mx.rewrite(prog, spec))
>>> [round(float(v), 4) for v in clipped(params, 3 * jnp.ones(2))]  # clip(0.738) = 0.738
[0.738, 0.738]
"""

from maas_jax._compat import (
    CONTRACTION_PRIMITIVES,
    aval_struct,
    bind_eqn,
    bind_with_params,
    current_name_stack,
    custom_call_name,
    eqn_context,
    eqn_name_stack,
    is_floating,
    jit_name,
    source_line,
    sub_jaxprs,
)
from maas_jax._compat import hop_kind as region_kind
from maas_jax._errors import (
    MaasError,
    OpaqueRegionWarning,
    PassError,
    RewriteError,
    SelectionError,
    UnsupportedPrimitiveError,
    UnusedRuleWarning,
)
from maas_jax._interpreter import (
    Interpreter,
    Rewrite,
    Rule,
    SideOutput,
    apply_marked,
    emit,
    rewrite,
    rewrite_with_side_outputs,
)
from maas_jax._liveness import live_equations, readers, used_operands
from maas_jax._paths import Leaf, flatten_leaves
from maas_jax._program import (
    InputRef,
    ParamRef,
    PassRecord,
    Program,
    StateRef,
    require_program,
)
from maas_jax._provenance import (
    MARKER_PREFIX,
    Region,
    Site,
    Tag,
    Use,
    consumers,
    contraction_sites,
    initial_tags,
    is_marker,
    join_name_stack,
    map_dims_to_param,
    map_dims_to_param_axes,
    regions,
    reshape_groups,
    walk,
)
from maas_jax._provenance import eqn_out_tags as output_tags
from maas_jax._select import (
    Op,
    ParamInfo,
    Path,
    Selection,
    param_infos,
    predicate,
    select,
)
from maas_jax._values import materialize

__all__ = [
    # programs
    "InputRef",
    "ParamRef",
    "PassRecord",
    "Program",
    "StateRef",
    "require_program",
    # rewriting
    "MARKER_PREFIX",
    "Interpreter",
    "Rewrite",
    "Rule",
    "apply_marked",
    "is_marker",
    "materialize",
    "rewrite",
    # side outputs
    "SideOutput",
    "emit",
    "rewrite_with_side_outputs",
    # sites and provenance
    "Region",
    "Site",
    "Tag",
    "Use",
    "consumers",
    "contraction_sites",
    "initial_tags",
    "join_name_stack",
    "map_dims_to_param",
    "map_dims_to_param_axes",
    "output_tags",
    "regions",
    "reshape_groups",
    "walk",
    # selection
    "Leaf",
    "Op",
    "ParamInfo",
    "Path",
    "Selection",
    "flatten_leaves",
    "param_infos",
    "predicate",
    "select",
    # liveness
    "live_equations",
    "readers",
    "used_operands",
    # jaxpr helpers
    "CONTRACTION_PRIMITIVES",
    "aval_struct",
    "bind_eqn",
    "bind_with_params",
    "current_name_stack",
    "custom_call_name",
    "eqn_context",
    "eqn_name_stack",
    "is_floating",
    "jit_name",
    "region_kind",
    "source_line",
    "sub_jaxprs",
    # errors
    "MaasError",
    "OpaqueRegionWarning",
    "PassError",
    "RewriteError",
    "SelectionError",
    "UnsupportedPrimitiveError",
    "UnusedRuleWarning",
]
