"""Checkpoints of parameters, optimizer state, pass state and the recipe that made them.

One step of a checkpoint directory holds up to five Orbax items, saved through
``orbax.checkpoint.CheckpointManager`` with ``args.Composite``:

* ``params``, ``opt_state``, ``pass_state`` — array pytrees (``StandardSave``), written shard by
  shard from wherever the arrays live (one process or many);
* ``recipe`` — the JSON list/dict describing the pipeline of passes (``JsonSave``), stored and
  returned as is;
* ``metadata`` — our JSON record: the user's metadata, a *fingerprint* of every saved tree
  (each leaf's ``/``-joined path, shape and dtype), a 64-bit checksum per leaf, and the
  jax / maas_jax / orbax versions.

Saves are asynchronous (the arrays are copied to host, the files are written by a background
thread; ``wait_until_finished`` joins it) and atomic: Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only once every item is
committed, so an interrupted save never shows up in ``all_steps()``.

Restoring always goes through *abstract targets*: ``jax.ShapeDtypeStruct`` trees whose
``.sharding`` is where each leaf should land now. That is what lets a checkpoint written on a
2×4 mesh come back on a 4×2 mesh, an 8×1 mesh or one device (Orbax reads just the slices each
device needs), and what makes optax states come back as their own NamedTuples instead of
dicts (DESIGN.md §3). The shardings come from ``restore(shardings=...)`` or from the target
leaves; optimizer and pass state leaves whose path ends with a parameter's path and whose
shape equals it (optax ``mu``/``nu``, pruning masks) follow that parameter's sharding, the rest
are replicated over the parameters' devices.

Why our own metadata on top of Orbax's: Orbax restores a tree of the wrong shapes with a
tensorstore error that names neither the model nor the leaf, and — measured with
orbax-checkpoint 0.12.8 — a flipped byte inside a compressed array file restores *silently*
with wrong values. The fingerprint turns the first into "leaf ``dense_1/kernel`` is
float32[32,8] in the checkpoint, float32[32,16] in ``target_params``"; the checksums (computed
on device, so they work on sharded and multi-process arrays without gathering them) turn the
second into an error. Every Orbax/tensorstore failure is re-raised as :class:`CheckpointError`
naming the directory, step and item.

>>> import tempfile, jax, jax.numpy as jnp
>>> from maas_jax import checkpoint
>>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
>>> d = tempfile.mkdtemp()
>>> _ = checkpoint.save(d, 1, params=params, recipe=[{"pass": "dce"}], metadata={"run": "a"})
>>> r = checkpoint.restore(d, target_params=jax.eval_shape(lambda: params))
>>> r.step, r.recipe, r.metadata, r.params["dense"]["kernel"].shape
(1, [{'pass': 'dce'}], {'run': 'a'}, (2, 3))
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from maas_jax._errors import MaasError
from maas_jax._paths import flatten_leaves

__all__ = ["CheckpointError", "Checkpointer", "Restored", "restore", "save"]

_FORMAT = "maas_jax.checkpoint"
_FORMAT_VERSION = 1
_ARRAY_ITEMS = ("params", "opt_state", "pass_state")
_MAX_CAUSE_CHARS = 400


class CheckpointError(MaasError):
    """A checkpoint cannot be written or read: missing, of another model, or corrupted."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`restore` returns.

    Attributes:
        params: the parameter tree, on the requested shardings.
        opt_state: the optimizer state (its own types, e.g. optax NamedTuples), or ``None``
            when no ``target_opt_state`` was given.
        pass_state: the pass state tree, or ``None`` when no ``target_pass_state`` was given.
        recipe: the JSON recipe saved with the step, or ``None``.
        metadata: the user metadata saved with the step, exactly as given (``None`` if none).
        step: the step restored.
        info: our record of the step: ``versions`` (jax, maas_jax, orbax) and ``items`` (per
            saved tree, the ``[path, shape, dtype, checksum]`` of every leaf).
    """

    params: Any
    opt_state: Any
    pass_state: Any
    recipe: Any
    metadata: Any
    step: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------
# Leaf descriptions, fingerprints and checksums
# --------------------------------------------------------------------------------------------


def _is_extended(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def _dtype_name(dtype: Any) -> str:
    return str(dtype) if _is_extended(dtype) else np.dtype(dtype).name


def _describe(shape: Sequence[int], dtype: str) -> str:
    return f"{dtype}[{','.join(str(int(d)) for d in shape)}]"


def _array_leaves(item: str, tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``tree``; every leaf must be an array."""
    out = []
    for leaf in flatten_leaves(tree):
        value = leaf.value
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise CheckpointError(
                f"{item} leaf {leaf.path!r} is a {type(value).__name__}, not an array: "
                "checkpoints hold array trees. Wrap it, e.g. `jnp.asarray(value)`."
            )
        canonical = value.dtype
        if not _is_extended(value.dtype):
            canonical = jax.dtypes.canonicalize_dtype(value.dtype)
        if canonical != value.dtype:
            raise CheckpointError(
                f"{item} leaf {leaf.path!r} is {_dtype_name(value.dtype)} but jax_enable_x64 is "
                f"off: it would be restored as {_dtype_name(canonical)}. Cast it, or enable "
                "x64 before saving and restoring."
            )
        out.append((leaf.path, value))
    return out


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a uint32 array (one or more words per element, any layout)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return _words(jax.random.key_data(x))
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
    if dtype.name in ("int4", "uint4", "int2", "uint2"):
        x = x.astype(jnp.int8 if dtype.name.startswith("int") else jnp.uint8)
        dtype = np.dtype(x.dtype)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _checksum_words(x: jax.Array) -> jax.Array:
    """Two position-weighted 32-bit sums of the bits of ``x`` (uint32[2]).

    The weights are odd, so changing any single word changes the first sum; the second mixes
    the bits non-linearly. Modular integer sums are associative, so the result does not
    depend on how ``x`` is sharded or on the reduction order: it is the same on the mesh the
    checkpoint was saved from and on the one it is restored onto.
    """
    w = _words(x)
    # Row-major element index, built per dimension: reshaping a sharded array to 1-D would
    # make XLA gather it.
    idx = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(w.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= w.shape[dim]
    odd = idx * jnp.uint32(2) + jnp.uint32(1)
    s1 = jnp.sum(w * (odd * jnp.uint32(0x9E3779B1)), dtype=jnp.uint32)
    mixed = (w ^ (w >> jnp.uint32(15))) * jnp.uint32(0x2C1B3C6D)
    mixed = mixed ^ (mixed >> jnp.uint32(12))
    s2 = jnp.sum(mixed * (odd * jnp.uint32(0x85EBCA6B)), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


@jax.jit
def _checksum_batch(values: list[jax.Array]) -> jax.Array:
    return jnp.stack([_checksum_words(x) for x in values])


CHECKSUM_BATCH = 32  # leaves per compiled checksum program


def _checksums(leaves: list[tuple[str, Any]]) -> list[str]:
    """Hex checksums of the leaves, computed on their devices.

    Bounded batches, each one compiled program read back before the next starts: dispatching
    one sharded reduction per leaf all at once makes XLA's CPU collectives give up ("Termination
    timeout for all reduce") and abort the process once there are a few dozen sharded leaves.
    Inside one program the reductions are scheduled one after another.
    """
    # One program takes arrays on one set of devices: group the leaves by it.
    groups: dict[Any, list[int]] = {}
    for i, (_, value) in enumerate(leaves):
        sharding = getattr(value, "sharding", None)
        key = None if sharding is None else frozenset(d.id for d in sharding.device_set)
        groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(leaves)
    for idx in groups.values():
        for start in range(0, len(idx), CHECKSUM_BATCH):
            chunk = idx[start : start + CHECKSUM_BATCH]
            words = np.asarray(_checksum_batch([leaves[i][1] for i in chunk])).tolist()
            for i, (s1, s2) in zip(chunk, words, strict=True):
                out[i] = f"{int(s1):08x}{int(s2):08x}"
    return out


def _globalize(tree: Any) -> Any:
    """In a multi-process job, make host-local jax arrays global (replicated) ones.

    Orbax refuses to write an array that lives on one process's devices only (e.g. optax's
    ``count``, created by ``tx.init`` outside ``jit``). Such leaves are replicated state: every
    process holds the same value, so we lay it out replicated over all devices (each process
    supplies its own copy; the primary replica is written).
    """
    if jax.process_count() == 1:
        return tree
    everywhere = NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), PartitionSpec()
    )

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, everywhere, lambda idx: host[idx])
        return x

    return jax.tree.map(one, tree)


