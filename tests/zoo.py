"""A zoo of small JAX / Flax models for the engine tests.

Every model is a pure function ``fn(params, *inputs)`` together with concrete ``params`` and
example ``inputs``. The zoo covers the graph shapes the optimizer must see through: Flax Linen
(plain, BatchNorm with ``batch_stats``, ``nn.scan`` + ``nn.remat`` with ``LogicallyPartitioned``
boxes, tied embeddings), Flax NNX (``nnx.State``), raw ``lax`` control flow (scan, cond,
while_loop, fori_loop), ``custom_vjp`` / ``custom_jvp``, nested ``jax.jit`` and ``shard_map``.

This module must not import ``maas_jax``: it is the independent reference the engine is
tested against.

Path convention (``param_paths`` / ``map_params``): pytree keys joined with ``'/'``; the
``.value`` attribute of Flax boxes (``nn.LogicallyPartitioned``, ``nnx.Variable``) is dropped,
so ``params/layers/q/kernel``, ``batch_stats/BatchNorm_0/mean``, ``l1/kernel``.

Weights are perturbed so that a few entries (about 5% of each matmul / conv weight) are 10x
larger than the rest: clipping weights to ``|w| <= 0.5`` changes every model's output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

__all__ = [
    "BATCH",
    "MODEL_NAMES",
    "ZooModel",
    "by_name",
    "map_params",
    "param_paths",
    "path_str",
    "traced_weight_paths",
    "zoo",
]

BATCH = 3  # leading axis of ``batch_inputs``


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    fn: Callable  # fn(params, *inputs) -> pytree of arrays; pure, traceable
    params: Any  # pytree (dict / Flax variables dict / nnx.State) of concrete float32 arrays
    inputs: tuple  # concrete example inputs
    has_while: bool = False  # reverse-mode grad impossible (while_loop): use jax.jvp
    vmappable: bool = True  # vmapping over a leading batch axis of the inputs is meaningful
    batch_inputs: tuple | None = None  # inputs with an extra leading axis of size BATCH
    weight_paths: tuple[str, ...] = ()  # params consumed by dot_general / conv_general_dilated


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------

_BOX_ATTRS = ("value", "raw_value")


def _key_str(k) -> str | None:
    """One key-path entry as a path component; ``None`` for a Flax box's value attribute."""
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in _BOX_ATTRS else k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(key_path) -> str:
    """A jax key path as a '/'-joined string, box ``.value`` entries stripped."""
    parts = (_key_str(k) for k in key_path)
    return "/".join(p for p in parts if p is not None)


def param_paths(params) -> list[str]:
    """The path of every leaf of ``params``, in ``jax.tree_util.tree_flatten`` order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def map_params(params, fn_by_path: Callable[[str, Any], Any]):
    """``params`` with each leaf replaced by ``fn_by_path(path, leaf)``; boxes are preserved."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn_by_path(path_str(kp), x), params)


# --------------------------------------------------------------------------------------
# Reference dataflow: which params reach a matmul / conv operand
# --------------------------------------------------------------------------------------

_WEIGHT_CONSUMERS = frozenset({"dot_general", "conv_general_dilated"})
# ops that only re-layout / re-type / slice a weight on its way to the consumer
_PASS_THROUGH = frozenset(
    {
        "transpose",
        "reshape",
        "convert_element_type",
        "copy",
        "copy_p",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "dynamic_slice",
        "pvary",
        "sharding_constraint",
    }
)


def _is_jaxpr(v) -> bool:
    from jax.extend.core import ClosedJaxpr, Jaxpr

    return isinstance(v, ClosedJaxpr | Jaxpr)


def _open(j):
    return getattr(j, "jaxpr", j)


