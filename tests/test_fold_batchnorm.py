"""fold_batchnorm: exact against the models themselves, structure, no-ops, and w8a8 after it.

References are the models (Linen ``apply``, the NNX module, plain functions), never the pass's
own arithmetic; the structural checks use their own small dataflow analysis.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore
from maas_jax.passes.fold_batchnorm import FoldBatchNorm, fold_batchnorm
from zoo import by_name

import maas_jax
from maas_jax import passes
from maas_jax.models import digits

MODES = ("kernel", "output")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def _activation_eqns(program):
    """Top-level equations with an operand computed from the program's data inputs."""
    jaxpr = program.jaxpr.jaxpr
    act = {
        v
        for v, r in zip(jaxpr.invars, program.roles, strict=True)
        if isinstance(r, maas_jax.InputRef)
    }
    out = []
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jcore.Literal) and v in act for v in eqn.invars):
            out.append(eqn)
            act.update(eqn.outvars)
    return out


def _count(eqns, name):
    return sum(e.primitive.name == name for e in eqns)


def _randomize(tree, seed, positive=()):
    """Non-trivial values for every leaf; paths containing a ``positive`` word stay > 0."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        v = rng.normal(size=np.shape(x)).astype(np.float32)
        if any(p in name for p in positive):
            v = np.abs(v) + 0.1
        out.append(jnp.asarray(v))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---- models ------------------------------------------------------------------------------


class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)  # with a bias: the chain starts `add y bias`
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3, use_bias=False)(nn.relu(x))


class ConvNet(nn.Module):
    """Conv(bias) -> BN -> depthwise conv -> BN -> Dense -> BN, and a BN right on the input."""

    train: bool = False

    @nn.compact
    def __call__(self, x):
        bn = lambda: nn.BatchNorm(use_running_average=not self.train)  # noqa: E731
        x = bn()(x)  # on the input: no contraction to fold into
        x = nn.relu(bn()(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(bn()(nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False)(x)))
        x = x.reshape(x.shape[0], -1)
        return bn()(nn.Dense(5)(x))


def _linen(module, x_shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), x_shape)
    variables = module.init(jax.random.key(1), x)
    variables = {
        "params": _randomize(variables["params"], seed + 2, positive=("scale",)),
        "batch_stats": _randomize(variables["batch_stats"], seed + 3, positive=("var",)),
    }
    return variables, x


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.conv = nnx.Conv(6, 5, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        h = self.bn(self.lin(x))  # [b, 6]
        h = jnp.tile(h[:, None, None, :], (1, 4, 4, 1))
        return self.bn2(self.conv(h))


def _nnx_model(seed=0):
    model = NNXNet(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for bn in (model.bn, model.bn2):
        n = bn.mean[...].shape
        bn.mean[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
        bn.var[...] = jnp.asarray(np.abs(rng.normal(size=n)) + 0.1, jnp.float32)
        bn.scale[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
    model.eval()
    return model, jax.random.normal(jax.random.key(seed), (3, 4))


@pytest.fixture(scope="module")
def cnn_bn():
    model, variables, data = digits.pretrained("cnn_bn")
    x_test = data[2]
    prog = maas_jax.trace(digits.make_apply(model), variables, jnp.asarray(x_test))
    return model, variables, data, prog


# ---- (a) exact against the models --------------------------------------------------------


@pytest.mark.parametrize("into", MODES)
def test_digits_cnn_folded_equals_model(cnn_bn, into):
    model, variables, (_, _, x_test, _), prog = cnn_bn
    out = fold_batchnorm(into)(prog)
    _close(out(variables, x_test), digits.make_apply(model)(variables, x_test))
    assert out.history[-1].touched == ("params/conv0/kernel", "params/conv1/kernel")


@pytest.mark.parametrize("into", MODES)
def test_linen_dense_and_conv_bn_equal_model(into):
    for module, shape, n_folded in ((DenseBN(), (5, 4), 1), (ConvNet(), (2, 6, 6, 3), 3)):
        variables, x = _linen(module, shape)
        prog = maas_jax.trace_linen(module, variables, x)
        out = fold_batchnorm(into)(prog)
        assert len(out.history[-1].notes) == n_folded
        _close(out(variables, x), module.apply(variables, x))
        _close(jax.jit(out)(variables, x), module.apply(variables, x))


@pytest.mark.parametrize("into", MODES)
def test_nnx_linear_and_conv_bn_equal_model(into):
    model, x = _nnx_model()
    prog, state = maas_jax.trace_nnx(model, x)
    out = fold_batchnorm(into)(prog)
    assert out.history[-1].touched == ("lin/kernel", "conv/kernel")
    _close(out(state, x), model(x))


@pytest.mark.parametrize("into", MODES)
def test_gradients_match_the_model(into):
    # The fold is computed in the graph from the parameters: gradients reach every parameter,
    # the BatchNorm statistics and scale included.
    module = DenseBN()
    variables, x = _linen(module, (5, 4))
    out = fold_batchnorm(into)(maas_jax.trace_linen(module, variables, x))
    got = jax.grad(lambda v: out(v, x).sum())(variables)
    want = jax.grad(lambda v: module.apply(v, x).sum())(variables)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("name", ["linen_cnn_bn", "nnx_mlp", "linen_scan_remat_transformer"])
def test_zoo_models(name):
    m = by_name(name)
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    out = maas_jax.pipeline(fold_batchnorm())(prog)  # type-checks, same signature
    assert (out is prog) == (name == "linen_scan_remat_transformer")  # its norms are LayerNorms
    jax.tree.map(_close, out(m.params, *m.inputs), m.fn(m.params, *m.inputs))
    assert fold_batchnorm()(out) is out


def test_general_affine_chains_and_shared_kernel():
    # c - y, division, a literal factor, and a kernel with a second, unnormalized use.
    def fn(p, x):
        y = x @ p["w"]
        z = (p["c"] - y) / p["d"] * 2.0 + p["e"]
        return z, x @ p["w"]

    rng = np.random.default_rng(0)
    p = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32)
        for k, s in (("w", (4, 3)), ("c", (3,)), ("d", (1, 3)), ("e", ()))
    }
    p["d"] = jnp.abs(p["d"]) + 0.5
    x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    prog = maas_jax.trace(fn, p, x)
    out = fold_batchnorm()(prog)
    assert out.history[-1].notes == ("w: dot_general at <root> + [rsub div mul add]",)
    for got, want in zip(out(p, x), fn(p, x), strict=True):
        _close(got, want)
    uses = maas_jax.consumers(out)["w"]
    assert sorted(u.transforms for u in uses) == [(), ("maas_fold_batchnorm",)]


# ---- (b) structure -----------------------------------------------------------------------


def test_structure_after_folding(cnn_bn):
    _, _, _, prog = cnn_bn
    before = _activation_eqns(prog)
    assert _count(before, "rsqrt") == 0  # the statistics' rsqrt is parameter-only...
    assert (_count(before, "sub"), _count(before, "mul")) == (2, 2)  # ...the BN chain is not
    n_bn = 2
    for into, n_mul in (("kernel", 0), ("output", n_bn)):
        out = fold_batchnorm(into)(prog)
        acts = _activation_eqns(out)
        assert _count(acts, "rsqrt") == 0
        assert _count(acts, "sub") == 0
        assert _count(acts, "mul") == n_mul
        assert len(out.history[-1].notes) == n_bn
        assert fold_batchnorm(into)(out) is out  # idempotent
        assert (out.in_tree, out.out_tree, out.roles) == (prog.in_tree, prog.out_tree, prog.roles)
        jcore.check_jaxpr(out.jaxpr.jaxpr)
    folded = fold_batchnorm()(prog)
    table = maas_jax.consumers(folded)
    for i in range(n_bn):
        (use,) = table[f"params/conv{i}/kernel"]
        assert (use.primitive, use.operand, use.transforms) == (
            "conv_general_dilated",
            1,
            ("maas_fold_batchnorm",),
        )
    # The statistics are still inputs, now read only to compute the fold.
    assert all(table[p] for p in prog.param_paths if "batch_stats" in p)


def test_pass_object():
    assert fold_batchnorm() == FoldBatchNorm() and hash(fold_batchnorm()) == hash(FoldBatchNorm())
    assert repr(fold_batchnorm()) == "fold_batchnorm()"
    assert repr(fold_batchnorm("output")) == "fold_batchnorm(into='output')"
    assert fold_batchnorm().name == "fold_batchnorm"
    with pytest.raises(ValueError, match="into must be 'kernel'.*got 'weights'"):
        fold_batchnorm("weights")


# ---- (c), (e), (f): what is left alone ---------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_model_without_batchnorm_is_returned_unchanged(kind):
    model = digits.make_model(kind)
    x = jnp.zeros((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    prog = maas_jax.trace(digits.make_apply(model), variables, x)
    for into in MODES:
        assert fold_batchnorm(into)(prog) is prog


def test_batchnorm_on_the_input_is_left_alone():
    class InputBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(x) * 2.0

    variables, x = _linen(InputBN(), (3, 4))
    prog = maas_jax.trace_linen(InputBN(), variables, x)
    assert fold_batchnorm()(prog) is prog
    # In a model that also has a foldable BN, only that one is folded, and exactly.
    variables, x = _linen(ConvNet(), (2, 6, 6, 3))
    out = fold_batchnorm()(maas_jax.trace_linen(ConvNet(), variables, x))
    assert len(out.history[-1].notes) == 3  # of 4 BatchNorm layers
    _close(out(variables, x), ConvNet().apply(variables, x))


def test_training_mode_batchnorm_is_not_folded():
    module = ConvNet(train=True)
    variables, x = _linen(module, (2, 6, 6, 3))

    def apply(v, x):
        return module.apply(v, x, mutable=["batch_stats"])[0]

    prog = maas_jax.trace(apply, variables, x)
    assert fold_batchnorm()(prog) is prog

    model, x = _nnx_model()
    model.train()
    prog, _ = maas_jax.trace_nnx(model, x)
    assert fold_batchnorm()(prog) is prog


def test_activation_dependent_scale_is_not_folded():
    def fn(p, x):
        y = x @ p["w"]
        gate = jnp.mean(x, axis=0, keepdims=True)[:, :1]  # a data-dependent "scale"
        return y * gate * p["s"]

    p = {"w": jnp.ones((4, 3)), "s": jnp.full((3,), 2.0)}
    prog = maas_jax.trace(fn, p, jnp.ones((2, 4)))
    assert fold_batchnorm()(prog) is prog


# ---- (d) quantization after folding -------------------------------------------------------


def _int_convs(program):
    return sum(
        e.primitive.name == "conv_general_dilated"
        and e.params["preferred_element_type"] == jnp.int32
        for e in program.jaxpr.jaxpr.eqns
    )


@pytest.mark.parametrize("into", MODES)
def test_fold_then_w8a8_then_convert(cnn_bn, into):
    model, variables, (_, _, x_test, y_test), prog = cnn_bn
    w8a8 = passes.fake_quant("int8", act="int8")(fold_batchnorm(into)(prog))
    converted = passes.convert()(w8a8)
    stored = passes.convert_params(converted, w8a8, variables)
    want = np.asarray(w8a8(variables, x_test))
    np.testing.assert_array_equal(np.asarray(converted(stored, x_test)), want)
    n = len(x_test)
    acc_float = digits.accuracy(digits.make_apply(model), variables, x_test, y_test, n)
    acc_q = digits.accuracy(w8a8, variables, x_test, y_test, n)
    assert acc_q >= acc_float - 0.005, (acc_float, acc_q)
    if into == "output":
        assert _int_convs(w8a8) == 2  # both convolutions run on int8 with int8 activations


def test_kernel_fold_then_w8a8_runs_convolutions_on_integers(cnn_bn):
    prog = cnn_bn[3]
    assert _int_convs(passes.fake_quant("int8", act="int8")(fold_batchnorm()(prog))) == 2
