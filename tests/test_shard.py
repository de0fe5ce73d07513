"""shard: plans from rule tables and presets; sharded == unsharded (forward, grads, steps)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from maas_jax.passes.shard import ShardingError, ShardingWarning
from zoo import by_name

import maas_jax
from maas_jax import passes


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _close(a, b):
    """f32 agreement, 1e-6 relative to the scale of the whole tree (outputs, or all gradients):
    sharded reductions sum in another order, so values near zero differ by rounding noise."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    scale = max(1.0, max(float(np.abs(np.asarray(y)).max()) for y in leaves_b))
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-5 * scale)


def _mlp():
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "up": {"kernel": jax.random.normal(k[0], (16, 64)) / 4, "bias": jnp.zeros(64)},
        "down": {"kernel": jax.random.normal(k[1], (64, 16)) / 8, "bias": jnp.zeros(16)},
    }
    x = jax.random.normal(k[2], (8, 16))

    def f(p, x):
        h = jax.nn.gelu(x @ p["up"]["kernel"] + p["up"]["bias"])
        return h @ p["down"]["kernel"] + p["down"]["bias"]

    return f, params, x


PRESETS = ["dp", "fsdp", "tp", "fsdp_tp"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "model",
    ["mlp", pytest.param("linen_scan_remat_transformer", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("extra", ["plain", "prune+fake_quant"])
def test_sharded_forward_grads_and_steps_equal_unsharded(preset, model, extra):
    if model == "mlp":
        fn, params, x = _mlp()
        inputs = (x,)
    else:
        m = by_name(model)
        fn, params, inputs = m.fn, m.params, m.inputs
    mesh = _mesh((2, 4), ("data", "model"))
    prog = maas_jax.trace(fn, params, *inputs)
    before = []
    if extra != "plain":
        before = [
            passes.prune(sparsity=0.3),
            passes.fake_quant(
                rules=[passes.QuantRule(where=r"kernel$", weight="int8", act="int8")]
            ),
        ]
    base = maas_jax.pipeline(*before)(prog)
    if before and model == "mlp" and preset in ("tp", "fsdp_tp"):
        # fake_quant before shard hides the hidden units from the tensor-parallel analysis (the
        # model declares no logical axes): the plan says so instead of replicating silently
        with pytest.warns(ShardingWarning, match="found no tensor-parallel .* in 'f'"):
            sharded = maas_jax.pipeline(*before, passes.shard(mesh, preset=preset))(prog)
    else:
        sharded = maas_jax.pipeline(*before, passes.shard(mesh, preset=preset))(prog)
    f = passes.sharded_jit(sharded)
    placed = passes.place(sharded, params)
    _close(f(placed, *inputs), jax.jit(base)(params, *inputs))

    def loss(program):
        return lambda p: jnp.mean(program(p, *inputs) ** 2)

    g_sharded = jax.jit(jax.grad(loss(sharded)), in_shardings=(passes.in_shardings(sharded)[0],))(
        placed
    )
    _close(g_sharded, jax.jit(jax.grad(loss(base)))(params))
    # SGD with momentum: Adam divides by sqrt(v) and so amplifies rounding noise in gradients
    # that are ~0 into full-size steps, which no sharded/unsharded comparison survives.
    opt = optax.sgd(1e-2, momentum=0.9)

    def steps(program, p):
        s = opt.init(p)
        for _ in range(5):
            g = jax.grad(loss(program))(p)
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    _close(jax.jit(lambda p: steps(sharded, p))(placed), jax.jit(lambda p: steps(base, p))(params))


def test_fsdp_bytes_per_device_read_from_the_compiled_program():
    fn, params, x = _mlp()
    mesh = _mesh((8,), ("data",))
    prog = passes.shard(mesh, preset="fsdp")(maas_jax.trace(fn, params, x))
    plan = prog.meta["sharding"]
    total = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    assert plan.bytes_per_device(prog) == total // 8
    assert plan.replicated_fraction(prog) == 0.0
    compiled = passes.sharded_jit(prog).trace(passes.place(prog, params), x).lower().compile()
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args == total // 8 + x.nbytes // 8  # params and the batch, each 1/8 per device
    hlo = compiled.as_text()
    assert "all-gather" in hlo  # FSDP gathers the weights it needs


def test_collectives_follow_the_plan():
    fn, params, x = _mlp()
    prog = maas_jax.trace(fn, params, x)

    def collectives(preset, mesh):
        sharded = passes.shard(mesh, preset=preset)(prog)
        text = (
            passes.sharded_jit(sharded)
            .trace(passes.place(sharded, params), x)
            .lower()
            .compile()
            .as_text()
        )
        return set(re.findall(r"(all-reduce|all-gather|reduce-scatter|all-to-all)", text))

    assert collectives("dp", _mesh((8,), ("data",))) == set()  # forward of pure DP: none
    tp = collectives("tp", _mesh((1, 8), ("data", "model")))
    assert "all-reduce" in tp  # row-parallel down projection sums partial results
    assert "all-gather" not in tp  # column-parallel up projection needs no gather


def test_tp_preset_finds_megatron_columns_and_rows():
    fn, params, x = _mlp()
    sharded = passes.shard(_mesh((2, 4), ("data", "model")), preset="tp")(
        maas_jax.trace(fn, params, x)
    )
    specs = sharded.meta["sharding"].param_specs
    assert specs["up/kernel"] == P(None, "model") and specs["up/bias"] == P("model")
    assert specs["down/kernel"] == P("model", None) and specs["down/bias"] == P(None)


def test_rules_logical_axes_and_fallbacks():
    fn, params, x = _mlp()
    prog = maas_jax.trace(fn, params, x)
    mesh = _mesh((2, 4), ("data", "model"))
    out = passes.shard(
        mesh,
        rules=[(r"up/kernel", ("embed", "mlp")), (r"down/kernel", ("mlp", "embed"))],
        logical_rules=[("mlp", "model"), ("embed", "data")],
    )(prog)
    specs = out.meta["sharding"].param_specs
    assert specs["up/kernel"] == P("data", "model")
    assert specs["down/kernel"] == P("model", "data")
    # fallback: 'mlp' prefers an axis that does not divide (3), then takes 'model'
    mesh3 = _mesh((2, 4), ("data", "model"))
    fb = passes.shard(
        mesh3,
        rules=[(r"up/kernel", (None, "mlp"))],
        logical_rules=[("mlp", "data"), ("mlp", "model")],
    )(prog)
    assert fb.meta["sharding"].param_specs["up/kernel"] == P(None, "data")


def test_activation_constraints_reach_scan_bodies():
    m = by_name("linen_scan_remat_transformer")
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    mesh = _mesh((2, 4), ("data", "model"))
    out = passes.shard(
        mesh, preset="dp", activations=[(r"layers/mlp_in", ("data", None, "model"))]
    )(prog)
    assert "sharding_constraint" in str(out.jaxpr)
    _close(
        passes.sharded_jit(out)(passes.place(out, m.params), *m.inputs), m.fn(m.params, *m.inputs)
    )


def test_bad_plans_are_clear_errors():
    fn, params, x = _mlp()
    prog = maas_jax.trace(fn, params, x)
    mesh = _mesh((2, 4), ("data", "model"))
    with pytest.raises(ShardingError, match=r"names 'modle', which is neither a mesh axis"):
        passes.shard(mesh, rules=[("up/kernel", (None, "modle"))])(prog)
    with pytest.raises(ShardingError, match=r"uses mesh axis 'model' twice"):
        passes.shard(mesh, rules=[("up/kernel", ("model", "model"))])(prog)
    odd = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 10))}, jnp.ones((2, 4)))
    with pytest.raises(
        ShardingError, match=r"'w': dimension of size 10 is not divisible by mesh axis 'model'"
    ):
        passes.shard(mesh, rules=[("w", (None, "model"))])(odd)
    with pytest.warns(ShardingWarning, match=r"logical axis 'mlp' \(size 10\) is not divisible"):
        passes.shard(mesh, rules=[("w", (None, "mlp"))], logical_rules=[("mlp", "model")])(odd)
    with pytest.raises(ShardingError, match="preset must be one of"):
        passes.shard(mesh, preset="zero3")
    with pytest.raises(ShardingError, match="has no sharding plan"):
        passes.sharded_jit(prog)
    with pytest.warns(ShardingWarning, match="matched no parameter"):
        passes.shard(mesh, rules=[("nothing", (None,))])(prog)


