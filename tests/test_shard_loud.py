"""shard says so loudly when a plan shards less than asked (issue 9, items 1-5).

Byte counts are by hand: float32 parameters, 4 bytes per element, divided by the product of the
mesh axes each parameter's spec names.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P
from maas_jax.passes.shard import (
    ShardingError,
    ShardingWarning,
    UnusedShardingRuleWarning,
    format_bytes,
)

import maas_jax
from maas_jax import UnusedRuleWarning, passes
from maas_jax._analysis import _name_mesh_axes  # the plan report's helper, in the core


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _mlp(hidden=64):
    """up (16, h) + bias (h,), down (h, 16) + bias (16,); batch (8, 16)."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "up": {"kernel": jax.random.normal(k[0], (16, hidden)) / 4, "bias": jnp.zeros(hidden)},
        "down": {"kernel": jax.random.normal(k[1], (hidden, 16)) / 8, "bias": jnp.zeros(16)},
    }
    x = jax.random.normal(k[2], (8, 16))

    def f(p, x):
        h = jax.nn.gelu(x @ p["up"]["kernel"] + p["up"]["bias"])
        return h @ p["down"]["kernel"] + p["down"]["bias"]

    return maas_jax.trace(f, params, x), params, x


def _plan(prog, mesh, **kw):
    out = passes.shard(mesh, **kw)(prog)
    return out, out.meta["sharding"]


# ---- 1. presets take the mesh's axis names -----------------------------------------------


@pytest.mark.parametrize(
    ("preset", "arg"),
    [("fsdp", "data_axis='dp'"), ("tp", "model_axis='mp'"), ("fsdp_tp", "data_axis='dp'")],
)
def test_preset_on_a_mesh_without_its_axes_is_an_error(preset, arg):
    mesh = _mesh((2, 4), ("dp", "mp"))
    with pytest.raises(
        ShardingError,
        match=rf"shard\(preset='{preset}'\): .*which the mesh does not have \(its axes: 'dp' "
        rf"\(size 2\), 'mp' \(size 4\)\), so the preset would shard nothing.*{arg}",
    ):
        passes.shard(mesh, preset=preset)


def test_dp_preset_on_a_mesh_without_a_data_axis_is_an_error():
    with pytest.raises(ShardingError, match=r"splits batches over mesh axis 'data'.*data_axis='x'"):
        passes.shard(_mesh((8,), ("x",)), preset="dp")


def test_presets_take_the_axis_names():
    prog, params, x = _mlp()
    mesh = _mesh((2, 4), ("dp", "mp"))
    names = {"data_axis": "dp", "model_axis": "mp"}
    total = (16 * 64 + 64 + 64 * 16 + 16) * 4
    assert total == 8512
    out, plan = _plan(prog, mesh, preset="tp", **names)
    assert plan.param_specs["up/kernel"] == P(None, "mp")
    assert plan.param_specs["down/kernel"] == P("mp", None)
    assert plan.input_specs["args/0"] == P("dp")  # batches follow data_axis
    # tp: kernels and up/bias over mp (4); down/bias replicated
    assert plan.bytes_per_device(out) == (16 * 64 + 64 * 16 + 64) * 4 // 4 + 16 * 4 == 2176
    out, plan = _plan(prog, mesh, preset="fsdp", **names)
    assert plan.bytes_per_device(out) == total // 2 == 4256
    out, plan = _plan(prog, mesh, preset="fsdp_tp", **names)
    assert plan.param_specs["up/kernel"] == P("dp", "mp")
    assert plan.bytes_per_device(out) == total // 8 == 1064
    assert plan.replicated_fraction(out) == 0.0
    assert "data_axis='dp', model_axis='mp'" in repr(passes.shard(mesh, **names))


def test_default_logical_rules_follow_the_axis_names():
    prog = _logical_mlp()
    _, plan = _plan(prog, _mesh((2, 4), ("dp", "mp")), data_axis="dp", model_axis="mp")
    assert plan.param_specs["params/up/kernel"] == P(None, "mp")
    assert plan.param_specs["params/down/kernel"] == P("mp", None)


# ---- 2. indivisible dimensions under presets warn, naming each parameter ------------------