def _taint_jaxpr(jaxpr, in_taints: list[frozenset], hits: set) -> list[frozenset]:
    """Propagate param-path labels through ``jaxpr``; record those reaching a consumer."""
    from jax.extend.core import Literal

    jaxpr = _open(jaxpr)
    env: dict = {}
    for v, t in zip(jaxpr.invars, in_taints, strict=True):
        env[v] = t

    def read(v):
        return frozenset() if isinstance(v, Literal) else env.get(v, frozenset())

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        outs: list[frozenset]
        if name in _WEIGHT_CONSUMERS:
            hits.update(ins[0] | ins[1])
            outs = [frozenset()] * len(eqn.outvars)
        elif name in _PASS_THROUGH:
            outs = [ins[0]] * len(eqn.outvars)
        elif name == "cond":
            outs = [frozenset()] * len(eqn.outvars)
            for br in eqn.params["branches"]:
                bo = _taint_jaxpr(br, ins[1:], hits)
                outs = [a | b for a, b in zip(outs, bo, strict=True)]
        elif name == "while":
            cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
            while True:
                _taint_jaxpr(eqn.params["cond_jaxpr"], cconsts + carry, hits)
                new = _taint_jaxpr(eqn.params["body_jaxpr"], bconsts + carry, hits)
                merged = [a | b for a, b in zip(carry, new, strict=True)]
                if merged == carry:
                    break
                carry = merged
            outs = carry
        elif name == "scan":
            nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
            consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
            while True:
                res = _taint_jaxpr(eqn.params["jaxpr"], consts + carry + xs, hits)
                merged = [a | b for a, b in zip(carry, res[:ncarry], strict=True)]
                if merged == carry:
                    break
                carry = merged
            outs = carry + res[ncarry:]
        else:
            subs = [v for v in eqn.params.values() if _is_jaxpr(v)]
            if not subs:
                outs = [frozenset()] * len(eqn.outvars)
            else:
                # call-like primitives (jit, remat, custom_jvp/vjp, shard_map): positional
                outs = [frozenset()] * len(eqn.outvars)
                for sub in subs:
                    if len(_open(sub).invars) != len(ins):
                        raise NotImplementedError(f"unhandled higher-order primitive {name}")
                    so = _taint_jaxpr(sub, ins, hits)
                    if len(so) == len(outs):
                        outs = [a | b for a, b in zip(outs, so, strict=True)]
        for v, t in zip(eqn.outvars, outs, strict=True):
            env[v] = t
    return [read(v) for v in jaxpr.outvars]


def traced_weight_paths(model: ZooModel) -> set[str]:
    """Paths of the params that reach a dot_general / conv operand in ``model``'s jaxpr.

    Follows jit / remat / custom_jvp / custom_vjp / shard_map / scan / cond / while bodies and
    layout-only ops (transpose, reshape, slices, ...), but not arithmetic or gathers.
    """
    closed = jax.make_jaxpr(model.fn)(model.params, *model.inputs)
    paths = param_paths(model.params)
    n_in = len(closed.jaxpr.invars)
    taints = [frozenset({p}) for p in paths] + [frozenset()] * (n_in - len(paths))
    hits: set = set()
    _taint_jaxpr(closed.jaxpr, taints, hits)
    return hits


# --------------------------------------------------------------------------------------
# Helpers to build concrete params
# --------------------------------------------------------------------------------------


def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in salt)])


