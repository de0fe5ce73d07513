"""Recipe files: every public pass round-trips through TOML, and bad files are named errors.

The expected TOML texts below are written by hand (not produced by the code under test), so a
change of format shows up here before it reaches a user's file.
"""

from __future__ import annotations

import json
import textwrap
from importlib import resources

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from jax.sharding import Mesh
from maas_jax.passes import QuantRule

import maas_jax
from maas_jax import Op, Path, passes, recipe
from maas_jax.recipe import RecipeError


def _mesh(shape=(2, 4), axes=("data", "model")):
    n = int(np.prod(shape))
    return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), axes)


# One of every public pass, with non-default arguments wherever a pass has them.
EVERY_PASS = {
    "clip_weights": passes.clip_weights(2.5, where=[r"dense/kernel$", Op("dot_general")]),
    "clip_weights_opaque": passes.clip_weights(1.0, allow_opaque=True),
    "dce": passes.dce(),
    "fold_batchnorm": passes.fold_batchnorm(into="output"),
    "fake_quant": passes.fake_quant(
        rules=[
            QuantRule(where=Path(r"embed"), weight="int4", tile_size=32, channel_axes=(0,)),
            QuantRule(
                where=Op(("dot_general", "conv_general_dilated"), name_stack="attention"),
                weight="int8",
                act="int8",
                act_mode="static",
                calibration="percentile",
                percentile=99.9,
            ),
            QuantRule(weight="fp8_e4m3", granularity="per_tensor", symmetric=True),
            QuantRule(weight="int8", symmetric=False, act="int8", act_symmetric=False),
        ],
        inline_custom=True,
    ),
    "fake_quant_calibrated": passes.FakeQuant(
        (QuantRule(weight="int8", act="int8", act_mode="static"),),
        act_scales=((0, 1.2345678901234567), (3, 1e-30)),
        dynamic_sites=(1, 2),
    ),
    "convert": passes.convert(pack=False),
    "prune_rate": passes.prune(sparsity=0.5, where=r"kernel$"),
    "prune_nm": passes.prune("nm", n=2, m=4),
    "prune_block": passes.prune("block", sparsity=0.75, block=(4, 8)),
    "prune_random": passes.prune("random", sparsity=0.25, seed=7, allow_opaque=True),
    "prune_threshold": passes.prune(threshold=0.01),
    "nested_pipeline": maas_jax.pipeline(
        passes.dce(), maas_jax.pipeline(passes.convert(), verify=False)
    ),
}


@pytest.mark.parametrize("key", list(EVERY_PASS))
def test_every_pass_round_trips_through_toml(key, tmp_path):
    pipe = maas_jax.pipeline(EVERY_PASS[key], passes.dce())
    path = recipe.dump(pipe, tmp_path / "r.toml")
    assert recipe.load(path) == pipe
    assert recipe.loads(recipe.dumps(pipe)) == pipe
    # the dict form is JSON (what manifests and checkpoints hold) and round-trips too
    doc = json.loads(json.dumps(recipe.to_dict(pipe)))
    assert recipe.from_dict(doc) == pipe
    jsonschema.Draft202012Validator(recipe.schema()).validate(doc)


def test_shard_round_trips_with_its_mesh_rules_and_null_dims():
    pipe = maas_jax.pipeline(
        passes.shard(
            _mesh(),
            preset="fsdp_tp",
            rules=[(r"head/kernel$", (None, "model")), (r"emb", (("data", "model"), None))],
            logical_rules=[("mlp", "model"), ("embed", None)],
            activations=[(r"block_0", ("data", None))],
            batch_axis=None,
        )
    )
    text = recipe.dumps(pipe)
    assert text == textwrap.dedent(
        """\
        version = 1

        [[pass]]
        name = "shard"
        mesh = { axes = ["data", "model"], shape = [2, 4] }
        preset = "fsdp_tp"
        rules = [["head/kernel$", [false, "model"]], ["emb", [["data", "model"], false]]]
        logical_rules = [["mlp", "model"], ["embed", false]]
        activations = [["block_0", ["data", false]]]
        batch_axis = false
        """
    )
    back = recipe.loads(text).passes[0]
    want = pipe.passes[0]
    assert back.mesh == want.mesh
    for field in ("preset", "rules", "logical_rules", "activations", "batch_axis"):
        assert getattr(back, field) == getattr(want, field), field
    assert recipe.to_dict(recipe.loads(text)) == recipe.to_dict(pipe)


