"""Recipe files: a pipeline of passes written down as TOML, read back as the same pipeline.

A recipe is what a user writes instead of Python to say how to optimize a model
(``maas-jax optimize --recipe FILE``), and what checkpoints and artifacts record about how they
were made. The format::

    version = 1                      # the recipe format, required
    name = "minilm-w8a8"             # optional, free text
    description = "int8 weights and activations"

    [[pass]]                         # the passes, in order
    name = "fake_quant"
    [[pass.rules]]                   # first matching rule wins
    where = "_embeddings/embedding$"
    weight = "int8"
    [[pass.rules]]
    weight = "int8"
    act = "int8"

    [[pass]]
    name = "convert"

Every public pass of :mod:`maas_jax.passes` whose arguments are configuration can be written:
``clip_weights``, ``dce``, ``fold_batchnorm``, ``fake_quant`` (with its rules, and the
calibrated static activation ranges once :func:`maas_jax.passes.calibrate` has filled them),
``convert``, ``prune`` (rate, threshold, N:M, block and random masks computed in the graph),
``shard`` (the mesh as its axis names and sizes, rebuilt over ``jax.devices()`` when read) and
nested ``pipeline``. A field left out takes the pass's default, so files stay short. What is
*data* rather than configuration cannot be a recipe and is refused with a :class:`RecipeError`
naming the pass: precomputed pruning masks (``prune(masks=...)``, ``.bake(params)``), a
``prune_channels`` plan, a callable ``where=``, a user-defined pass.

A ``where`` selector is a path regex (``"dense/kernel$"``), a table ``{op = "dot_general",
name_stack = "attention"}`` (:class:`maas_jax.Op`) or ``{path = "bias$"}``
(:class:`maas_jax.Path`), or a list of these. TOML has no null: a ``shard`` partition-spec
dimension that is not split, a logical axis mapped to no mesh axis and ``batch_axis=None`` are
written ``false``.

Files are checked against :func:`schema` (a JSON Schema, checked with ``jsonschema``) before
anything is built, so an unknown key or a value of the wrong type is a :class:`RecipeError`
with the key's path (``pass[0].rules[1]: unknown key 'wieght'``); the passes' own argument
checks run next and their errors get the same path.

>>> import maas_jax
>>> from maas_jax import passes, recipe
>>> p = maas_jax.pipeline(passes.fake_quant("int8", act="int8"), passes.convert())
>>> text = recipe.dumps(p)
>>> print(text)
version = 1
<BLANKLINE>
[[pass]]
name = "fake_quant"
<BLANKLINE>
[[pass.rules]]
weight = "int8"
act = "int8"
<BLANKLINE>
[[pass]]
name = "convert"
<BLANKLINE>
>>> recipe.loads(text) == p
True
>>> recipe.loads('version = 1\\n[[pass]]\\nname = "dce"\\nkeep = 1\\n')
Traceback (most recent call last):
...
maas_jax.recipe.RecipeError: recipe: pass[0]: unknown key 'keep' (dce takes no arguments)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from maas_jax._errors import MaasError
from maas_jax._pipeline import Pipeline

FORMAT_VERSION = 1


class RecipeError(MaasError, ValueError):
    """A recipe file or dict is malformed, or a pipeline holds something a recipe cannot say."""


# --- the JSON Schema ------------------------------------------------------------------------

_REGEX = {"type": "string", "description": "a regex searched in the parameter path"}
_WHERE_ONE = {
    "oneOf": [
        _REGEX,
        {
            "type": "object",
            "description": "maas_jax.Op: select by the consuming primitive / name stack",
            "properties": {
                "op": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    ]
                },
                "name_stack": {"type": "string"},
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "description": "maas_jax.Path: any parameter whose path matches",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
            "additionalProperties": False,
        },
    ]
}
_WHERE = {"oneOf": [_WHERE_ONE, {"type": "array", "items": _WHERE_ONE, "minItems": 1}]}
_AXIS = {"oneOf": [{"type": "string"}, {"const": False}]}
_DIM = {
    "oneOf": [
        {"type": "string"},
        {"const": False},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ]
}
_SPEC_RULES = {
    "type": "array",
    "items": {
        "type": "array",
        "prefixItems": [_REGEX, {"type": "array", "items": _DIM}],
        "minItems": 2,
        "maxItems": 2,
    },
}
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}

_RULE_PROPERTIES = {
    "where": _WHERE,
    "weight": _STR,
    "act": _STR,
    "granularity": {"enum": ["per_channel", "per_tensor"]},
    "tile_size": {"type": "integer", "minimum": 1},
    "symmetric": _BOOL,
    "act_symmetric": _BOOL,
    "act_mode": {"enum": ["dynamic", "static"]},
    "calibration": _STR,
    "percentile": _NUMBER,
    "channel_axes": {"type": "array", "items": _INT},
}

# Each pass: its schema properties (besides ``name``) and the required ones.
_PASS_PROPERTIES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "clip_weights": (
        {"max_abs": _NUMBER, "where": _WHERE, "allow_opaque": _BOOL},
        ("max_abs",),
    ),
    "dce": ({}, ()),
    "fold_batchnorm": ({"into": {"enum": ["kernel", "output"]}}, ()),
    "fake_quant": (
        {
            "rules": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": _RULE_PROPERTIES,
                    "additionalProperties": False,
                },
            },
            "inline_custom": _BOOL,
            "act_scales": {
                "type": "array",
                "description": "calibrated static ranges: [site, absmax] pairs",
                "items": {
                    "type": "array",
                    "prefixItems": [_INT, _NUMBER],
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "dynamic_sites": {"type": "array", "items": _INT},
        },
        ("rules",),
    ),
    "convert": ({"pack": _BOOL}, ()),
    "prune": (
        {
            "method": {"enum": ["magnitude", "random", "nm", "block"]},
            "sparsity": _NUMBER,
            "threshold": _NUMBER,
            "n": _INT,
            "m": _INT,
            "block": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2},
            "seed": _INT,
            "where": _WHERE,
            "allow_opaque": _BOOL,
        },
        (),
    ),
    "shard": (
        {
            "mesh": {
                "type": "object",
                "description": "axis names and sizes; rebuilt over jax.devices() when read",
                "properties": {
                    "axes": {"type": "array", "items": _STR, "minItems": 1},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                },
                "required": ["axes", "shape"],
                "additionalProperties": False,
            },
            "preset": _STR,
            "rules": _SPEC_RULES,
            "logical_rules": {
                "type": "array",
                "items": {
                    "type": "array",
                    "prefixItems": [_STR, _AXIS],
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "activations": _SPEC_RULES,
            "batch_axis": _AXIS,
            "data_axis": _STR,
            "model_axis": _STR,
        },
        ("mesh",),
    ),
    "pipeline": (
        {
            "pass": {"type": "array", "items": {"$ref": "#/$defs/pass"}},
            "verify": _BOOL,
        },
        ("pass",),
    ),
}


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe's dict form, as a new dict.

    >>> sorted(schema()["properties"])
    ['description', 'name', 'pass', 'verify', 'version']
    """
    branches = []
    for name, (props, required) in _all_pass_properties().items():
        branches.append(
            {
                "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
                "then": {
                    "properties": {"name": {"const": name}, **props},
                    "required": ["name", *required],
                    "additionalProperties": False,
                },
            }
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://maas-jax.dev/schemas/recipe-v1.json",
        "title": "maas_jax recipe",
        "type": "object",
        "properties": {
            "version": {"const": FORMAT_VERSION},
            "name": _STR,
            "description": _STR,
            "verify": _BOOL,
            "pass": {"type": "array", "items": {"$ref": "#/$defs/pass"}},
        },
        "required": ["version", "pass"],
        "additionalProperties": False,
        "$defs": {
            "pass": {
                "type": "object",
                "properties": {"name": {"enum": list(_all_pass_properties())}},
                "required": ["name"],
                "allOf": branches,
            }
        },
    }