def _describe_leaves(leaves: list[tuple[str, Any]], checksums: list[str]) -> list[list[Any]]:
    return [
        [path, [int(d) for d in value.shape], _dtype_name(value.dtype), checksum]
        for (path, value), checksum in zip(leaves, checksums, strict=True)
    ]


def _versions() -> dict[str, str]:
    import maas_jax  # the package is initialised by the time anyone saves

    return {
        "jax": jax.__version__,
        "maas_jax": getattr(maas_jax, "__version__", "unknown"),
        "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
    }


def _recipe_json(recipe: Any) -> Any:
    """A pipeline or pass as its recipe dict (the form recipe files and artifacts use)."""
    if recipe is None or isinstance(recipe, dict | list | str | int | float | bool):
        return recipe
    from maas_jax import recipe as recipes
    from maas_jax._errors import MaasError

    try:
        return recipes.to_dict(recipe)
    except MaasError as e:
        raise CheckpointError(f"recipe: {e}") from e


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{name} must be JSON-serialisable (dicts with str keys, lists, str, numbers, "
            f"bools, None): {e}"
        ) from e


def _short(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= _MAX_CAUSE_CHARS else text[:_MAX_CAUSE_CHARS] + " …"


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------


def _as_path(directory: str | os.PathLike[str]) -> epath.Path:
    path = epath.Path(directory)
    return path if "://" in os.fspath(directory) else epath.Path(os.path.abspath(path))


class Checkpointer:
    """A checkpoint directory: asynchronous, atomic saves of model, optimizer and pass state.

    Wraps ``orbax.checkpoint.CheckpointManager``. Every process of a multi-process job must
    create the Checkpointer and call ``save`` / ``restore`` with the same arguments (Orbax
    synchronises them; each writes its own shards).

    Args:
        directory: the root directory (local path or any path Orbax supports); created if
            missing.
        max_to_keep: keep at most this many most recent steps; ``None`` keeps all.
        async_save: if true, ``save`` returns once the arrays are copied off the devices and
            a background thread writes the files; call ``wait_until_finished`` (or ``close``)
            before relying on the step being on disk.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> from maas_jax.checkpoint import Checkpointer
        >>> with Checkpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
        ...     for step in range(3):
        ...         _ = ckpt.save(step, params={"w": jnp.full(2, step)})
        ...     ckpt.wait_until_finished()
        ...     ckpt.all_steps(), ckpt.latest_step()
        ([1, 2], 2)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        self._directory = _as_path(directory)
        self._async = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self._directory, options=options)
        except Exception as e:
            raise CheckpointError(
                f"cannot open checkpoint directory {self._directory}: {_short(e)}"
            ) from e

    # -- inspection ------------------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        """The checkpoint root directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """The finalised steps, ascending (in-flight and interrupted saves are not listed)."""
        # Read the directory rather than the manager's cache: the cache lists a step as soon
        # as its asynchronous save starts, the directory only once it is finalised.
        return sorted(int(s) for s in ocp.utils.checkpoint_steps(self._directory))

    def latest_step(self) -> int | None:
        """The newest finalised step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any = None,
        pass_state: Any = None,
        recipe: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Start saving ``step``; returns ``True`` once the save is under way.

        Args:
            step: a non-negative integer not yet saved in this directory.
            params: the parameter pytree (jax or numpy arrays, any sharding).
            opt_state: the optimizer state pytree (e.g. an optax state), or ``None``.
            pass_state: the pass state pytree (masks, scales, statistics), or ``None``.
            recipe: the pass pipeline: a :class:`maas_jax.Pipeline` or pass (stored as its
                recipe dict, :func:`maas_jax.recipe.to_dict`; rebuild it with
                ``recipe.from_dict(restored.recipe)``), a JSON-serialisable list/dict, or
                ``None``.
            metadata: a JSON-serialisable dict stored with the step, or ``None``.

        Raises:
            CheckpointError: the step exists already, a tree has a non-array leaf, the recipe
                or metadata is not JSON, or Orbax failed to start the save.
        """
        if not isinstance(step, int | np.integer) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if params is None:
            raise CheckpointError("params is required")
        recipe = _recipe_json(recipe)
        _check_json("recipe", recipe)
        _check_json("metadata", metadata)
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}")

        trees = {"params": params, "opt_state": opt_state, "pass_state": pass_state}
        items: dict[str, Any] = {}
        described: dict[str, Any] = {}
        for name, tree in trees.items():
            if tree is None:
                continue
            tree = _globalize(tree)
            leaves = _array_leaves(name, tree)
            described[name] = {"leaves": _describe_leaves(leaves, _checksums(leaves))}
            items[name] = ocp.args.StandardSave(tree)
        if recipe is not None:
            items["recipe"] = ocp.args.JsonSave(recipe)
        record = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "step": step,
            "versions": _versions(),
            "items": described,
            "has_recipe": recipe is not None,
            "user": metadata,
        }
        items["metadata"] = ocp.args.JsonSave(record)

        existing = self.all_steps()
        if step in existing:
            raise CheckpointError(
                f"step {step} already exists in {self._directory} (steps: {existing}); "
                "save under a new step or delete that directory first"
            )
        try:
            # force: the default save-interval policy would silently skip steps below the
            # latest one; we decide what to save.
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(
                f"step {step} already exists in {self._directory} (a save of it may be in "
                "flight); save under a new step"
            ) from e
        except Exception as e:
            raise CheckpointError(
                f"saving step {step} to {self._directory} failed: {_short(e)}"
            ) from e

    def wait_until_finished(self) -> None:
        """Block until every save started so far is written and finalised.

        Raises:
            CheckpointError: a background save failed.
        """
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointError(
                f"an asynchronous save to {self._directory} failed: {_short(e)}"
            ) from e

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- restoring -------------------------------------------------------------------------

    def restore(
        self,
        step: int | None = None,
        *,
        target_params: Any,
        target_opt_state: Any = None,
        target_pass_state: Any = None,
        shardings: Any = None,
        verify: bool = True,
    ) -> Restored:
        """Same as :func:`restore` on this Checkpointer."""
        return restore(
            self,
            step,
            target_params=target_params,
            target_opt_state=target_opt_state,
            target_pass_state=target_pass_state,
            shardings=shardings,
            verify=verify,
        )

    def __repr__(self) -> str:
        return f"Checkpointer({os.fspath(self._directory)!r}, async_save={self._async})"