def test_plan_report_from_abstract_inputs():
    import json

    fn, params, x = _mlp()
    mesh = _mesh((2, 4), ("data", "model"))
    prog = passes.shard(mesh, preset="fsdp_tp")(maas_jax.trace(fn, params, x))
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), (params, x))
    report = passes.plan_report(prog, *abstract)
    json.dumps(report)
    total = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    assert report["param_bytes_total"] == total
    # by hand: kernels split over model (tp) and data (fsdp) -> /8; up/bias over model (tp) and
    # data sharing its one dimension -> /8; down/bias (row-parallel layer's bias) over data and
    # model sharing its dimension -> /8: every parameter is divided by the whole mesh
    kernels, up_bias, down_bias = (16 * 64 + 64 * 16) * 4 // 8, 64 * 4 // 8, 16 * 4 // 8
    assert report["param_bytes_per_device"] == kernels + up_bias + down_bias == 1064
    assert report["argument_bytes"] == report["param_bytes_per_device"] + x.nbytes // 2
    kinds = [c["kind"] for c in report["collectives"]]
    assert "all-reduce" in kinds and all(c["bytes"] > 0 for c in report["collectives"])
    assert report["flops"] > 0
    assert "collectives" in passes.format_report(report)


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_train_step_with_fake_quant_prune_and_shard_in_one_compiled_step(preset):
    fn, params, x = _mlp()
    target = jnp.sin(x)
    prog = maas_jax.trace(fn, params, x)
    before = [passes.prune(sparsity=0.3), passes.fake_quant("int8", act="int8")]
    pipe = maas_jax.pipeline(*before, passes.shard(_mesh((2, 4), ("data", "model")), preset=preset))
    if preset == "fsdp_tp":  # fake_quant first: no tensor-parallel axis, the plan says so
        with pytest.warns(ShardingWarning, match="found no tensor-parallel"):
            sharded = pipe(prog)
    else:
        sharded = pipe(prog)
    base = maas_jax.pipeline(*before)(prog)
    tx = optax.sgd(1e-2, momentum=0.9)

    def loss(out, x):
        return jnp.mean((out - target) ** 2)

    step = passes.make_train_step(sharded, tx, loss, donate=False)
    p, s = (
        passes.place(sharded, params),
        jax.device_put(tx.init(params), passes.state_shardings(sharded, tx.init(params))),
    )
    bp, bs = params, tx.init(params)
    for _ in range(5):
        p, s, lval = step(p, s, x)
        bl, g = jax.value_and_grad(lambda q: loss(base(q, x), x))(bp)
        u, bs = tx.update(g, bs, bp)
        bp = optax.apply_updates(bp, u)
        _close(lval, bl)
    _close(p, bp)
    # optimizer state follows the parameters it belongs to
    mu = s[0].trace["up"]["kernel"]
    assert mu.sharding.spec == p["up"]["kernel"].sharding.spec
    assert any(a is not None for a in mu.sharding.spec)