def _key_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _validate(doc: Any, source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: (len(e.absolute_path), e.path))
    if not errors:
        return
    # The deepest error is the most specific one (an ``if/then`` branch reports at the pass).
    # An unknown key explains a missing one (a misspelling), so it is reported first.
    err = max(
        errors,
        key=lambda e: (
            len(e.absolute_path),
            e.validator != "required",
            e.validator == "additionalProperties",
        ),
    )
    err = _most_specific(err)
    where = _key_path(err.absolute_path) or "top level"
    raise RecipeError(f"{source}: {where}: {_describe(err, doc)}")


def _most_specific(err: Any) -> Any:
    # ``oneOf`` failures carry one sub-error per branch: report the branch that got furthest.
    while err.context:
        err = max(err.context, key=lambda e: len(e.absolute_path))
    return err


def _describe(err: Any, doc: Any) -> str:
    if err.validator == "additionalProperties":
        instance = err.instance
        allowed = set(err.schema.get("properties", {}))
        unknown = sorted(k for k in instance if k not in allowed)
        what = instance.get("name") if isinstance(instance, dict) else None
        if what in _all_pass_properties() and not (allowed - {"name"}):
            hint = f"{what} takes no arguments"
        else:
            hint = "allowed: " + ", ".join(sorted(allowed))
        keys = ", ".join(repr(k) for k in unknown)
        return f"unknown key{'s' if len(unknown) > 1 else ''} {keys} ({hint})"
    if err.validator == "required":
        return err.message.replace("is a required property", "is required")
    if err.validator in ("enum", "const") and err.absolute_path and err.absolute_path[-1] == "name":
        known = ", ".join(_all_pass_properties())
        return f"unknown pass {err.instance!r}; recipe passes: {known}"
    if err.validator == "const" and list(err.absolute_path) == ["version"]:
        return f"recipe format version {err.instance!r}; this maas_jax reads version 1"
    return err.message