def test_a_hand_written_file_reads_as_the_pipeline_it_says():
    text = textwrap.dedent(
        """
        version = 1
        name = "w8a8 without the head"
        description = "hand written"

        [[pass]]
        name = "fold_batchnorm"

        [[pass]]
        name = "fake_quant"
        [[pass.rules]]
        where = ["head/kernel$", { op = "conv_general_dilated" }]
        weight = "int4"
        [[pass.rules]]
        where = { path = "bias$" }
        weight = "int8"
        [[pass.rules]]
        weight = "int8"
        act = "int8"

        [[pass]]
        name = "prune"
        method = "nm"
        n = 2
        m = 4

        [[pass]]
        name = "convert"
        """
    )
    want = maas_jax.pipeline(
        passes.fold_batchnorm(),
        passes.fake_quant(
            rules=[
                QuantRule(where=("head/kernel$", Op("conv_general_dilated")), weight="int4"),
                QuantRule(where=Path("bias$"), weight="int8"),
                QuantRule(weight="int8", act="int8"),
            ]
        ),
        passes.prune("nm", n=2, m=4),
        passes.convert(),
    )
    assert recipe.loads(text) == want


def test_dumped_text_is_the_documented_format():
    pipe = maas_jax.pipeline(
        passes.fake_quant(rules=[QuantRule(where=r"emb$", weight="int4"), QuantRule(act="int8")]),
        passes.convert(),
    )
    assert recipe.dumps(pipe, name="demo") == textwrap.dedent(
        """\
        version = 1
        name = "demo"

        [[pass]]
        name = "fake_quant"

        [[pass.rules]]
        where = "emb$"
        weight = "int4"

        [[pass.rules]]
        weight = "int8"
        act = "int8"

        [[pass]]
        name = "convert"
        """
    )


def test_the_bundled_minilm_recipe_is_the_pipeline_the_demo_documents():
    pipe = recipe.load(resources.files("maas_jax.recipes") / "minilm-w8a8.toml")
    assert pipe == maas_jax.pipeline(
        passes.fake_quant(
            rules=[
                QuantRule(where=r"_embeddings/embedding$", weight="int8"),
                QuantRule(weight="int8", act="int8"),
            ]
        ),
        passes.convert(),
    )


def test_a_loaded_recipe_optimizes_like_the_python_pipeline(tmp_path):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (16, 32)), "w2": jax.random.normal(k2, (32, 4))}
    x = jax.random.normal(jax.random.key(1), (8, 16))
    prog = maas_jax.trace(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], params, x)
    pipe = maas_jax.pipeline(passes.fake_quant("int8", act="int8"), passes.convert())
    loaded = recipe.load(recipe.dump(pipe, tmp_path / "w8a8.toml"))
    a, a_params = maas_jax.optimize(prog, params, pipe)
    b, b_params = maas_jax.optimize(prog, params, loaded)
    np.testing.assert_array_equal(a(a_params, x), b(b_params, x))
    assert b_params["w1"]["qvalue"].dtype == jnp.int8


BAD = [
    ('version = 1\n[[pass]]\nname = "dce"\nkeep = 1\n', r"pass\[0\]: unknown key 'keep'"),
    (
        'version = 1\n[[pass]]\nname = "fake_quant"\n[[pass.rules]]\nwieght = "int8"\n',
        r"pass\[0\]\.rules\[0\]: unknown key 'wieght' \(allowed: act, act_mode",
    ),
    ('version = 1\n[[pass]]\nname = "quantise"\n', r"pass\[0\]\.name: unknown pass 'quantise'"),
    (
        "version = 2\npass = []\n",
        r"version: recipe format version 2; this maas_jax reads version 1",
    ),
    ('[[pass]]\nname = "dce"\n', r"top level: 'version' is required"),
    ('version = 1\n[[pass]]\nname = "clip_weights"\n', r"pass\[0\]: 'max_abs' is required"),
    (
        'version = 1\n[[pass]]\nname = "clip_weights"\nmax_abs = "big"\n',
        r"pass\[0\]\.max_abs: 'big' is not of type 'number'",
    ),
    (
        'version = 1\n[[pass]]\nname = "fake_quant"\n[[pass.rules]]\nweight = "int9"\n',
        r"pass\[0\]\.rules\[0\]: fake_quant: weight='int9'",
    ),
    (
        'version = 1\n[[pass]]\nname = "prune"\nsparsity = 1.5\n',
        r"pass\[0\] \(prune\): .*sparsity",
    ),
    (
        'version = 1\n[[pass]]\nname = "clip_weights"\nmax_abs = 1.0\nwhere = "(unclosed"\n',
        r"pass\[0\] \(clip_weights\): .*\(unclosed",
    ),
    ('version = 1\n[[pass]\nname = "dce"\n', r"not valid TOML"),
    ("version = 1\nextra = true\npass = []\n", r"top level: unknown key 'extra'"),
    (
        'version = 1\n[[pass]]\nname = "shard"\nmesh = { axes = ["data"], shape = [64] }\n',
        r"needs 64 devices and this process sees 8 .*xla_force_host_platform_device_count=64",
    ),
]