def save(
    directory: str | os.PathLike[str],
    step: int,
    *,
    params: Any,
    opt_state: Any = None,
    pass_state: Any = None,
    recipe: Any = None,
    metadata: dict[str, Any] | None = None,
    wait: bool = True,
) -> Checkpointer:
    """Save one step to ``directory`` (keeping every other step there).

    Args:
        directory: the checkpoint root directory (created if missing).
        step: a non-negative integer not yet saved there.
        params: the parameter pytree.
        opt_state: the optimizer state pytree, or ``None``.
        pass_state: the pass state pytree (masks, scales, ...), or ``None``.
        recipe: the pass pipeline (a :class:`maas_jax.Pipeline`, stored as its recipe dict) or
            a JSON-serialisable description of it, or ``None``.
        metadata: a JSON-serialisable dict, or ``None``.
        wait: block until the step is on disk; with ``False`` the files are written in the
            background and the caller must call ``wait_until_finished()`` on the result.

    Returns:
        The :class:`Checkpointer` used (finished if ``wait``).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> from maas_jax import checkpoint
        >>> d = tempfile.mkdtemp()
        >>> checkpoint.save(d, 7, params={"w": jnp.ones(3)}).all_steps()
        [7]
    """
    ckpt = Checkpointer(directory, max_to_keep=None, async_save=True)
    ckpt.save(
        step,
        params=params,
        opt_state=opt_state,
        pass_state=pass_state,
        recipe=recipe,
        metadata=metadata,
    )
    if wait:
        ckpt.wait_until_finished()
    return ckpt