# --- pass <-> dict --------------------------------------------------------------------------


def _where_to_doc(where: Any, what: str) -> Any:
    from maas_jax._select import Op, Path

    if isinstance(where, str):
        return where
    if isinstance(where, Op):
        out: dict[str, Any] = {}
        if where.primitive is not None:
            prim = where.primitive
            out["op"] = prim if isinstance(prim, str) else list(prim)
        if where.name_stack is not None:
            out["name_stack"] = where.name_stack
        return out
    if isinstance(where, Path):
        return {"path": where.pattern}
    if isinstance(where, list | tuple):
        return [_where_to_doc(w, what) for w in where]
    kind = "a callable" if callable(where) else f"a {type(where).__name__}"
    raise RecipeError(
        f"{what}: where={where!r} is {kind}; a recipe file can hold path regexes, "
        "maas_jax.Op(...) and maas_jax.Path(...) selectors (or a list of them), not code. "
        "Express the selection as a regex, or build this pipeline in Python."
    )


def _where_from_doc(doc: Any) -> Any:
    from maas_jax._select import Op, Path

    if isinstance(doc, list):
        return tuple(_where_from_doc(d) for d in doc)
    if isinstance(doc, dict):
        if "path" in doc:
            return Path(doc["path"])
        op = doc.get("op")
        return Op(tuple(op) if isinstance(op, list) else op, name_stack=doc.get("name_stack"))
    return doc


def _none_to_false(x: Any) -> Any:
    return False if x is None else x


def _false_to_none(x: Any) -> Any:
    return None if x is False else x


def _spec_to_doc(spec: Any) -> list[Any]:
    return [
        list(d) if isinstance(d, tuple) else _none_to_false(d)
        for d in (spec if isinstance(spec, tuple | list) else tuple(spec))
    ]


def _spec_from_doc(doc: list[Any]) -> tuple[Any, ...]:
    return tuple(tuple(d) if isinstance(d, list) else _false_to_none(d) for d in doc)