@pytest.mark.parametrize("text,match", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_recipe_files_are_errors_with_the_key_path(text, match, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        recipe.load(path)
    with pytest.raises(maas_jax.MaasError, match=str(path).replace(".", r"\.")):
        recipe.load(path)


def test_a_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file .*nope\.toml does not exist"):
        recipe.load(tmp_path / "nope.toml")


def test_what_a_recipe_cannot_hold_is_refused_by_name(tmp_path):
    w = {"k": jnp.ones((4, 4))}
    with pytest.raises(RecipeError, match=r"pass\[1\] \(prune\): .*precomputed masks"):
        recipe.dumps(maas_jax.pipeline(passes.dce(), passes.prune(sparsity=0.5).bake(w)))
    with pytest.raises(RecipeError, match=r"pass\[0\] \(clip_weights\): where=.* is a callable"):
        recipe.dumps(passes.clip_weights(1.0, where=lambda path, info: True))
    with pytest.raises(RecipeError, match=r"pass\[0\] .*is not one of maas_jax's passes"):
        recipe.dumps(maas_jax.pipeline(lambda program: program))
    path = tmp_path / "r.toml"
    with pytest.raises(RecipeError):
        recipe.dump(passes.clip_weights(1.0, where=lambda path, info: True), path)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_a_checkpoint_records_the_pipeline_as_its_recipe(tmp_path):
    from maas_jax import checkpoint

    pipe = maas_jax.pipeline(passes.prune("nm", n=2, m=4), passes.fake_quant("int4"))
    checkpoint.save(tmp_path, 3, params={"w": jnp.ones((4, 4))}, recipe=pipe)
    restored = checkpoint.restore(tmp_path, target_params={"w": jnp.zeros((4, 4))})
    assert restored.recipe == recipe.to_dict(pipe)
    assert recipe.from_dict(restored.recipe) == pipe
    with pytest.raises(checkpoint.CheckpointError, match=r"recipe: pass\[0\] .*not one of"):
        checkpoint.save(tmp_path, 4, params={"w": jnp.ones(2)}, recipe=lambda program: program)


def test_a_registered_user_pass_round_trips_and_bad_registrations_are_refused():
    import dataclasses

    @recipe.register_pass
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ScaleWeights:
        factor: float
        where: object = None
        axes: tuple = ()
        name = "test_scale_weights"

        def __call__(self, program):
            return program

    pipe = maas_jax.pipeline(
        ScaleWeights(factor=0.5, where=(r"k$", Op("dot_general")), axes=(0, 1))
    )
    assert recipe.loads(recipe.dumps(pipe)) == pipe
    with pytest.raises(RecipeError, match=r"pass\[0\]: 'factor' is required"):
        recipe.loads('version = 1\n[[pass]]\nname = "test_scale_weights"\n')
    with pytest.raises(RecipeError, match=r"unknown key 'fator'"):
        recipe.loads('version = 1\n[[pass]]\nname = "test_scale_weights"\nfator = 1.0\n')
    with pytest.raises(RecipeError, match=r"cannot be written to a recipe file"):
        recipe.dumps(ScaleWeights(factor=jnp.ones(2)))
    with pytest.raises(ValueError, match=r"'dce' is a built-in pass name"):
        recipe.register_pass(dataclasses.make_dataclass("X", [], namespace={"name": "dce"}))
    with pytest.raises(TypeError, match=r"is not a dataclass"):
        recipe.register_pass(type("Y", (), {"name": "y"}))