# --------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------


def _replicated_like(sharding: Sharding) -> Sharding:
    """A fully replicated sharding over the same devices as ``sharding``."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if isinstance(sharding, SingleDeviceSharding) or len(sharding.device_set) == 1:
        return sharding
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return NamedSharding(jax.sharding.Mesh(devices, ("replica",)), PartitionSpec())


def _fits(sharding: Sharding, shape: tuple[int, ...]) -> str | None:
    """``None`` if ``sharding`` can lay out an array of ``shape``, else why not."""
    try:
        sharding.shard_shape(shape)
    except Exception as e:  # IndexError (rank), ValueError subclasses (divisibility)
        return _short(e)
    return None


def _default_sharding(item: str, path: str) -> Sharding:
    if jax.process_count() > 1:
        raise CheckpointError(
            f"{item} leaf {path!r} has no sharding: in a multi-process job every target leaf "
            "needs one. Pass `shardings=` or targets carrying `.sharding`."
        )
    return SingleDeviceSharding(jax.local_devices()[0])


def _param_shardings(
    target_params: list[tuple[str, Any]], shardings: Any
) -> list[tuple[str, tuple[int, ...], Sharding]]:
    """``(path, shape, sharding)`` per parameter leaf, from ``shardings`` or the leaves."""
    if shardings is None:
        chosen = []
        for path, value in target_params:
            s = getattr(value, "sharding", None)
            chosen.append(s if isinstance(s, Sharding) else _default_sharding("params", path))
    elif isinstance(shardings, Sharding):
        chosen = [shardings] * len(target_params)
    else:
        chosen = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, Sharding))
        bad = [s for s in chosen if not isinstance(s, Sharding)]
        if bad or len(chosen) != len(target_params):
            raise CheckpointError(
                "shardings must be a jax.sharding.Sharding or a pytree of them shaped like "
                f"target_params ({len(target_params)} leaves); got "
                + (f"a {type(bad[0]).__name__} leaf" if bad else f"{len(chosen)} leaves")
            )
    out = []
    for (path, value), s in zip(target_params, chosen, strict=True):
        shape = tuple(int(d) for d in value.shape)
        why = _fits(s, shape)
        if why is not None:
            raise CheckpointError(
                f"params leaf {path!r} ({_describe(shape, _dtype_name(value.dtype))}) cannot "
                f"take the sharding {s}: {why}"
            )
        out.append((path, shape, s))
    return out


def _state_sharding(
    path: str,
    value: Any,
    params: list[tuple[str, tuple[int, ...], Sharding]],
    use_own: bool,
    item: str,
) -> Sharding:
    """Sharding of an optimizer / pass state leaf.

    Its own (when no ``shardings`` were given and it has one); else the sharding of the
    longest parameter path it ends with, if the shapes agree (optax ``mu/<param path>``,
    ``masks/<param path>``); else replicated over the parameters' devices.
    """
    own = getattr(value, "sharding", None)
    if use_own and isinstance(own, Sharding):
        return own
    shape = tuple(int(d) for d in value.shape)
    best: tuple[int, Sharding] | None = None
    for ppath, pshape, s in params:
        if pshape == shape and (path == ppath or path.endswith("/" + ppath)):
            if best is None or len(ppath) > best[0]:
                best = (len(ppath), s)
    if best is not None:
        return best[1]
    if params:
        return _replicated_like(params[0][2])
    return _default_sharding(item, path)


def _abstract(tree: Any, leaves: list[tuple[str, Any]], shardings: list[Sharding]) -> Any:
    sds = [
        jax.ShapeDtypeStruct(tuple(value.shape), value.dtype, sharding=s)
        for (_, value), s in zip(leaves, shardings, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), sds)


def _compare_fingerprint(
    where: str, item: str, saved: list[list[Any]], target: list[tuple[str, Any]]
) -> None:
    """Raise naming the first leaf whose path, shape or dtype differs."""
    saved_map = {entry[0]: (list(entry[1]), entry[2]) for entry in saved}
    target_map = {
        path: ([int(d) for d in value.shape], _dtype_name(value.dtype)) for path, value in target
    }
    diffs = []
    for path, (shape, dtype) in saved_map.items():
        if path not in target_map:
            diffs.append(
                f"leaf {path!r} is {_describe(shape, dtype)} in the checkpoint but absent "
                f"from target_{item}"
            )
        elif target_map[path] != (shape, dtype):
            tshape, tdtype = target_map[path]
            diffs.append(
                f"leaf {path!r} is {_describe(shape, dtype)} in the checkpoint but "
                f"{_describe(tshape, tdtype)} in target_{item}"
            )
    for path, (shape, dtype) in target_map.items():
        if path not in saved_map:
            diffs.append(
                f"leaf {path!r} is {_describe(shape, dtype)} in target_{item} but absent from "
                "the checkpoint"
            )
    if diffs:
        more = f" ({len(diffs) - 1} more leaves differ)" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"{where} holds another model: {item} {diffs[0]}{more}. Restore with targets "
            "built from the same model and optimizer as the saved one."
        )


def restore(
    directory_or_checkpointer: str | os.PathLike[str] | Checkpointer,
    step: int | None = None,
    *,
    target_params: Any,
    target_opt_state: Any = None,
    target_pass_state: Any = None,
    shardings: Any = None,
    verify: bool = True,
) -> Restored:
    """Restore a step onto the shardings you ask for, checking it is the model you expect.

    The targets are only read for their structure, shapes, dtypes and shardings (arrays,
    ``jax.ShapeDtypeStruct`` or ``jax.eval_shape`` outputs all do); no target data is used.

    Args:
        directory_or_checkpointer: a checkpoint root directory or a :class:`Checkpointer`
            (whose pending saves are waited for first).
        step: the step to restore; ``None`` restores the latest.
        target_params: a pytree like the saved parameters.
        target_opt_state: a pytree like the saved optimizer state (e.g.
            ``jax.eval_shape(tx.init, params)``) to restore it as its own types, or ``None``
            to skip it.
        target_pass_state: a pytree like the saved pass state, or ``None`` to skip it.
        shardings: where to put the restored arrays: a pytree of ``jax.sharding.Sharding``
            shaped like ``target_params``, or one sharding for every parameter. State leaves
            follow the parameter whose path ends theirs with the same shape, otherwise they
            are replicated over the parameters' devices. ``None`` takes every leaf's own
            ``.sharding`` (a single device when it has none, in a one-process job).
        verify: recompute each restored leaf's checksum (on device) and compare it with the
            one saved.

    Returns:
        A :class:`Restored` with the trees, recipe, user metadata and step.

    Raises:
        CheckpointError: the directory or step does not exist (the message lists the steps
            there), the checkpoint holds another model (names the first differing leaf with
            its shape and dtype on both sides), a requested item was not saved, a sharding
            does not fit, or the files are corrupted (names the step and item).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, optax
        >>> from maas_jax import checkpoint
        >>> params = {"w": jnp.arange(8.0)}
        >>> tx = optax.adam(1e-3)
        >>> d = tempfile.mkdtemp()
        >>> _ = checkpoint.save(d, 0, params=params, opt_state=tx.init(params))
        >>> one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> r = checkpoint.restore(d, target_params=params,
        ...                        target_opt_state=jax.eval_shape(tx.init, params),
        ...                        shardings=one)
        >>> type(r.opt_state[0]).__name__, r.params["w"].sharding == one
        ('ScaleByAdamState', True)
    """
    if target_params is None:
        raise CheckpointError("target_params is required")
    targets = {
        "params": target_params,
        "opt_state": target_opt_state,
        "pass_state": target_pass_state,
    }
    if isinstance(directory_or_checkpointer, Checkpointer):
        directory_or_checkpointer.wait_until_finished()
        return _restore(directory_or_checkpointer, step, targets, shardings, verify)
    path = _as_path(directory_or_checkpointer)
    if not path.exists():
        raise CheckpointError(f"no checkpoint directory {path}: it does not exist")
    ckpt = Checkpointer(path, max_to_keep=None, async_save=False)
    try:
        return _restore(ckpt, step, targets, shardings, verify)
    finally:
        ckpt._manager.close()


def _restore(
    ckpt: Checkpointer, step: int | None, targets: dict[str, Any], shardings: Any, verify: bool
) -> Restored:
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}: it holds no saved step")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint at step {step} in {ckpt.directory}; available steps: {steps}"
        )
    where = f"checkpoint step {step} in {ckpt.directory}"
    manager = ckpt._manager

    def read(args: dict[str, Any], item: str) -> dict[str, Any]:
        try:
            return manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(
                f"{where} is corrupted or unreadable: item {item!r} failed to restore: {_short(e)}"
            ) from e

    record = read({"metadata": ocp.args.JsonRestore()}, "metadata")["metadata"]
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise CheckpointError(
            f"{where} was not written by maas_jax.checkpoint (its 'metadata' item is not ours)"
        )

    saved_items = record.get("items", {})
    leaves: dict[str, list[tuple[str, Any]]] = {}
    for item, tree in targets.items():
        if tree is None:
            continue
        if item not in saved_items:
            raise CheckpointError(
                f"{where} has no {item} (it holds {sorted(saved_items)}); pass target_{item}=None"
            )
        leaves[item] = _array_leaves(f"target_{item}", tree)
        _compare_fingerprint(where, item, saved_items[item]["leaves"], leaves[item])

    param_sh = _param_shardings(leaves["params"], shardings)
    args: dict[str, Any] = {
        "params": ocp.args.StandardRestore(
            _abstract(targets["params"], leaves["params"], [s for _, _, s in param_sh])
        )
    }
    for item in ("opt_state", "pass_state"):
        if item in leaves:
            state_sh = [
                _state_sharding(p, v, param_sh, shardings is None, item) for p, v in leaves[item]
            ]
            args[item] = ocp.args.StandardRestore(_abstract(targets[item], leaves[item], state_sh))
    if record.get("has_recipe"):
        args["recipe"] = ocp.args.JsonRestore()

    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
        # Find the item that fails on its own, to name it.
        for item in args:
            read({item: args[item]}, item)
        raise CheckpointError(f"{where} failed to restore: {_short(e)}") from e

    if verify:
        for item in leaves:
            out = _array_leaves(item, restored[item])
            saved_sums = {entry[0]: entry[3] for entry in saved_items[item]["leaves"]}
            for (path, _), checksum in zip(out, _checksums(out), strict=True):
                if saved_sums.get(path, checksum) != checksum:
                    raise CheckpointError(
                        f"{where} is corrupted: item {item!r} leaf {path!r} read back with "
                        f"checksum {checksum}, saved with {saved_sums[path]} (an array file "
                        "was altered after the save)"
                    )

    return Restored(
        params=restored["params"],
        opt_state=restored["opt_state"] if "opt_state" in args else None,
        pass_state=restored["pass_state"] if "pass_state" in args else None,
        recipe=restored["recipe"] if "recipe" in args else None,
        metadata=record.get("user"),
        step=step,
        info={k: v for k, v in record.items() if k != "user"},
    )