def _fields_to_doc(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass fields of ``obj`` that differ from their defaults (TOML has no null, and
    a short file is a readable one)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        out[f.name] = value
    return out


def _rule_to_doc(rule: Any, what: str) -> dict[str, Any]:
    rest = _fields_to_doc(rule)
    doc: dict[str, Any] = {}
    if "where" in rest:
        doc["where"] = _where_to_doc(rest.pop("where"), what)
    # ``weight`` is always written: a reader should not need to know that the default is int8.
    doc["weight"] = rest.pop("weight", rule.weight)
    if "channel_axes" in rest:
        rest["channel_axes"] = list(rest["channel_axes"])
    return doc | rest


def _pass_to_doc(p: Any, index: str) -> dict[str, Any]:
    from maas_jax import passes

    what = f"{index} ({getattr(p, 'name', type(p).__name__)})"
    if isinstance(p, Pipeline):
        doc: dict[str, Any] = {"name": "pipeline"}
        doc["pass"] = [_pass_to_doc(q, f"{index}.pass[{k}]") for k, q in enumerate(p.passes)]
        if not p.verify:
            doc["verify"] = False
        return doc
    if isinstance(p, passes.DCE):
        return {"name": "dce"}
    if isinstance(p, passes.Convert | passes.FoldBatchNorm):
        return {"name": p.name, **_fields_to_doc(p)}
    if isinstance(p, passes.ClipWeights):
        doc = {"name": "clip_weights", **_fields_to_doc(p)}
        doc["max_abs"] = p.max_abs
        if "where" in doc:
            doc["where"] = _where_to_doc(doc["where"], what)
        return doc
    if isinstance(p, passes.FakeQuant):
        doc = {"name": "fake_quant"}
        doc["rules"] = [_rule_to_doc(r, f"{what}.rules[{k}]") for k, r in enumerate(p.rules)]
        if p.inline_custom:
            doc["inline_custom"] = True
        if p.act_scales is not None:
            doc["act_scales"] = [[int(s), float(v)] for s, v in p.act_scales]
        if p.dynamic_sites:
            doc["dynamic_sites"] = [int(s) for s in p.dynamic_sites]
        return doc
    if isinstance(p, passes.Prune):
        if p.masks is not None or p.baked is not None:
            raise RecipeError(
                f"{what}: this prune pass carries precomputed masks (prune(masks=...) or "
                ".bake(params)); masks are data, not configuration. Write the recipe with the "
                "rule that makes them (e.g. prune(sparsity=0.5)) and save the masks or the "
                "pruned parameters with maas_jax.checkpoint."
            )
        doc = {"name": "prune", **_fields_to_doc(p, skip=("masks", "baked"))}
        if "block" in doc:
            doc["block"] = list(doc["block"])
        if "where" in doc:
            doc["where"] = _where_to_doc(doc["where"], what)
        return doc
    if isinstance(p, passes.Shard):
        shape = [int(s) for s in p.mesh.devices.shape]
        doc = {"name": "shard", "mesh": {"axes": list(p.mesh.axis_names), "shape": shape}}
        rest = _fields_to_doc(p, skip=("mesh",))
        for key in ("rules", "activations"):
            if key in rest:
                rest[key] = [[rx, _spec_to_doc(spec)] for rx, spec in rest[key]]
        if "logical_rules" in rest:
            rest["logical_rules"] = [[n, _none_to_false(a)] for n, a in rest["logical_rules"]]
        if "batch_axis" in rest:
            rest["batch_axis"] = _none_to_false(rest["batch_axis"])
        return doc | rest
    if isinstance(p, passes.PruneChannels):
        raise RecipeError(
            f"{what}: prune_channels carries a channel plan computed from the parameters "
            "(which channels to keep); that is data, not configuration. Save the pruned "
            "parameters with maas_jax.checkpoint and write the remaining passes as a recipe."
        )
    for name, cls in _REGISTERED.items():
        if type(p) is cls:
            doc = {"name": name}
            for key, value in _fields_to_doc(p).items():
                doc[key] = (
                    _where_to_doc(value, what) if key == "where" else _plain_to_doc(value, what)
                )
            return doc
    raise RecipeError(
        f"{what}: {p!r} is not one of maas_jax's passes ({', '.join(_PASS_PROPERTIES)}) nor "
        "a pass registered with maas_jax.recipe.register_pass; a recipe file names passes and "
        "their arguments, not code."
    )


def _mesh_from_doc(doc: dict[str, Any], what: str) -> Any:
    import math

    import jax
    import numpy as np
    from jax.sharding import Mesh

    axes, shape = tuple(doc["axes"]), tuple(doc["shape"])
    if len(axes) != len(shape):
        raise RecipeError(f"{what}.mesh: {len(axes)} axis names but {len(shape)} sizes")
    n = math.prod(shape)
    devices = jax.devices()
    if len(devices) < n:
        raise RecipeError(
            f"{what}.mesh: the recipe's mesh {dict(zip(axes, shape, strict=True))} needs {n} "
            f"devices and this process sees {len(devices)} ({devices[0].platform}). On a CPU, "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} (or "
            f"jax.config.update('jax_num_cpu_devices', {n})) before jax starts."
        )
    return Mesh(np.asarray(devices[:n]).reshape(shape), axes)


def _pass_from_doc(doc: dict[str, Any], what: str) -> Any:
    import maas_jax
    from maas_jax import passes

    name = doc["name"]
    args = {k: v for k, v in doc.items() if k != "name"}
    try:
        if name == "pipeline":
            inner = [_pass_from_doc(d, f"{what}.pass[{k}]") for k, d in enumerate(args.pop("pass"))]
            return maas_jax.pipeline(*inner, verify=args.get("verify", True))
        if name == "dce":
            return passes.dce()
        if name == "convert":
            return passes.convert(**args)
        if name == "fold_batchnorm":
            return passes.fold_batchnorm(**args)
        if name == "clip_weights":
            if "where" in args:
                args["where"] = _where_from_doc(args["where"])
            return passes.clip_weights(**args)
        if name == "fake_quant":
            rules = []
            for k, r in enumerate(args["rules"]):
                r = dict(r)
                if "where" in r:
                    r["where"] = _where_from_doc(r["where"])
                try:
                    rules.append(passes.QuantRule(**r))
                except (TypeError, ValueError, MaasError) as e:
                    raise RecipeError(f"{what}.rules[{k}]: {e}") from e
            act_scales = args.get("act_scales")
            return passes.FakeQuant(
                tuple(rules),
                inline_custom=args.get("inline_custom", False),
                act_scales=None
                if act_scales is None
                else tuple((int(s), float(v)) for s, v in act_scales),
                dynamic_sites=tuple(args.get("dynamic_sites", ())),
            )
        if name == "prune":
            if "where" in args:
                args["where"] = _where_from_doc(args["where"])
            if "block" in args:
                args["block"] = tuple(args["block"])
            method = args.pop("method", "magnitude")
            return passes.prune(method, **args)
        if name == "shard":
            mesh = _mesh_from_doc(args.pop("mesh"), what)
            for key in ("rules", "activations"):
                if key in args:
                    args[key] = tuple((rx, _spec_from_doc(spec)) for rx, spec in args[key])
            if "logical_rules" in args:
                args["logical_rules"] = tuple(
                    (n, _false_to_none(a)) for n, a in args["logical_rules"]
                )
            if "batch_axis" in args:
                args["batch_axis"] = _false_to_none(args["batch_axis"])
            return passes.shard(mesh, **args)
        if name in _REGISTERED:
            for key, value in list(args.items()):
                args[key] = _where_from_doc(value) if key == "where" else _plain_from_doc(value)
            return _REGISTERED[name](**args)
    except RecipeError:
        raise
    except (TypeError, ValueError, MaasError) as e:
        raise RecipeError(f"{what} ({name}): {e}") from e
    raise AssertionError(f"schema admitted an unknown pass {name!r}")  # pragma: no cover


# --- passes defined outside maas_jax ------------------------------------------------------

_REGISTERED: dict[str, type] = {}


def register_pass(cls: type | None = None, *, name: str | None = None) -> Any:
    """Let recipe files hold a pass of your own (a frozen dataclass of plain arguments).

    Its fields are written as they are (numbers, strings, bools, lists; a field named
    ``where`` as a selector) and read back by calling the class with them. Use as a decorator.

    >>> import dataclasses
    >>> from maas_jax import recipe
    >>> @recipe.register_pass
    ... @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class RoundWeights:
    ...     decimals: int = 1
    ...     name = "round_weights"
    ...     def __call__(self, program):
    ...         return program
    >>> recipe.dumps(RoundWeights(decimals=2)).splitlines()[-2:]
    ['name = "round_weights"', 'decimals = 2']
    >>> recipe.loads(recipe.dumps(RoundWeights(decimals=2))).passes[0]
    RoundWeights(decimals=2)
    """

    def register(c: type) -> type:
        if not dataclasses.is_dataclass(c):
            raise TypeError(f"register_pass: {c.__name__} is not a dataclass")
        n = name or getattr(c, "name", None)
        if not isinstance(n, str) or not n:
            raise TypeError(f"register_pass: give {c.__name__} a `name` (class attribute)")
        if n in _PASS_PROPERTIES:
            raise ValueError(f"register_pass: {n!r} is a built-in pass name")
        if _REGISTERED.get(n, c) is not c:
            raise ValueError(f"register_pass: {n!r} is already registered to another class")
        _REGISTERED[n] = c
        return c

    return register if cls is None else register(cls)


def _all_pass_properties() -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    out = dict(_PASS_PROPERTIES)
    for n, c in _REGISTERED.items():
        fields = [f for f in dataclasses.fields(c) if f.init]
        required = tuple(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        out[n] = ({f.name: (_WHERE if f.name == "where" else {}) for f in fields}, required)
    return out


def _plain_to_doc(value: Any, what: str) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain_to_doc(v, what) for v in value]
    raise RecipeError(
        f"{what}: {value!r} ({type(value).__name__}) cannot be written to a recipe file; a "
        "registered pass's fields must be numbers, strings, bools or lists of them"
    )


def _plain_from_doc(value: Any) -> Any:
    return tuple(_plain_from_doc(v) for v in value) if isinstance(value, list) else value


# --- TOML text -----------------------------------------------------------------------------
# The standard library reads TOML (``tomllib``) but does not write it. A recipe is a small,
# fixed shape (scalars, arrays, inline tables, and the ``pass`` / ``rules`` arrays of tables),
# so it is written here, with the arrays of tables as ``[[pass]]`` sections a person can edit;
# the tests read every written file back with ``tomllib``.

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SECTIONS = ("pass", "rules")  # the keys written as [[arrays of tables]]


def _toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest text that reads back as the same double
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are TOML's too
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise RecipeError(f"recipe: cannot write {value!r} ({type(value).__name__}) as TOML")


def _is_section(key: str, value: Any) -> bool:
    return key in _SECTIONS and isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _toml_table(prefix: str, table: dict[str, Any], lines: list[str]) -> None:
    for key, value in table.items():
        if not _is_section(key, value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if _is_section(key, value):
            header = f"{prefix}.{key}" if prefix else key
            for item in value:
                lines.extend(["", f"[[{header}]]"])
                _toml_table(header, item, lines)


def _toml_document(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    _toml_table("", doc, lines)
    return "\n".join(lines) + "\n"


# --- public API -----------------------------------------------------------------------------


def to_dict(recipe: Any, *, name: str | None = None, description: str | None = None) -> dict:
    """The recipe dict (JSON- and TOML-ready) of a pipeline or a single pass.

    >>> from maas_jax import passes
    >>> to_dict(passes.clip_weights(3.0))
    {'version': 1, 'pass': [{'name': 'clip_weights', 'max_abs': 3.0}]}

    Raises:
      RecipeError: the pipeline holds something a recipe cannot express (a user pass, a
        callable selector, precomputed masks); the message names the pass by its index.
    """
    doc: dict[str, Any] = {"version": FORMAT_VERSION}
    if name is not None:
        doc["name"] = name
    if description is not None:
        doc["description"] = description
    if isinstance(recipe, Pipeline):
        steps = recipe.passes
        if not recipe.verify:
            doc["verify"] = False
    else:
        steps = (recipe,)
    doc["pass"] = [_pass_to_doc(p, f"pass[{k}]") for k, p in enumerate(steps)]
    return doc


def from_dict(doc: Mapping[str, Any], *, source: str = "recipe") -> Pipeline:
    """The pipeline a recipe dict describes (validated against :func:`schema` first).

    >>> from_dict({"version": 1, "pass": [{"name": "dce"}]})
    pipeline(dce())
    """
    if not isinstance(doc, Mapping):
        raise RecipeError(f"{source}: a recipe is a table/dict, got {type(doc).__name__}")
    doc = dict(doc)
    _validate(doc, source)
    steps = [_pass_from_doc(d, f"{source}: pass[{k}]") for k, d in enumerate(doc["pass"])]
    import maas_jax

    return maas_jax.pipeline(*steps, verify=doc.get("verify", True))


def dumps(recipe: Any, *, name: str | None = None, description: str | None = None) -> str:
    """The recipe as TOML text (see the module docstring for the format)."""
    return _toml_document(to_dict(recipe, name=name, description=description))


def loads(text: str, *, source: str = "recipe") -> Pipeline:
    """The pipeline a TOML recipe text describes."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    return from_dict(doc, source=source)


def dump(
    recipe: Any,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
) -> str:
    """Write the recipe to ``path`` (TOML); returns the path. The text is built before the file
    is opened, so a pipeline that cannot be written leaves no half-written file behind."""
    text = dumps(recipe, name=name, description=description)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return os.fspath(path)


def load(path: Any) -> Pipeline:
    """The pipeline in the recipe file at ``path`` (a path or an ``importlib.resources``
    traversable, such as a recipe bundled in ``maas_jax.recipes``)."""
    source = os.fspath(path) if isinstance(path, str | os.PathLike) else str(path)
    try:
        if isinstance(path, str | os.PathLike):
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {source} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {source} cannot be read: {e}") from None
    return loads(text, source=source)


__all__ = [
    "FORMAT_VERSION",
    "RecipeError",
    "register_pass",
    "dump",
    "dumps",
    "from_dict",
    "load",
    "loads",
    "schema",
    "to_dict",
]