def test_sharded_init_creates_only_local_shards():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(16)])
    x = jnp.ones((8, 16))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    prog = passes.shard(_mesh((8,), ("data",)), preset="fsdp")(
        maas_jax.trace_linen(model, abstract, x)
    )
    params = passes.sharded_init(prog, lambda k: model.init(k, x), jax.random.key(0))
    want = model.init(jax.random.key(0), x)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, ref)
        if ref.size >= 8 * 8:  # large leaves: every device holds 1/8
            shard_shape = got.addressable_shards[0].data.shape
            assert np.prod(shard_shape) * 8 == ref.size


def test_quantization_scales_stay_inside_shards():
    """shard then fake_quant: a row-parallel kernel's scales do not need an all-reduce."""
    fn, params, x = _mlp()
    prog = maas_jax.trace(fn, params, x)
    mesh = _mesh((1, 8), ("data", "model"))

    def collective_list(program):
        compiled = (
            passes.sharded_jit(program).trace(passes.place(program, params), x).lower().compile()
        )
        return sorted((c.kind, c.bytes) for c in maas_jax.collectives(compiled.as_text()))

    w8 = passes.fake_quant("int8")
    tp = passes.shard(mesh, preset="tp")
    after = maas_jax.pipeline(tp, w8)(prog)
    with pytest.warns(ShardingWarning, match="fake_quant ran before shard: run shard first"):
        before = maas_jax.pipeline(w8, tp)(prog)
    spec = after.meta["fake_quant"]["down/kernel"]
    assert spec.tile == (0, 64 // 8)  # the contracted, row-sharded axis, one tile per shard
    assert before.meta["fake_quant"]["down/kernel"].tile is None
    # quantizing adds no collective: the same ones as the float tensor-parallel program
    assert collective_list(after) == collective_list(tp(prog)) == [("all-reduce", 8 * 16 * 4)]
    _close(passes.sharded_jit(after)(passes.place(after, params), x), jax.jit(after)(params, x))
