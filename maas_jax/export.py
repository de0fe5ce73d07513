"""Artifacts: an optimized Program saved as a small, verified directory that serves anywhere.

:func:`save` writes::

    DIR/manifest.json         name, version, signature, batch buckets, recipe, versions,
                              platforms, mesh, every stored tensor, sha256 of every file
    DIR/model.b{N}.jaxexport  one jax.export module per batch bucket N (weights are the
                              modules' *arguments*, not constants)
    DIR/weights.safetensors   the stored parameters (integers stay integers, int4 packed two
                              per byte by ``convert``; float weights a converted program no
                              longer reads are not stored)
    DIR/warmup.safetensors    optional warmup rows, run for every bucket before serving

:func:`load` reads the manifest, checks every file's size and sha256, the format version, the
jax version window, the calling convention and the platform **before** deserializing (jax's
deserializer runs whatever custom calls the module names, so it must only see trusted bytes),
and returns an :class:`Artifact`: callable like the program minus its parameters, and a
:class:`maas_jax.serve.ServedModel` the server can batch.

Rows are served independently: the Program must be traced with a batch of one (axis 0 of
every input and output), and each module is that program ``vmap``-ed to its bucket's batch.
A request's rows therefore never interact with other rows of the batch it was merged into.

Bits: the module for bucket N returns exactly what ``jax.jit`` of the same vmapped program
returns in process at batch N (:func:`reference_fn`), and bucket 1 is the Program itself.
Why one module per bucket and not one with a symbolic batch: a shape-polymorphic module is
compiled differently from the concrete-shape program (we measured last-bit differences in
float32 outputs), and XLA compiles per concrete shape anyway. Between buckets XLA may still
round float contractions differently (last-bit differences); a call pads a batch to the next
bucket, so a row's result depends only on the bucket it ran in, never on its neighbours.

Example:
    >>> import tempfile, jax.numpy as jnp, numpy as np
    >>> import maas_jax
    >>> from maas_jax import export
    >>> params = {"w": jnp.arange(6.0).reshape(3, 2)}
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], params, jnp.ones((1, 3)))
    >>> d = export.save(prog, params, tempfile.mkdtemp() + "/m", batch_sizes=(1, 4))
    >>> art = export.load(d)
    >>> [(s.name, s.shape) for s in art.inputs], art.batch_sizes
    ([('x', (-1, 3))], (1, 4))
    >>> np.asarray(art(jnp.ones((2, 3)))).tolist()
    [[6.0, 9.0], [6.0, 9.0]]
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform as _platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export as jax_export
from jax.extend import core as jcore

from maas_jax._errors import MaasError
from maas_jax._paths import key_path_str
from maas_jax._program import InputRef, Program
from maas_jax._signature import NUMPY_TO_OIP, TensorSpec

FORMAT = "maas_jax.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODULE_FILE = "model.b{}.jaxexport"  # .format(bucket)
WEIGHTS_FILE = "weights.safetensors"
WARMUP_FILE = "warmup.safetensors"
#: manifests larger than this are refused unread (a manifest is a few KiB to a few MiB)
MAX_MANIFEST_BYTES = 64 * 2**20

#: numpy dtype name -> Open Inference Protocol datatype
OIP_DATATYPES = NUMPY_TO_OIP
# safetensors.numpy stores these natively; other dtypes (bfloat16, float8) are stored as raw
# unsigned integers of the same width and viewed back on load.
_NATIVE_SAFETENSORS = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64"}
_NATIVE_SAFETENSORS |= {"uint64", "float16", "float32", "float64"}


class ArtifactError(MaasError, ValueError):
    """An artifact cannot be written or is refused at load (tampered, truncated, mismatched)."""


# ---- save ------------------------------------------------------------------------------


def save(
    program: Any,
    params: Any = None,
    directory: str | os.PathLike[str] = "",
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    name: str | None = None,
    version: str = "1",
    platforms: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    recipe: Any = None,
    warmup_inputs: Sequence[Any] | None = None,
    reference_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``program`` with its stored ``params`` as an artifact directory; returns its path.

    Args:
      program: a :class:`Program` traced with a batch of one, or a
        :class:`maas_jax.passes.QuantizedModel` (its program, stored weights, recipe name and
        float size are used; ``params`` is then ignored).
      params: the parameter tree the program is called with (after ``convert_params`` for an
        integer program).
      directory: where to write; must not exist unless ``overwrite`` (written to a temporary
        sibling first and renamed, so a crash never leaves half an artifact under this name).
      batch_sizes: the batch buckets the server compiles and pads requests to.
      name, version: the model's served name (default: the program's name) and version.
      platforms: lowering platforms (``("cpu", "cuda", "tpu")`` for one artifact that runs on
        all); default: this machine's.
      input_names, output_names: tensor names (default: the traced function's argument names
        and the output pytree's paths).
      recipe: a :class:`maas_jax.Pipeline` (or pass) recorded as a recipe dict, or a dict.
      warmup_inputs: example inputs (the program's inputs, any batch) run for every bucket
        at warmup instead of zeros (e.g. real token ids: some models branch on data).
      reference_bytes: the float model's size, for the size ratio in the manifest.

    Raises:
      ArtifactError: the program was not traced with a batch of one, ``params`` does not match
        it, a name is repeated, a dtype cannot be stored, or the directory exists.
    """
    program, params, meta = _unwrap(program, params)
    if reference_bytes is None:
        reference_bytes = meta.get("reference_bytes")
    if recipe is None:
        recipe = meta.get("recipe")
    if not isinstance(program, Program):
        raise ArtifactError(
            f"export.save: expected a maas_jax.Program or QuantizedModel, got "
            f"{type(program).__name__}; trace the model first (maas_jax.trace)."
        )
    if not str(directory):
        raise ArtifactError("export.save: give the directory to write the artifact to")
    directory = Path(directory)
    buckets = _check_buckets(batch_sizes)
    param_leaves, input_roles = _check_signature(program, params)
    in_specs = _input_specs(program, input_roles, input_names)
    out_specs = _output_specs(program, output_names)
    plan = program.meta.get("sharding")

    stored: dict[str, np.ndarray] = {}
    tensors: dict[str, Any] = {}
    for ref, leaf in zip(program.params, param_leaves, strict=True):
        arr = np.asarray(jax.device_get(leaf))
        kind = np.dtype(arr.dtype).name
        if kind not in _NATIVE_SAFETENSORS:
            if arr.dtype.itemsize not in (1, 2, 4) or kind.startswith("int4"):
                raise ArtifactError(
                    f"export.save: parameter {ref.path!r} has dtype {kind}, which cannot be "
                    "stored; int4 weights are stored packed by convert() (the default pack=True)."
                )
            arr = arr.view(f"uint{8 * arr.dtype.itemsize}")
        stored[ref.path] = np.ascontiguousarray(arr)
        tensors[ref.path] = {"dtype": kind, "shape": list(ref.shape)}
        if plan is not None:
            tensors[ref.path]["spec"] = _spec_json(plan.param_specs.get(ref.path))

    modules = {b: _export(program, in_specs, plan, platforms, b) for b in buckets}
    blobs = {MODULE_FILE.format(b): bytes(e.serialize()) for b, e in modules.items()}
    exported = modules[buckets[0]]

    files: list[str] = list(blobs)
    warmup_arrays = None
    if warmup_inputs is not None:
        warmup_arrays = _warmup_arrays(program, input_roles, in_specs, warmup_inputs)

    if directory.exists() and not overwrite:
        raise ArtifactError(
            f"export.save: {directory} already exists; pass overwrite=True to replace it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        from safetensors.numpy import save_file

        for fname, blob in blobs.items():
            (tmp / fname).write_bytes(blob)
        save_file(stored, str(tmp / WEIGHTS_FILE))
        files.append(WEIGHTS_FILE)
        if warmup_arrays is not None:
            save_file(warmup_arrays, str(tmp / WARMUP_FILE))
            files.append(WARMUP_FILE)
        stored_bytes = sum(a.nbytes for a in stored.values())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name or program.name,
            "version": str(version),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "inputs": [_spec_dict(s) for s in in_specs],
            "outputs": [_spec_dict(s) for s in out_specs],
            "batch_sizes": list(buckets),
            "recipe": _recipe_dict(recipe),
            "passes": [{"name": r.name, "config": r.config} for r in program.history],
            "versions": _versions(),
            "platforms": list(exported.platforms),
            "export": {
                "modules": {str(b): MODULE_FILE.format(b) for b in buckets},
                "calling_convention_version": exported.calling_convention_version,
                "nr_devices": exported.nr_devices,
            },
            "mesh": _mesh_json(plan),
            "weights": {"file": WEIGHTS_FILE, "tensors": tensors},
            "sizes": {
                "stored_bytes": stored_bytes,
                "module_bytes": sum(len(b) for b in blobs.values()),
                "reference_bytes": reference_bytes,
            },
            "files": {f: _file_entry(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _unwrap(program: Any, params: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A QuantizedModel brings its own program, weights, recipe and float size."""
    if hasattr(program, "fake_quant_program") and hasattr(program, "stored_bytes"):
        recipe = {"quantize_model": {"recipe": program.recipe, "tables": program.tables}}
        meta = {"reference_bytes": program.float_bytes, "recipe": recipe}
        return program.program, program.params, meta
    if params is None:
        raise ArtifactError("export.save: give the parameters the program is called with")
    return program, params, {}


def _check_buckets(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        buckets = tuple(sorted({int(b) for b in batch_sizes}))
    except (TypeError, ValueError):
        raise ArtifactError(
            f"export.save: batch_sizes must be positive integers, got {batch_sizes!r}"
        ) from None
    if not buckets or buckets[0] < 1:
        raise ArtifactError(
            f"export.save: batch_sizes must be positive integers, got {batch_sizes!r}"
        )
    return buckets


def _check_signature(program: Program, params: Any) -> tuple[list[Any], list[InputRef]]:
    flat_params, tree = jax.tree_util.tree_flatten(params)
    expected = jax.tree_util.tree_structure(
        jax.tree_util.tree_unflatten(program.in_tree, [0] * len(program.roles))[0]
    )
    if tree != expected or len(flat_params) != len(program.params):
        raise ArtifactError(
            f"export.save: params do not match {program.name}'s parameters "
            f"({len(flat_params)} leaves given, {len(program.params)} expected). After "
            "convert(), save the stored weights convert_params() returned, not the float ones."
        )
    for ref, leaf in zip(program.params, flat_params, strict=True):
        if tuple(np.shape(leaf)) != tuple(ref.shape) or np.dtype(leaf.dtype) != ref.dtype:
            raise ArtifactError(
                f"export.save: parameter {ref.path!r} is {np.dtype(leaf.dtype).name}"
                f"{list(np.shape(leaf))}, the program takes {ref.dtype.name}{list(ref.shape)}"
            )
    inputs = [r for r in program.roles if isinstance(r, InputRef)]
    if not inputs:
        raise ArtifactError(f"export.save: {program.name} takes no inputs; nothing to serve")
    for r in inputs:
        if not r.shape or r.shape[0] != 1:
            raise ArtifactError(
                f"export.save: input {r.path!r} of {program.name} has shape {list(r.shape)}; "
                "an artifact serves rows independently, so trace the program with a batch of "
                "one (leading axis of size 1 on every input), e.g. "
                "maas_jax.trace(fn, params, x[:1]). The artifact batches rows itself."
            )
    for i, aval in enumerate(program.jaxpr.out_avals):
        if not aval.shape or aval.shape[0] != 1:
            raise ArtifactError(
                f"export.save: output {i} of {program.name} has shape {list(aval.shape)}; "
                "every output needs the batch axis (size 1) first"
            )
    return flat_params, inputs


def _input_specs(
    program: Program, roles: list[InputRef], names: Sequence[str] | None
) -> list[TensorSpec]:
    if names is None:
        arg_names = program.meta.get("arg_names", ())
        names = []
        for r in roles:
            parts = r.path.split("/")  # "args/0" or "args/1/mask"
            i = int(parts[1])
            base = arg_names[i] if i < len(arg_names) and arg_names[i] else f"input_{i}"
            names.append("/".join([base, *parts[2:]]))
    return _specs(names, [(r.shape, r.dtype) for r in roles], "input")


def _output_specs(program: Program, names: Sequence[str] | None) -> list[TensorSpec]:
    avals = program.jaxpr.out_avals
    if names is None:
        dummy = jax.tree_util.tree_unflatten(program.out_tree, list(range(len(avals))))
        paths = [key_path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]
        names = [p or "output" for p in paths] if len(avals) == 1 else paths
        names = [n if n else f"output_{i}" for i, n in enumerate(names)]
        if len(avals) > 1 and all(n.isdigit() for n in names):
            names = [f"output_{n}" for n in names]
    return _specs(names, [(a.shape, a.dtype) for a in avals], "output")


def _specs(names: Sequence[str], shapes: list[tuple[Any, Any]], what: str) -> list[TensorSpec]:
    names = list(names)
    if len(names) != len(shapes):
        raise ArtifactError(
            f"export.save: {len(names)} {what} names given for {len(shapes)} {what}s"
        )
    if len(set(names)) != len(names):
        raise ArtifactError(f"export.save: {what} names repeat: {names}")
    out = []
    for n, (shape, dtype) in zip(names, shapes, strict=True):
        kind = np.dtype(dtype).name
        if kind not in OIP_DATATYPES:
            raise ArtifactError(
                f"export.save: {what} {n!r} has dtype {kind}, which the inference protocol "
                f"cannot carry (one of {', '.join(OIP_DATATYPES)})"
            )
        out.append(TensorSpec(str(n), kind, (-1, *(int(d) for d in shape[1:]))))
    return out


def _rows_fn(program: Program) -> Any:
    """The program as ``(flat_params, *batched_inputs) -> outputs``, one row at a time (vmap)."""
    run = jcore.jaxpr_as_fun(program.jaxpr)

    def rows(flat_params: list[Any], *xs: Any) -> list[Any]:
        def one(*row: Any) -> list[Any]:
            return [o[0] for o in run(*flat_params, *(r[None] for r in row))]

        return jax.vmap(one)(*xs)

    rows.__name__ = rows.__qualname__ = _safe_name(program.name)
    return rows


def reference_fn(program: Program) -> Any:
    """``jax.jit`` of exactly what :func:`save` exports, in process (no serialization).

    ``reference_fn(program)(jax.tree.leaves(params), *inputs)`` returns the flat outputs; tests
    compare a loaded artifact with it bit for bit at the same batch size.
    """
    return jax.jit(_rows_fn(program))


def _export(
    program: Program,
    in_specs: list[TensorSpec],
    plan: Any,
    platforms: Sequence[str] | None,
    b: int,
) -> Any:
    param_structs = [jax.ShapeDtypeStruct(r.shape, r.dtype) for r in program.params]
    input_structs = [jax.ShapeDtypeStruct((b, *s.shape[1:]), np.dtype(s.dtype)) for s in in_specs]
    jit_kw: dict[str, Any] = {}
    if plan is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        param_sh = [
            NamedSharding(plan.mesh, plan.param_specs.get(r.path, PartitionSpec()))
            for r in program.params
        ]
        replicated = NamedSharding(plan.mesh, PartitionSpec())
        # Inputs are replicated: requests arrive on the host, and a bucket need not divide by
        # the data axis. The plan's parameter shardings are what makes a big model fit.
        jit_kw = {"in_shardings": (param_sh, *[replicated] * len(in_specs))}
    fn = jax.jit(_rows_fn(program), **jit_kw)
    kw = {} if platforms is None else {"platforms": tuple(platforms)}
    try:
        return jax_export.export(fn, **kw)(param_structs, *input_structs)
    except Exception as e:  # jax raises many types here; say which program and why
        raise ArtifactError(
            f"export.save: jax.export could not export {program.name} at batch {b}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _warmup_arrays(
    program: Program, roles: list[InputRef], specs: list[TensorSpec], warmup_inputs: Any
) -> dict[str, np.ndarray]:
    leaves = [np.asarray(x) for x in jax.tree.leaves(tuple(warmup_inputs))]
    if len(leaves) != len(specs):
        raise ArtifactError(
            f"export.save: warmup_inputs has {len(leaves)} arrays, {program.name} takes "
            f"{len(specs)} inputs ({', '.join(s.name for s in specs)})"
        )
    out = {}
    for spec, x in zip(specs, leaves, strict=True):
        if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != spec.shape[1:]:
            raise ArtifactError(
                f"export.save: warmup input {spec.name!r} has shape {list(x.shape)}, expected "
                f"{list(spec.shape)}"
            )
        out[spec.name] = np.ascontiguousarray(x.astype(spec.dtype))
    return out


def _spec_dict(s: TensorSpec) -> dict[str, Any]:
    return {
        "name": s.name,
        "datatype": OIP_DATATYPES[s.dtype],
        "dtype": s.dtype,
        "shape": list(s.shape),
    }


def _spec_json(spec: Any) -> list[Any] | None:
    if spec is None:
        return None
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _mesh_json(plan: Any) -> dict[str, Any] | None:
    if plan is None:
        return None
    mesh = plan.mesh
    return {"axes": dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape), strict=True))}


def _recipe_dict(recipe: Any) -> Any:
    if recipe is None or isinstance(recipe, dict):
        return recipe
    from maas_jax import recipe as recipes  # recipe files (TOML) and their dict form

    return recipes.to_dict(recipe)


def _versions() -> dict[str, str]:
    import jaxlib

    from maas_jax import __version__

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "maas_jax": __version__,
        "python": _platform.python_version(),
    }


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^\w]", "_", name) or "program"


# ---- load ------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The artifact's manifest, after checking every file it lists (size and sha256).

    Deserializes nothing: safe on untrusted directories. ``maas-jax inspect`` prints this.

    Raises:
      ArtifactError: missing or unreadable manifest, unknown format, a listed file missing,
        truncated or changed.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact {directory}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"artifact {directory}: no {MANIFEST} (not a maas_jax artifact?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is not a {FORMAT} manifest")
    fv = manifest.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {directory}: format version {fv!r}; this maas_jax reads up to "
            f"{FORMAT_VERSION}. Upgrade maas_jax."
        )
    _check_manifest_fields(directory, manifest)
    if verify:
        for fname, entry in manifest["files"].items():
            f = directory / fname
            if Path(fname).name != fname:
                raise ArtifactError(f"artifact {directory}: file name {fname!r} is not plain")
            if not f.is_file():
                raise ArtifactError(f"artifact {directory}: {fname} is missing")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise ArtifactError(
                    f"artifact {directory}: {fname} is {size} bytes, the manifest says "
                    f"{entry['bytes']} (truncated or replaced)"
                )
            if _sha256(f) != entry["sha256"]:
                raise ArtifactError(
                    f"artifact {directory}: {fname} does not match its sha256 in the manifest "
                    "(the file was changed after export); refusing to load it"
                )
    return manifest


def _check_manifest_fields(directory: Path, m: dict[str, Any]) -> None:
    need = {
        "name": str,
        "version": str,
        "inputs": list,
        "outputs": list,
        "batch_sizes": list,
        "versions": dict,
        "platforms": list,
        "export": dict,
        "weights": dict,
        "files": dict,
    }
    for key, typ in need.items():
        if not isinstance(m.get(key), typ):
            raise ArtifactError(
                f"artifact {directory}: {MANIFEST} field {key!r} is missing or not a {typ.__name__}"
            )
    modules = m["export"].get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ArtifactError(f"artifact {directory}: the manifest lists no modules")
    if sorted(int(b) for b in modules) != sorted(m["batch_sizes"]):
        raise ArtifactError(
            f"artifact {directory}: modules for batches {sorted(modules)} but batch_sizes "
            f"{m['batch_sizes']}"
        )
    for fname in (*modules.values(), WEIGHTS_FILE):
        if fname not in m["files"]:
            raise ArtifactError(f"artifact {directory}: the manifest lists no {fname}")
    for fname, entry in m["files"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            raise ArtifactError(f"artifact {directory}: bad files entry for {fname!r}")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_compatible(manifest: dict[str, Any], *, where: str = "artifact") -> None:
    """Refuse an artifact this jax cannot run: newer jax, calling convention, platform.

    jax.export promises that an artifact runs on a jaxlib up to 6 months newer than the one
    that exported it and only 3 weeks older, so an export from a newer jax is refused here.
    """
    exported = manifest["versions"].get("jax", "")
    if _version_tuple(jax.__version__) < _version_tuple(exported):
        raise ArtifactError(
            f"{where}: exported with jax {exported}, this is jax {jax.__version__}; jax.export "
            "modules only run on the same or a newer jax (pip install -U jax jaxlib)"
        )
    ccv = manifest["export"].get("calling_convention_version")
    lo = jax_export.minimum_supported_calling_convention_version
    hi = jax_export.maximum_supported_calling_convention_version
    if not isinstance(ccv, int) or not lo <= ccv <= hi:
        raise ArtifactError(
            f"{where}: calling convention version {ccv!r}; this jax supports {lo}..{hi}"
        )
    here = jax.default_backend()
    plats = [p.lower() for p in manifest["platforms"]]
    if here not in plats and not (here == "gpu" and ("cuda" in plats or "rocm" in plats)):
        raise ArtifactError(
            f"{where}: exported for {plats}, this machine runs {here}; export again with "
            f"platforms=[..., {here!r}]"
        )


def load(
    directory: str | os.PathLike[str],
    *,
    mesh: Any = None,
    name: str | None = None,
    version: str | None = None,
) -> Artifact:
    """Verify and load an artifact (see the module docstring for what is checked first).

    Args:
      directory: the artifact directory :func:`save` wrote.
      mesh: for a sharded artifact, the ``jax.sharding.Mesh`` to load onto (its axis names and
        sizes must equal the exported mesh's); default: one built from this machine's devices.
      name, version: serve under another name / version than the manifest's.

    Raises:
      ArtifactError: a check failed; nothing was deserialized.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = f"artifact {directory}"
    check_compatible(manifest, where=where)
    mesh = _mesh_for(manifest, mesh, where)
    tensors = _load_weights(directory, manifest, mesh, where)
    exported = {}
    for b, fname in manifest["export"]["modules"].items():
        blob = (directory / fname).read_bytes()
        try:
            exported[int(b)] = jax_export.deserialize(bytearray(blob))
        except Exception as e:  # the flatbuffer parser raises several types on bad bytes
            raise ArtifactError(f"{where}: {fname} cannot be deserialized: {e}") from e
    warmup = None
    if WARMUP_FILE in manifest["files"]:
        from safetensors.numpy import load_file

        warmup = load_file(str(directory / WARMUP_FILE))
    return Artifact(
        name=name or manifest["name"],
        version=str(version or manifest["version"]),
        inputs=[TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in manifest["inputs"]],
        outputs=[TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in manifest["outputs"]],
        batch_sizes=tuple(int(b) for b in manifest["batch_sizes"]),
        manifest=manifest,
        directory=directory,
        exported=exported,
        params=tensors,
        mesh=mesh,
        warmup_rows=warmup,
    )


def _mesh_for(manifest: dict[str, Any], mesh: Any, where: str) -> Any:
    want = manifest.get("mesh")
    if want is None:
        return None
    axes = dict(want["axes"])
    if mesh is None:
        n = int(np.prod(list(axes.values())))
        if len(jax.devices()) < n:
            raise ArtifactError(
                f"{where}: sharded over a mesh {axes} ({n} devices); this process has "
                f"{len(jax.devices())}"
            )
        from maas_jax.distributed import MeshSpec

        return MeshSpec(axes).build(jax.devices()[:n])
    got = dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True))
    if got != axes:
        raise ArtifactError(f"{where}: exported for a mesh {axes}, given a mesh {got}")
    return mesh


def _load_weights(directory: Path, manifest: dict[str, Any], mesh: Any, where: str) -> list[Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{where}: {WEIGHTS_FILE} cannot be read: {e}") from None
    listed = manifest["weights"].get("tensors", {})
    if set(raw) != set(listed):
        missing, extra = sorted(set(listed) - set(raw)), sorted(set(raw) - set(listed))
        raise ArtifactError(
            f"{where}: {WEIGHTS_FILE} does not hold the manifest's tensors "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    out = []
    for path, info in listed.items():  # manifest order is the program's parameter order
        arr = raw[path]
        kind = info["dtype"]
        if kind not in _NATIVE_SAFETENSORS:
            import ml_dtypes  # jax's own dependency: bfloat16, float8 types

            arr = arr.view(np.dtype(getattr(ml_dtypes, kind)))
        if np.dtype(arr.dtype).name != kind or list(arr.shape) != list(info["shape"]):
            raise ArtifactError(
                f"{where}: tensor {path!r} is {np.dtype(arr.dtype).name}{list(arr.shape)}, "
                f"the manifest says {kind}{info['shape']}"
            )
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            spec = PartitionSpec(
                *[tuple(e) if isinstance(e, list) else e for e in info.get("spec") or ()]
            )
            out.append(jax.device_put(arr, NamedSharding(mesh, spec)))
        else:
            out.append(jax.device_put(arr))
    return out


@dataclasses.dataclass(eq=False)
class Artifact:
    """A loaded artifact: call it like the program without its parameters.

    ``artifact(*inputs)`` takes any batch size (each new size compiles once) and returns the
    program's output pytree; :meth:`run` is the server's named, bucketed entry point.
    """

    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch_sizes: tuple[int, ...]
    manifest: dict[str, Any]
    directory: Path
    exported: dict[int, Any]  # bucket -> jax.export.Exported
    params: list[Any]
    mesh: Any = None
    warmup_rows: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self._calls = {b: jax.jit(e.call) for b, e in self.exported.items()}

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server reports as model metadata (recipe, sizes, versions)."""
        m = self.manifest
        return {
            "recipe": m.get("recipe"),
            "sizes": m.get("sizes"),
            "versions": m.get("versions"),
            "platforms": m.get("platforms"),
        }

    def __repr__(self) -> str:
        sig = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in self.inputs)
        return f"Artifact({self.name!r}, version={self.version!r}, ({sig}), buckets={self.batch_sizes})"

    def flat_call(self, *flat_inputs: Any) -> list[Any]:
        """Flat inputs (manifest order, batch first) -> flat outputs (manifest order).

        A batch that is not a bucket is padded with zero rows to the next bucket (and cut
        into pieces of the largest bucket when it is larger); the padding rows are dropped.
        """
        n = int(np.shape(flat_inputs[0])[0])
        if n in self._calls:
            return list(self._calls[n](self.params, *flat_inputs))
        top = self.batch_sizes[-1]
        pieces = []
        for start in range(0, n, top):
            chunk = [x[start : start + top] for x in flat_inputs]
            rows = int(np.shape(chunk[0])[0])
            bucket = next(b for b in self.batch_sizes if b >= rows)
            padded = [_pad_rows(x, bucket) for x in chunk]
            outs = self._calls[bucket](self.params, *padded)
            pieces.append([o[:rows] for o in outs])
        if len(pieces) == 1:
            return pieces[0]
        return [jax.numpy.concatenate(parts) for parts in zip(*pieces, strict=True)]

    def __call__(self, *inputs: Any) -> Any:
        leaves = jax.tree.leaves(inputs)
        if len(leaves) != len(self.inputs):
            raise ArtifactError(
                f"{self.name}: takes {len(self.inputs)} inputs "
                f"({', '.join(s.name for s in self.inputs)}), got {len(leaves)}"
            )
        flat = [self._coerce(s, x) for s, x in zip(self.inputs, leaves, strict=True)]
        outs = self.flat_call(*flat)
        if len(outs) == 1:
            return outs[0]
        return {s.name: o for s, o in zip(self.outputs, outs, strict=True)}

    def _coerce(self, spec: TensorSpec, x: Any) -> Any:
        shape = tuple(np.shape(x))
        if len(shape) != len(spec.shape) or shape[1:] != spec.shape[1:] or shape[0] < 1:
            raise ArtifactError(
                f"{self.name}: input {spec.name!r} expects shape {list(spec.shape)} "
                f"(-1 = any batch), got {list(shape)}"
            )
        dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
        if dtype != np.dtype(spec.dtype):
            raise ArtifactError(
                f"{self.name}: input {spec.name!r} expects {spec.dtype}, got {dtype.name}"
            )
        return x

    # -- the ServedModel protocol (maas_jax.serve) -------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        flat = [inputs[s.name] for s in self.inputs]
        outs = self.flat_call(*flat)
        return {s.name: np.asarray(o) for s, o in zip(self.outputs, outs, strict=True)}

    def warmup(self) -> None:
        """Compile and run every bucket once (with the stored warmup rows, else zeros)."""
        for b in self.batch_sizes:
            feed = {}
            for s in self.inputs:
                if self.warmup_rows is not None and s.name in self.warmup_rows:
                    rows = self.warmup_rows[s.name]
                    feed[s.name] = rows[np.arange(b) % len(rows)]
                else:
                    feed[s.name] = np.zeros((b, *s.shape[1:]), np.dtype(s.dtype))
            jax.block_until_ready(self.flat_call(*[feed[s.name] for s in self.inputs]))

    @property
    def stored_bytes(self) -> int:
        return int(self.manifest.get("sizes", {}).get("stored_bytes") or 0)


def _pad_rows(x: Any, rows: int) -> Any:
    n = int(np.shape(x)[0])
    if n == rows:
        return x
    pad = jax.numpy.zeros((rows - n, *np.shape(x)[1:]), x.dtype)
    return jax.numpy.concatenate([jax.numpy.asarray(x), pad])


def directory_bytes(directory: str | os.PathLike[str]) -> int:
    """Total size of the files an artifact's manifest lists, plus the manifest."""
    directory = Path(directory)
    m = json.loads((directory / MANIFEST).read_text())
    return (directory / MANIFEST).stat().st_size + sum(e["bytes"] for e in m["files"].values())


__all__ = [
    "Artifact",
    "ArtifactError",
    "FORMAT_VERSION",
    "check_compatible",
    "directory_bytes",
    "load",
    "read_manifest",
    "reference_fn",
    "save",
]