def test_tp_with_an_indivisible_hidden_size_warns_for_each_parameter():
    prog, _, _ = _mlp(hidden=10)
    with pytest.warns(ShardingWarning) as rec:
        out, plan = _plan(prog, _mesh((2, 4), ("data", "model")), preset="tp")
    text = str(rec[0].message)
    assert "Every parameter of 'f' stays replicated" in text
    for line in (
        r"up/kernel (16, 10): its tensor-parallel dim 1 (size 10) is not divisible by mesh axis "
        r"'model' (size 4)",
        r"up/bias (10,): its tensor-parallel dim 0 (size 10)",
        r"down/kernel (10, 16): its tensor-parallel dim 0 (size 10)",
    ):
        assert line in text
    assert plan.bytes_per_device(out) == (16 * 10 + 10 + 10 * 16 + 16) * 4 == 1384
    assert any("up/kernel (16, 10): its tensor-parallel" in n for n in plan.notes)


def test_fsdp_tp_with_an_indivisible_hidden_size_still_uses_the_model_axis():
    """Today's fsdp_tp left 'model' unused here (bytes / 2 on a 2x4 mesh), without a word."""
    prog, params, x = _mlp(hidden=10)
    mesh = _mesh((2, 4), ("data", "model"))
    with pytest.warns(
        ShardingWarning,
        match=r"up/bias \(10,\): its tensor-parallel dim 0 \(size 10\) is not divisible by mesh "
        r"axis 'model' \(size 4\); mesh axis 'model' \(size 4\) divides no free dimension",
    ):
        out, plan = _plan(prog, mesh, preset="fsdp_tp")
    specs = plan.param_specs
    assert specs["up/kernel"] == P("model", "data")  # 16 over model, 10 over data
    assert specs["down/kernel"] == P("data", "model")
    assert specs["up/bias"] == P("data")  # 10: only data divides it
    assert specs["down/bias"] == P(("data", "model"))  # one dim, both axes
    by_hand = 16 * 10 * 4 // 8 + 10 * 4 // 2 + 10 * 16 * 4 // 8 + 16 * 4 // 8
    assert plan.bytes_per_device(out) == by_hand == 188
    compiled = passes.sharded_jit(out).trace(passes.place(out, params), x).lower().compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 188 + 8 * 16 * 4 // 2


def test_fsdp_tp_divides_every_parameter_by_the_whole_mesh():
    prog, params, x = _mlp(hidden=64)
    out, plan = _plan(prog, _mesh((2, 4), ("data", "model")), preset="fsdp_tp")
    assert plan.param_specs["up/bias"] == P(("model", "data"))  # tp columns, then data
    assert plan.param_specs["down/bias"] == P(("data", "model"))
    assert plan.bytes_per_device(out) == 8512 // 8 == 1064
    compiled = passes.sharded_jit(out).trace(passes.place(out, params), x).lower().compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 1064 + 8 * 16 * 4 // 2


def _logical_mlp():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.lecun_normal()
            up = nn.with_logical_partitioning(init, ("embed", "mlp"))
            down = nn.with_logical_partitioning(init, ("mlp", "embed"))
            h = nn.Dense(64, use_bias=False, kernel_init=up, name="up")(x)
            return nn.Dense(16, use_bias=False, kernel_init=down, name="down")(nn.relu(h))

    m, x = M(), jnp.ones((8, 16))
    return maas_jax.trace_linen(m, jax.eval_shape(m.init, jax.random.key(0), x), x)


def test_fsdp_tp_adds_fsdp_to_declared_logical_axes():
    """Declared ``mlp`` axes went to 'model' and the data axis was forgotten (bytes / 4)."""
    prog = _logical_mlp()
    out, plan = _plan(prog, _mesh((2, 4), ("data", "model")), preset="fsdp_tp")
    assert plan.param_specs["params/up/kernel"] == P("data", "model")
    assert plan.param_specs["params/down/kernel"] == P("model", "data")
    assert plan.bytes_per_device(out) == 2 * 16 * 64 * 4 // 8 == 1024


def test_fsdp_with_an_indivisible_parameter_warns():
    prog = maas_jax.trace(
        lambda p, x: x @ p["w"] + p["b"],
        {"w": jnp.ones((16, 3)), "b": jnp.ones(3)},
        jnp.ones((8, 16)),
    )
    with pytest.warns(
        ShardingWarning,
        match=r"b \(3,\): mesh axis 'data' \(size 8\) divides no free dimension",
    ):
        out, plan = _plan(prog, _mesh((8,), ("data",)), preset="fsdp")
    assert plan.param_specs["w"] == P("data", None)
    assert plan.bytes_per_device(out) == 16 * 3 * 4 // 8 + 3 * 4 == 36