def _normal(seed: int, name: str, shape, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(scale * _rng(seed, name).standard_normal(shape), jnp.float32)


def _tokens(seed: int, name: str, shape, vocab: int) -> jax.Array:
    return jnp.asarray(_rng(seed, name).integers(0, vocab, shape), jnp.int32)


def _init_leaf(seed: int, path: str, shape: tuple, weights: frozenset) -> jax.Array:
    """A deterministic value for the param at ``path``, chosen by its name.

    Weights are fan-in scaled normals with about 5% of the entries (at least one) multiplied
    by 10; BatchNorm stats, norm scales and biases get non-trivial values.
    """
    r = _rng(seed, path)
    n = r.standard_normal(shape)
    leaf = path.rsplit("/", 1)[-1]
    if path in weights:
        fan_in = math.prod(shape[:-1]) if len(shape) == 4 else shape[-2]  # conv: HWIO
        w = n / math.sqrt(fan_in)
        mask = r.random(shape) < 0.05
        mask.flat[0] = True
        v = np.where(mask, 10.0 * w, w)
    elif leaf == "var":
        v = 0.5 + r.random(shape)
    elif leaf == "mean":
        v = 0.5 * n
    elif leaf.startswith("scale"):
        v = 1.0 + 0.1 * n
    elif leaf.startswith("b"):  # bias, b, b1, ...
        v = 0.1 * n
    elif len(shape) >= 2:
        v = n / math.sqrt(shape[-2])
    else:
        v = 0.1 * n
    return jnp.asarray(v, jnp.float32)


def _materialize(abstract, weight_paths: tuple[str, ...], seed: int):
    """Concrete float32 params for an abstract (``eval_shape``) pytree; boxes preserved.

    Built with numpy rather than by running the models' initializers: compiling Flax
    ``init`` programs costs seconds per model on a small CPU machine.
    """
    weights = frozenset(weight_paths)
    return map_params(abstract, lambda path, x: _init_leaf(seed, path, tuple(x.shape), weights))


def _linen_params(model: nn.Module, example: jax.Array, weight_paths, seed: int):
    abstract = jax.eval_shape(model.init, jax.random.key(0), example)
    return _materialize(abstract, weight_paths, seed)


def _abstract(shapes: dict[str, tuple]) -> dict:
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def _batched_normal(seed: int, x: jax.Array) -> tuple:
    return (_normal(seed, "batch", (BATCH, *x.shape)),)


def _batched_tokens(seed: int, x: jax.Array, vocab: int) -> tuple:
    return (_tokens(seed, "batch", (BATCH, *x.shape), vocab),)


# --------------------------------------------------------------------------------------
# 1. Linen MLP
# --------------------------------------------------------------------------------------


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(8)(x)


def _linen_mlp() -> ZooModel:
    seed = 1
    model = _LinenMLP()
    wp = ("params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_2/kernel")
    x = _normal(seed, "x", (4, 16))
    return ZooModel(
        name="linen_mlp",
        fn=model.apply,
        params=_linen_params(model, x, wp, seed),
        inputs=(x,),
        batch_inputs=_batched_normal(seed, x),
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 2. Linen CNN with BatchNorm (batch_stats)
# --------------------------------------------------------------------------------------


class _LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=(2, 2))(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


def _linen_cnn_bn() -> ZooModel:
    seed = 2
    model = _LinenCNN()
    wp = ("params/Conv_0/kernel", "params/Conv_1/kernel", "params/Dense_0/kernel")
    x = _normal(seed, "x", (2, 8, 8, 3))
    return ZooModel(
        name="linen_cnn_bn",
        fn=model.apply,
        params=_linen_params(model, x, wp, seed),  # includes batch_stats mean / var
        inputs=(x,),
        batch_inputs=_batched_normal(seed, x),
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 3. Linen transformer: nn.scan(nn.remat(Block)) with LogicallyPartitioned params
# --------------------------------------------------------------------------------------

_TF_VOCAB, _TF_D, _TF_HEADS, _TF_MLP, _TF_LAYERS = 32, 16, 2, 32, 3


def _pdense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
        features,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
    )


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        b, t, d = x.shape
        dh = d // _TF_HEADS
        h = nn.LayerNorm(name="ln1")(x)
        q = _pdense(d, ("embed", "heads"), "q")(h).reshape(b, t, _TF_HEADS, dh)
        k = _pdense(d, ("embed", "heads"), "k")(h).reshape(b, t, _TF_HEADS, dh)
        v = _pdense(d, ("embed", "heads"), "v")(h).reshape(b, t, _TF_HEADS, dh)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
        att = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d)
        x = x + _pdense(d, ("heads", "embed"), "o")(o)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.gelu(_pdense(_TF_MLP, ("embed", "mlp"), "mlp_in")(h))
        x = x + _pdense(d, ("mlp", "embed"), "mlp_out")(h)
        return x, None


class _Transformer(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(_TF_VOCAB, _TF_D, name="embed")(ids)
        stack = nn.scan(
            nn.remat(_Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=_TF_LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return _pdense(_TF_VOCAB, ("embed", "vocab"), "head")(x)


def _linen_scan_remat_transformer() -> ZooModel:
    seed = 3
    model = _Transformer()
    wp = tuple(f"params/layers/{n}/kernel" for n in ("q", "k", "v", "o", "mlp_in", "mlp_out"))
    wp += ("params/head/kernel",)
    ids = _tokens(seed, "ids", (2, 6), _TF_VOCAB)
    return ZooModel(
        name="linen_scan_remat_transformer",
        fn=model.apply,
        params=_linen_params(model, ids, wp, seed),  # kernels are LogicallyPartitioned boxes
        inputs=(ids,),
        batch_inputs=_batched_tokens(seed, ids, _TF_VOCAB),
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 4. Flax NNX: Linear -> BatchNorm (eval) -> relu -> Linear -> LayerNorm
# --------------------------------------------------------------------------------------


class _NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.l1(x)))
        return self.ln(self.l2(x))


def _nnx_mlp() -> ZooModel:
    seed = 4
    abstract_model = nnx.eval_shape(lambda: _NNXMLP(nnx.Rngs(0)))
    abstract_model.eval()  # BatchNorm uses its running stats: no state mutation
    graphdef, abstract_state = nnx.split(abstract_model)
    wp = ("l1/kernel", "l2/kernel")

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    x = _normal(seed, "x", (4, 16))
    return ZooModel(
        name="nnx_mlp",
        fn=fn,
        params=_materialize(abstract_state, wp, seed),  # an nnx.State of Variables
        inputs=(x,),
        batch_inputs=_batched_normal(seed, x),
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 5. Pure lax control flow, with a while_loop
# --------------------------------------------------------------------------------------

_CF_D, _CF_L = 16, 3


def _pure_build(seed: int, shapes: dict, wp: tuple, x_shape: tuple) -> tuple:
    """Params (weights spiked), example inputs and batched inputs of a pure-function model."""
    x = _normal(seed, "x", x_shape)
    return _materialize(_abstract(shapes), wp, seed), (x,), _batched_normal(seed, x)


def _pure_control_flow_fn(p, x):
    # lax.scan closing over a weight (w1 becomes a const of the scan)
    def body1(h, _):
        return jnp.tanh(h @ p["w1"] + p["b"]), None

    h, _ = lax.scan(body1, x, None, length=2)

    # lax.scan over a stacked per-layer weight passed as xs; a cond inside whose branches
    # use different weights (alternating per layer, so both are exercised)
    def body2(h, xs):
        w, i = xs
        h = jnp.tanh(h @ w)
        h = lax.cond(i % 2 == 0, lambda h: h @ p["w2"], lambda h: jnp.sin(h @ p["w3"]), h)
        return h, jnp.sum(h, axis=-1)

    h, ys = lax.scan(body2, h, (p["w_stack"], jnp.arange(_CF_L)))

    # top-level, data-dependent cond whose branches use different weights
    h = lax.cond(
        jnp.sum(h) > 0,
        lambda h: jnp.tanh(h @ p["w2"]),
        lambda h: jnp.tanh(h @ p["w3"].T),
        h,
    )

    # while_loop with a fixed trip count, closing over w_loop
    def cond_fn(c):
        return c[0] < 3

    def body3(c):
        i, h = c
        return i + 1, jnp.tanh(h @ p["w_loop"]) + h

    _, h = lax.while_loop(cond_fn, body3, (jnp.int32(0), h))
    return {"out": h, "ys": ys}


def _pure_control_flow() -> ZooModel:
    seed = 5
    d, n_layers = _CF_D, _CF_L
    wp = ("w1", "w2", "w3", "w_loop", "w_stack")
    shapes = {n: (d, d) for n in ("w1", "w2", "w3", "w_loop")}
    shapes |= {"w_stack": (n_layers, d, d), "b": (d,)}
    params, inputs, batch = _pure_build(seed, shapes, wp, (4, d))
    return ZooModel(
        name="pure_control_flow",
        fn=_pure_control_flow_fn,
        params=params,
        inputs=inputs,
        has_while=True,
        batch_inputs=batch,
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 6. Pure scan + cond + fori_loop (no while: reverse-mode grad works)
# --------------------------------------------------------------------------------------


def _pure_scan_cond_fn(p, x):
    h = jnp.tanh(x @ p["w_in"] + p["b"])

    def body(h, w):
        return jax.nn.gelu(h @ w) + h, jnp.mean(h)

    h, ys = lax.scan(body, h, p["w_stack"])

    # fori_loop with static bounds lowers to scan; the cond inside alternates branches
    def fbody(i, h):
        return lax.cond(
            i % 2 == 0,
            lambda h: jnp.tanh(h @ p["w_even"]),
            lambda h: jnp.sin(h @ p["w_odd"]) + h,
            h,
        )

    h = lax.fori_loop(0, 3, fbody, h)
    return h @ p["w_out"], ys


def _pure_scan_cond() -> ZooModel:
    seed = 6
    d = _CF_D
    wp = ("w_even", "w_in", "w_odd", "w_out", "w_stack")
    shapes = {n: (d, d) for n in ("w_in", "w_even", "w_odd")}
    shapes |= {"w_stack": (_CF_L, d, d), "w_out": (d, 8), "b": (d,)}
    params, inputs, batch = _pure_build(seed, shapes, wp, (4, d))
    return ZooModel(
        name="pure_scan_cond",
        fn=_pure_scan_cond_fn,
        params=params,
        inputs=inputs,
        batch_inputs=batch,
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 7. Tied embeddings: Embed lookup on the way in, Embed.attend for the logits
# --------------------------------------------------------------------------------------

_TE_VOCAB, _TE_D = 24, 16


class _TiedEmbeddings(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(_TE_VOCAB, _TE_D, name="embed")
        x = embed(ids)
        x = nn.gelu(nn.Dense(_TE_D)(x))
        return embed.attend(x)


def _tied_embeddings() -> ZooModel:
    seed = 7
    model = _TiedEmbeddings()
    # the embedding is a weight: Embed.attend feeds it (transposed) to dot_general
    wp = ("params/Dense_0/kernel", "params/embed/embedding")
    ids = _tokens(seed, "ids", (2, 5), _TE_VOCAB)
    return ZooModel(
        name="tied_embeddings",
        fn=model.apply,
        params=_linen_params(model, ids, wp, seed),
        inputs=(ids,),
        batch_inputs=_batched_tokens(seed, ids, _TE_VOCAB),
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 8. custom_vjp and custom_jvp
# --------------------------------------------------------------------------------------


@jax.custom_vjp
def _tanh_matmul(x, w):
    return jnp.tanh(x @ w)


def _tanh_matmul_fwd(x, w):
    y = jnp.tanh(x @ w)
    return y, (x, w, y)


def _tanh_matmul_bwd(res, g):
    x, w, y = res
    gz = g * (1.0 - y * y)
    dx = jnp.clip(gz @ w.T, -1.0, 1.0)
    dw = jnp.clip(x.T @ gz, -1.0, 1.0)
    return dx, dw


_tanh_matmul.defvjp(_tanh_matmul_fwd, _tanh_matmul_bwd)


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _softplus(x), jax.nn.sigmoid(x) * t


def _custom_vjp_fn(p, x):
    h = _softplus(x @ p["w1"] + p["b1"])
    h = _tanh_matmul(h, p["w2"])
    return h @ p["w3"] + p["b3"]


def _custom_vjp() -> ZooModel:
    seed = 8
    wp = ("w1", "w2", "w3")
    shapes = {"w1": (16, 32), "b1": (32,), "w2": (32, 32), "w3": (32, 8), "b3": (8,)}
    params, inputs, batch = _pure_build(seed, shapes, wp, (4, 16))
    return ZooModel(
        name="custom_vjp",
        fn=_custom_vjp_fn,
        params=params,
        inputs=inputs,
        batch_inputs=batch,
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 9. Nested jax.jit (two levels, one with static_argnums)
# --------------------------------------------------------------------------------------


@jax.jit
def _nj_dense(x, w, b):
    return x @ w + b


@functools.partial(jax.jit, static_argnums=(2,))
def _nj_act(x, scale, kind: str):
    if kind == "gelu":
        return jax.nn.gelu(x) * scale
    return jax.nn.relu(x) * scale


@jax.jit
def _nj_block(x, w, b, scale):
    return _nj_act(_nj_dense(x, w, b), scale, "gelu")


def _nested_jit_fn(p, x):
    h = _nj_block(x, p["w1"], p["b1"], p["scale"])

    @jax.jit
    def head(h):  # closes over params: they become arguments of the inner jit
        h = _nj_act(_nj_dense(h, p["w2"], p["b2"]), p["scale"], "relu")
        return _nj_dense(h, p["w3"], p["b3"])

    return head(h)


def _nested_jit() -> ZooModel:
    seed = 9
    wp = ("w1", "w2", "w3")
    shapes = {"w1": (16, 32), "b1": (32,), "w2": (32, 32), "b2": (32,), "w3": (32, 8)}
    shapes |= {"b3": (8,), "scale": (32,)}
    params, inputs, batch = _pure_build(seed, shapes, wp, (4, 16))
    return ZooModel(
        name="nested_jit",
        fn=_nested_jit_fn,
        params=params,
        inputs=inputs,
        batch_inputs=batch,
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------
# 10. shard_map over 8 (fake CPU) devices
# --------------------------------------------------------------------------------------


def _shard_map_8dev() -> ZooModel:
    seed = 10
    # Auto axis types: Explicit (the default since jax 0.9) changes how shardings propagate.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(w1, b1, w2, x):
        h = jnp.tanh(x @ w1 + b1)  # x: this device's rows
        g = lax.pmean(jnp.mean(h, axis=0, keepdims=True), "data")  # replicated
        out = h @ w2 + g
        total = lax.psum(jnp.sum(out * out), "data")
        return out, total

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data")),
        out_specs=(P("data"), P()),
    )

    def fn(p, x):
        return smap(p["w1"], p["b1"], p["w2"], x)

    wp = ("w1", "w2")
    shapes = {"w1": (16, 16), "b1": (16,), "w2": (16, 16)}
    params, inputs, _ = _pure_build(seed, shapes, wp, (8, 16))
    return ZooModel(
        name="shard_map_8dev",
        fn=fn,
        params=params,
        inputs=inputs,
        vmappable=False,
        weight_paths=wp,
    )


# --------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "linen_mlp": _linen_mlp,
    "linen_cnn_bn": _linen_cnn_bn,
    "linen_scan_remat_transformer": _linen_scan_remat_transformer,
    "nnx_mlp": _nnx_mlp,
    "pure_control_flow": _pure_control_flow,
    "pure_scan_cond": _pure_scan_cond,
    "tied_embeddings": _tied_embeddings,
    "custom_vjp": _custom_vjp,
    "nested_jit": _nested_jit,
    "shard_map_8dev": _shard_map_8dev,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)  # usable at collection time (parametrize)


@functools.cache
def by_name(name: str) -> ZooModel:
    """One zoo model, built on first request (deterministic) and cached."""
    if name not in _BUILDERS:
        raise KeyError(f"no zoo model named {name!r}; have {list(MODEL_NAMES)}")
    return _BUILDERS[name]()


def zoo() -> list[ZooModel]:
    """Every zoo model, in ``MODEL_NAMES`` order."""
    return [by_name(n) for n in MODEL_NAMES]