# ---- 3. every absent mesh axis is an error --------------------------------------------------


@pytest.mark.parametrize("axis", ["model", "tensor"])
def test_logical_rule_naming_an_absent_mesh_axis_is_an_error(axis):
    prog, _, _ = _mlp()
    with pytest.raises(
        ShardingError,
        match=rf"logical rule \('mlp', '{axis}'\) maps to mesh axis '{axis}', which the mesh does "
        r"not have \(its axes: 'data' \(size 8\)\).*or to None",
    ):
        passes.shard(
            _mesh((8,), ("data",)),
            rules=[("up/kernel", (None, "mlp"))],
            logical_rules=[("mlp", axis)],
        )(prog)


def test_tp_on_a_mesh_without_a_model_axis_is_an_error():
    with pytest.raises(
        ShardingError, match=r"tensor parallel\) over mesh axis 'model'.*model_axis="
    ):
        passes.shard(_mesh((8,), ("data",)), preset="tp")


def test_explicit_batch_axis_the_mesh_lacks_is_an_error():
    with pytest.raises(ShardingError, match=r"batch_axis='batch' is not an axis of the mesh"):
        passes.shard(_mesh((8,), ("data",)), batch_axis="batch")


# ---- 4. unused activation rules warn -------------------------------------------------------


def test_activation_rule_matching_nothing_warns():
    prog, _, _ = _mlp()
    mesh = _mesh((2, 4), ("data", "model"))
    with pytest.warns(
        UnusedRuleWarning, match=r"activation rule\(s\) 'nowhere' matched no dot_general"
    ) as rec:
        passes.shard(mesh, preset="dp", activations=[("nowhere", ("data", None))])(prog)
    assert issubclass(rec[0].category, ShardingWarning)
    # a rule that matches constrains and does not warn (filterwarnings = error)
    out = passes.shard(mesh, preset="dp", activations=[("", ("data", None))])(prog)
    assert "sharding_constraint" in str(out.jaxpr)


def test_parameter_rule_matching_nothing_is_an_unused_rule_warning():
    prog, _, _ = _mlp()
    with pytest.warns(UnusedShardingRuleWarning, match=r"'nothing' matched no parameter of 'f'"):
        passes.shard(_mesh((8,), ("data",)), rules=[("nothing", (None,))])(prog)


# ---- 5. plan reports -------------------------------------------------------------------------


def test_format_bytes_units():
    assert format_bytes(0) == "0 B"
    assert format_bytes(64) == "64 B"
    assert format_bytes(1064) == "1.0 KiB"
    assert format_bytes(8512) == "8.3 KiB"  # 8512 / 1024 = 8.31
    assert format_bytes(5 * 2**20 + 2**19) == "5.5 MiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_replica_groups_name_the_mesh_axes():
    mesh = _mesh((2, 4), ("data", "model"))
    got = _name_mesh_axes("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", mesh)
    assert got == "mesh['data'=2,'model'=4] {'model'}"
    assert _name_mesh_axes("[4,2]<=[2,4]T(1,0)", mesh) == "[4,2]<=[2,4]T(1,0)"
    # sizes that do not match the mesh are left as XLA wrote them
    assert _name_mesh_axes("mesh['axis_0'=8] {'axis_0'}", mesh) == "mesh['axis_0'=8] {'axis_0'}"


def test_plan_report_names_axes_functions_and_uses_readable_units():
    prog, params, x = _mlp()
    out, _ = _plan(prog, _mesh((2, 4), ("data", "model")), preset="fsdp_tp")
    report = passes.plan_report(out, params, x)
    groups = [c["replica_groups"] for c in report["collectives"]]
    assert not any("axis_" in g for g in groups)
    assert any("'model'" in g for g in groups)  # the row-parallel all-reduce, over 'model'
    ops = [c["op_name"] for c in report["collectives"]]
    assert ops and all(op.startswith("jit(f)/") for op in ops)
    text = passes.format_report(report)
    assert "parameters: 8.3 KiB total, 1.0 KiB per device" in text
    assert "0.0 MiB" not in text and "unnamed" not in text
    compiled = passes.sharded_jit(out).trace(passes.place(out, params), x).lower().compile()
    hlo = compiled.as_text()
    assert "unnamed function" not in hlo and 'op_name="jit(f)/' in hlo
