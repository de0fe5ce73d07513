"""Multi-host wiring that runs unchanged on one CPU, a TPU pod or a GPU cluster.

Four pieces, each usable on its own:

* :class:`MeshSpec` describes a device mesh by axis names and sizes (one size may be ``-1``,
  "whatever is left"), independent of the machine. ``build()`` turns it into a
  :class:`jax.sharding.Mesh` for the devices at hand, including multi-slice / multi-node
  layouts where part of an axis crosses the slow data-centre network (``dcn_axes``).
* :func:`initialize` wraps :func:`jax.distributed.initialize`: idempotent, reads
  ``MAAS_COORDINATOR`` / ``MAAS_NUM_PROCESSES`` / ``MAAS_PROCESS_ID`` when arguments are
  omitted, lets jax auto-detect TPU / Slurm / Open MPI clusters, selects the gloo CPU
  collectives, and degrades to a single process when there is nothing to join.
* :func:`process_batch` says which rows of the global batch this process must load, so that
  every process reads only its own part of the data.
* :func:`make_global_batch` assembles the per-process rows into one global :class:`jax.Array`
  sharded over the mesh, with shape checks.

The same training script then works everywhere:

.. code-block:: python

    from jax.sharding import NamedSharding, PartitionSpec as P
    from maas_jax import distributed as dist

    info = dist.initialize()                       # no-op on a laptop
    mesh = dist.MeshSpec({"data": -1}).build()     # all devices of all processes
    start, stop = dist.process_batch(global_batch, mesh)
    local = load_rows(start, stop)                 # this process's rows only
    batch = dist.make_global_batch(local, mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    params = jax.jit(train_step)(params, batch)

Only public jax APIs are used (``jax``, ``jax.sharding``, ``jax.distributed``,
``jax.experimental.mesh_utils``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:  # public, but experimental: keep a fallback if a jax release drops it
    from jax.experimental.mesh_utils import create_device_mesh as _create_device_mesh
    from jax.experimental.mesh_utils import create_hybrid_device_mesh as _create_hybrid_device_mesh
except ImportError:  # pragma: no cover - depends on the jax release
    _create_device_mesh = None
    _create_hybrid_device_mesh = None

__all__ = [
    "DistributedInfo",
    "MeshSpec",
    "initialize",
    "make_global_batch",
    "process_batch",
]

ENV_COORDINATOR = "MAAS_COORDINATOR"
ENV_NUM_PROCESSES = "MAAS_NUM_PROCESSES"
ENV_PROCESS_ID = "MAAS_PROCESS_ID"

#: The default batch ``PartitionSpec``: leading (batch) dimension sharded over ``"data"``.
DATA_SPEC = P("data")


# ---- MeshSpec ------------------------------------------------------------------------------


def _normalize_axes(axes: Any, what: str) -> tuple[tuple[str, int], ...]:
    """``{"data": 2}`` or ``(("data", 2),)`` -> ``(("data", 2),)``, with name/size checks."""
    if isinstance(axes, Mapping):
        items = list(axes.items())
    else:
        try:
            items = [tuple(item) for item in axes]
        except TypeError:
            raise TypeError(
                f"{what} must be a dict {{name: size}} or a sequence of (name, size) pairs, "
                f"got {axes!r}"
            ) from None
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for item in items:
        if len(item) != 2:
            raise ValueError(f"{what}: expected (name, size) pairs, got {item!r}")
        name, size = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: axis names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"{what}: duplicate axis name {name!r}")
        seen.add(name)
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"{what}: size of axis {name!r} must be an int, got {size!r}")
        out.append((name, int(size)))
    return tuple(out)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


class MeshSpec:
    """A device mesh described by axis names and sizes, independent of the machine.

    The same spec builds a mesh on one CPU with fake devices, a TPU pod slice, several TPU
    slices or a GPU cluster: sizes are checked against the devices only in :meth:`build`.

    Args:
        axes: Axis names and sizes, in mesh order (outermost first), as a dict
            ``{"data": -1, "model": 4}`` or a sequence of pairs ``(("data", -1), ("model", 4))``.
            At most one size may be ``-1``; it is filled so that the mesh uses all devices.
        dcn_axes: For multi-slice TPU or multi-node GPU: how much of each axis crosses the
            slow data-centre network (DCN), e.g. ``{"data": 2}`` for two slices that each hold
            half of the ``data`` axis. Axes not named have DCN size 1 (entirely inside a slice
            or node). The size in ``axes`` is the *total* size of the axis; the part inside
            one slice (ICI) is ``total // dcn``.
        explicit: Build the mesh with ``jax.sharding.AxisType.Explicit`` axes. The default,
            ``False``, builds ``AxisType.Auto`` axes: ``jax.make_mesh`` defaults to Explicit
            since jax 0.9, which changes how unannotated operations are sharded and breaks
            unmodified Flax Linen models.

    Raises:
        ValueError: two sizes are ``-1``, a size is 0 or below ``-1``, an axis name is
            repeated, ``dcn_axes`` names an axis not in ``axes``, or a DCN size does not
            divide its axis size.

    Examples:
        >>> import jax
        >>> spec = MeshSpec({"data": -1, "model": 2})
        >>> spec
        MeshSpec({'data': -1, 'model': 2})
        >>> spec.shape(8)
        (4, 2)
        >>> mesh = spec.build()          # 8 devices here
        >>> dict(mesh.shape)
        {'data': 4, 'model': 2}
        >>> mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
        True
        >>> MeshSpec((("data", 2), ("model", 4)), dcn_axes={"data": 2}).build().devices.shape
        (2, 4)
    """

    __slots__ = ("_axes", "_dcn", "_explicit")

    def __init__(
        self,
        axes: Mapping[str, int] | Sequence[tuple[str, int]],
        *,
        dcn_axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
        explicit: bool = False,
    ) -> None:
        norm = _normalize_axes(axes, "MeshSpec axes")
        if not norm:
            raise ValueError("MeshSpec needs at least one axis")
        for name, size in norm:
            if size == 0 or size < -1:
                raise ValueError(
                    f"MeshSpec axes: size of axis {name!r} must be positive or -1, got {size}"
                )
        filled = [name for name, size in norm if size == -1]
        if len(filled) > 1:
            raise ValueError(
                "MeshSpec axes: at most one size may be -1, got -1 for "
                + " and ".join(repr(n) for n in filled)
            )
        names = [name for name, _ in norm]
        dcn = _normalize_axes(dcn_axes or {}, "MeshSpec dcn_axes")
        sizes = dict(norm)
        for name, d in dcn:
            if name not in sizes:
                raise ValueError(
                    f"MeshSpec dcn_axes: unknown axis name {name!r}; the axes are {tuple(names)}"
                )
            if d < 1:
                raise ValueError(
                    f"MeshSpec dcn_axes: DCN size of axis {name!r} must be positive, got {d}"
                )
            if sizes[name] != -1 and sizes[name] % d:
                raise ValueError(
                    f"MeshSpec dcn_axes: DCN size {d} of axis {name!r} does not divide "
                    f"its size {sizes[name]}"
                )
        self._axes = norm
        self._dcn = dict(dcn)
        self._explicit = bool(explicit)

    # -- introspection --

    @property
    def names(self) -> tuple[str, ...]:
        """The axis names, in mesh order."""
        return tuple(name for name, _ in self._axes)

    @property
    def axes(self) -> dict[str, int]:
        """The axis sizes as given (``-1`` not yet filled)."""
        return dict(self._axes)

    @property
    def dcn_axes(self) -> dict[str, int]:
        """The DCN part of every axis (1 for axes not named in ``dcn_axes``)."""
        return {name: self._dcn.get(name, 1) for name in self.names}

    @property
    def explicit(self) -> bool:
        """Whether :meth:`build` makes ``Explicit`` axes (else ``Auto``)."""
        return self._explicit

    @property
    def axis_types(self) -> tuple[AxisType, ...]:
        """The ``jax.sharding.AxisType`` of every axis of the built mesh."""
        kind = AxisType.Explicit if self._explicit else AxisType.Auto
        return (kind,) * len(self._axes)

    def shape(self, device_count: int) -> tuple[int, ...]:
        """The mesh shape for ``device_count`` devices, with ``-1`` filled in.

        Args:
            device_count: The number of devices available.

        Returns:
            The size of every axis, in mesh order.

        Raises:
            ValueError: the mesh needs more devices than ``device_count``, or its size does not
                divide ``device_count`` (a mesh may use a divisor of the devices, never a
                ragged part of them), or a filled ``-1`` axis is not a multiple of its DCN size.

        Examples:
            >>> MeshSpec({"data": -1, "model": 2}).shape(16)
            (8, 2)
            >>> MeshSpec({"data": 2, "model": 8}).shape(8)
            Traceback (most recent call last):
            ...
            ValueError: mesh 2x8 needs 16 devices, only 8 available (axes data=2, model=8)
        """
        desc = ", ".join(f"{n}={s}" for n, s in self._axes)
        known = math.prod(s for _, s in self._axes if s != -1)
        has_fill = any(s == -1 for _, s in self._axes)
        if known > device_count:
            raise ValueError(
                f"mesh {_shape_str(s for _, s in self._axes)} needs "
                f"{'at least ' if has_fill else ''}{known} devices, only {device_count} "
                f"available (axes {desc})"
            )
        if device_count % known:
            raise ValueError(
                f"mesh {_shape_str(s for _, s in self._axes)} ({desc}): the axis sizes "
                f"(product {known}) do not divide the device count {device_count}"
            )
        shape = tuple(device_count // known if s == -1 else s for _, s in self._axes)
        for (name, _), size in zip(self._axes, shape, strict=True):
            d = self._dcn.get(name, 1)
            if size % d:
                raise ValueError(
                    f"mesh {_shape_str(shape)} ({desc}): axis {name!r} filled to {size}, which "
                    f"is not a multiple of its DCN size {d}"
                )
        return shape

    def resolve(self, device_count: int) -> dict[str, int]:
        """``{name: size}`` for ``device_count`` devices (see :meth:`shape`).

        Examples:
            >>> MeshSpec({"data": -1, "model": 2}).resolve(8)
            {'data': 4, 'model': 2}
        """
        return dict(zip(self.names, self.shape(device_count), strict=True))

    # -- building --

    def build(self, devices: Sequence[Any] | None = None) -> Mesh:
        """Build the :class:`jax.sharding.Mesh` for ``devices`` (default: all, ``jax.devices()``).

        Without ``dcn_axes`` the mesh comes from ``jax.make_mesh`` (topology-aware device
        order on TPU/GPU). With ``dcn_axes`` the devices are grouped into "granules" (TPU
        slices, else processes), each granule holds the inner (ICI) part of the mesh and
        the granules are laid out along the DCN part:

        1. ``jax.experimental.mesh_utils.create_hybrid_device_mesh`` with slices as granules,
           when the devices carry a ``slice_index`` and there are exactly ``prod(dcn)``
           equal slices (multi-slice TPU);
        2. the same with processes as granules when there are exactly ``prod(dcn)`` processes
           with equal device counts (multi-node GPU, multi-process CPU);
        3. otherwise (one process faking several nodes, or several processes per DCN
           granule) a reshape: devices sorted by ``(process_index, id)`` are cut into
           ``prod(dcn)`` consecutive groups, so each process's devices stay contiguous along
           the DCN axes, and each group is laid out by
           ``mesh_utils.create_device_mesh`` over the ICI shape.

        If the mesh is smaller than the device count (a divisor of it), the first devices in
        ``(process_index, id)`` order are used.

        Args:
            devices: The devices to lay out; default ``jax.devices()`` (every process's).

        Returns:
            A ``Mesh`` with this spec's axis names, sizes and axis types.

        Raises:
            ValueError: see :meth:`shape`.

        Examples:
            >>> mesh = MeshSpec({"data": 2, "model": 4}, dcn_axes={"data": 2}).build()
            >>> [[d.id for d in row] for row in mesh.devices]
            [[0, 1, 2, 3], [4, 5, 6, 7]]
        """
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("MeshSpec.build: no devices")
        shape = self.shape(len(devices))
        names = self.names
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))[: math.prod(shape)]
        if not self._dcn or all(v == 1 for v in self._dcn.values()):
            return jax.make_mesh(shape, names, axis_types=self.axis_types, devices=ordered)
        dcn = tuple(self._dcn.get(n, 1) for n in names)
        ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
        grid = _hybrid_device_grid(ordered, ici, dcn)
        return Mesh(grid, names, axis_types=self.axis_types)

    # -- dunder --

    def __repr__(self) -> str:
        extra = ""
        if self._dcn:
            extra += f", dcn_axes={self._dcn!r}"
        if self._explicit:
            extra += ", explicit=True"
        return f"MeshSpec({dict(self._axes)!r}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MeshSpec):
            return NotImplemented
        return (self._axes, self.dcn_axes, self._explicit) == (
            other._axes,
            other.dcn_axes,
            other._explicit,
        )

    def __hash__(self) -> int:
        return hash((self._axes, tuple(self.dcn_axes.items()), self._explicit))


def _granules(devices: Sequence[Any], attr: str) -> list[list[Any]] | None:
    if not all(hasattr(d, attr) for d in devices):
        return None
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return [groups[k] for k in sorted(groups)]


def _hybrid_device_grid(
    devices: Sequence[Any], ici: tuple[int, ...], dcn: tuple[int, ...]
) -> np.ndarray:
    """The device array of shape ``ici * dcn`` (elementwise) for a hybrid ICI/DCN mesh.

    ``devices`` must already be sorted by ``(process_index, id)`` and number
    ``prod(ici) * prod(dcn)``.
    """
    n_granules, per_granule = math.prod(dcn), math.prod(ici)
    if _create_hybrid_device_mesh is not None:
        for attr, by_process in (("slice_index", False), ("process_index", True)):
            groups = _granules(devices, attr)
            if (
                groups is not None
                and len(groups) == n_granules
                and all(len(g) == per_granule for g in groups)
            ):
                return _create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    # Fallback: consecutive groups of the (process_index, id)-sorted devices are the granules.
    blocks = []
    for g in range(n_granules):
        chunk = list(devices[g * per_granule : (g + 1) * per_granule])
        if _create_device_mesh is not None:
            blocks.append(np.asarray(_create_device_mesh(ici, chunk)))
        else:  # pragma: no cover - depends on the jax release
            blocks.append(np.asarray(chunk, dtype=object).reshape(ici))
    # (granule..., ici...) -> interleave (dcn_0, ici_0, dcn_1, ici_1, ...) -> total shape:
    # the DCN index is the outer (major) part of every axis, as in create_hybrid_device_mesh.
    stacked = np.empty((n_granules, *ici), dtype=object)
    for g, block in enumerate(blocks):
        stacked[g] = block
    stacked = stacked.reshape(*dcn, *ici)
    n = len(ici)
    order = [i for pair in zip(range(n), range(n, 2 * n), strict=True) for i in pair]
    total = tuple(d * i for d, i in zip(dcn, ici, strict=True))
    return stacked.transpose(order).reshape(total)


# ---- initialize ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in a (possibly single-process) jax job.

    Attributes:
        process_index: This process's index, ``0 <= process_index < process_count``.
        process_count: Number of processes in the job.
        local_device_count: Devices addressable by this process.
        device_count: Devices of all processes together.
        platform: The default backend (``"cpu"``, ``"gpu"``, ``"tpu"``).
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str

    @property
    def is_coordinator(self) -> bool:
        """True on process 0 (the one that should write logs and checkpoints metadata)."""
        return self.process_index == 0


def _info() -> DistributedInfo:
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        platform=jax.default_backend(),
    )


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    **kwargs: Any,
) -> DistributedInfo:
    """Join (or start) the multi-process jax job; a no-op for a single process.

    Call it first thing, before any jax computation (``jax.devices()`` included). It is
    idempotent: later calls return the same information without re-initializing.

    * Omitted arguments are read from ``MAAS_COORDINATOR`` (``host:port`` of process 0),
      ``MAAS_NUM_PROCESSES`` and ``MAAS_PROCESS_ID``.
    * If all three are still unset, :func:`jax.distributed.initialize` is asked to
      auto-detect the cluster (Cloud TPU, Slurm, Open MPI); if there is none, this is a
      single-process run and nothing is initialized.
    * ``num_processes == 1`` is a single-process run: no coordinator service is started.
    * The CPU collectives are set to gloo (unless another implementation was chosen), so
      CPU arrays sharded over several processes can run collectives; TPU and GPU are not
      affected.
    * A loopback coordinator (``127.0.0.1:port``, ``localhost:port``) is also the address
      the coordinator service binds to, instead of jax's default of all interfaces.

    Args:
        coordinator_address: ``host:port`` of process 0's coordinator service.
        num_processes: Number of processes in the job.
        process_id: This process's index in ``range(num_processes)``.
        local_device_count: Number of CPU devices this process exposes
            (``jax_num_cpu_devices``; useful for simulating a multi-host job on one machine).
            It only affects the CPU backend.
        **kwargs: Passed on to :func:`jax.distributed.initialize` (``initialization_timeout``,
            ``local_device_ids``, ``coordinator_bind_address``, ...).

    Returns:
        A :class:`DistributedInfo` with the process index/count and device counts.

    Raises:
        ValueError: a ``MAAS_*`` variable is not an integer, or a call after initialization
            asks for a different ``num_processes`` / ``process_id``.
        RuntimeError: from jax, when a multi-process job, or a different
            ``local_device_count``, is requested after jax has already initialized its
            backends (any computation, ``jax.devices()`` included).

    Examples:
        On one machine (nothing to join) it just reports what is there:

        >>> info = initialize()
        >>> (info.process_index, info.process_count, info.device_count)
        (0, 1, 8)

        Two processes on one machine (run each in its own Python process):

        .. code-block:: python

            info = initialize("127.0.0.1:8476", 2, process_id, local_device_count=4)
            assert info.device_count == 8

        On a TPU pod or a Slurm GPU cluster, ``initialize()`` with no arguments.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)

    if jax.distributed.is_initialized():
        info = _info()
        if num_processes is not None and num_processes != info.process_count:
            raise ValueError(
                f"initialize: already initialized with {info.process_count} processes, "
                f"asked for num_processes={num_processes}"
            )
        if process_id is not None and process_id != info.process_index:
            raise ValueError(
                f"initialize: already initialized as process {info.process_index}, "
                f"asked for process_id={process_id}"
            )
        return info

    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None and jax.config.jax_num_cpu_devices != local_device_count:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))

    if num_processes == 1:
        return _info()

    if coordinator_address is None and num_processes is None and process_id is None:
        # Nothing given: let jax auto-detect a cluster; none found means a single process.
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError:  # "coordinator_address should be defined."
            return _info()
        except RuntimeError:
            if jax.distributed.is_initialized():
                raise
            # Backends already up without a cluster: this is, and stays, a single process.
            return _info()
        return _info()

    if (
        coordinator_address is not None
        and _is_loopback(coordinator_address)
        and "coordinator_bind_address" not in kwargs
        and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    ):
        kwargs["coordinator_bind_address"] = coordinator_address
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    return _info()


# ---- batches -------------------------------------------------------------------------------


def _dim_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _check_spec(mesh: Mesh, spec: P) -> None:
    if not isinstance(spec, P):
        raise TypeError(f"spec must be a jax.sharding.PartitionSpec, got {spec!r}")
    used: list[str] = []
    for entry in spec:
        for name in _dim_axes(entry):
            if name not in mesh.shape:
                raise ValueError(
                    f"spec {spec} names unknown mesh axis {name!r}; "
                    f"the mesh axes are {tuple(mesh.axis_names)}"
                )
            if name in used:
                raise ValueError(f"spec {spec} uses mesh axis {name!r} twice")
            used.append(name)


def _dim_shards(mesh: Mesh, axes: tuple[str, ...]) -> tuple[int, list[int]]:
    """(number of shards of a dim sharded over ``axes``, sorted shard indices of this process).

    Shard ``k`` of the dimension is held by the devices whose coordinates along ``axes``
    (major to minor, in the order listed) flatten to ``k``, as in ``NamedSharding``.
    """
    sizes = [mesh.shape[a] for a in axes]
    n_shards = math.prod(sizes)
    if not axes:
        return 1, [0]
    positions = [mesh.axis_names.index(a) for a in axes]
    me = jax.process_index()
    local: set[int] = set()
    for coords in np.ndindex(mesh.devices.shape):
        if mesh.devices[coords].process_index == me:
            sub = tuple(coords[p] for p in positions)
            local.add(int(np.ravel_multi_index(sub, sizes)))
    return n_shards, sorted(local)


def _contiguous(indices: list[int], axes: tuple[str, ...], mesh: Mesh) -> tuple[int, int]:
    if not indices:
        raise ValueError(
            f"process {jax.process_index()} has no devices on the mesh {dict(mesh.shape)}"
        )
    lo, hi = indices[0], indices[-1]
    if indices != list(range(lo, hi + 1)):
        raise ValueError(
            f"process {jax.process_index()} holds shards {indices} along mesh axes {axes}, "
            "which are not contiguous; build the mesh so that each process's devices are "
            "contiguous along the data axes (e.g. put the data axis first, or use "
            "MeshSpec(..., dcn_axes=...))"
        )
    return lo, hi + 1


def process_batch(global_batch_size: int, mesh: Mesh, spec: P = DATA_SPEC) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the global batch that this process must load.

    The batch dimension (the first entry of ``spec``) is split into as many equal shards as
    the product of the mesh axes it is sharded over; this process needs the shards held by its
    addressable devices. With the data axis spanning processes, every process loads a distinct
    part; with the batch dimension replicated (``spec[0] is None``) or sharded only over
    axes that are inside each process, every process loads the whole batch.

    Args:
        global_batch_size: Rows in the global batch (all processes together).
        mesh: The device mesh (from :meth:`MeshSpec.build`).
        spec: The ``PartitionSpec`` of the batch; only its first entry matters here.

    Returns:
        ``(start, stop)``: load ``rows[start:stop]`` of the global batch.

    Raises:
        ValueError: the batch size is not a multiple of the number of shards, the spec names
            an axis that is not in the mesh, or this process's shards are not contiguous.

    Examples:
        >>> mesh = MeshSpec({"data": -1}).build()
        >>> process_batch(32, mesh)        # one process holds all 8 devices
        (0, 32)
    """
    _check_spec(mesh, spec)
    if int(global_batch_size) != global_batch_size or global_batch_size < 0:
        raise ValueError(f"global_batch_size must be a non-negative int, got {global_batch_size}")
    axes = _dim_axes(spec[0]) if len(spec) else ()
    n_shards, local = _dim_shards(mesh, axes)
    if global_batch_size % n_shards:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n_shards} shards "
            f"of mesh axes {axes} ({ {a: mesh.shape[a] for a in axes} })"
        )
    per = global_batch_size // n_shards
    lo, hi = _contiguous(local, axes, mesh)
    return lo * per, hi * per


def _global_shape(local_shape: tuple[int, ...], mesh: Mesh, spec: P, what: str) -> tuple:
    if len(spec) > len(local_shape):
        raise ValueError(
            f"{what} has shape {local_shape} (rank {len(local_shape)}), fewer dims than "
            f"the spec {spec}"
        )
    out = []
    for dim, size in enumerate(local_shape):
        axes = _dim_axes(spec[dim]) if dim < len(spec) else ()
        n_shards, local = _dim_shards(mesh, axes)
        lo, hi = _contiguous(local, axes, mesh)
        n_local = hi - lo
        if size % n_local:
            part = "leading" if dim == 0 else f"dim {dim}"
            raise ValueError(
                f"{what} has {part} size {size}, but this process (index "
                f"{jax.process_index()}) holds {n_local} of the {n_shards} shards of mesh "
                f"axes {axes}: the size must be a multiple of {n_local}"
            )
        out.append(size // n_local * n_shards)
    return tuple(out)


def make_global_batch(
    local_batch: Any,
    mesh: Mesh,
    spec: P = DATA_SPEC,
    *,
    global_batch_size: int | None = None,
) -> Any:
    """Assemble every process's rows into one global ``jax.Array`` sharded as ``spec``.

    A thin, checked wrapper around :func:`jax.make_array_from_process_local_data` with
    ``NamedSharding(mesh, spec)``: ``local_batch`` holds rows ``process_batch(...)`` of the
    global batch, and the global shape is inferred from it (the leading size times the number
    of shards over the number this process holds). ``local_batch`` may be a pytree of arrays
    (e.g. ``(x, y)``); every leaf gets the same ``spec``.

    Args:
        local_batch: This process's part of the batch (numpy or jax arrays, or a pytree).
        mesh: The device mesh.
        spec: The ``PartitionSpec`` of the global batch; default ``P("data")``.
        global_batch_size: If given, the local leading size must be exactly the length of
            this process's ``process_batch(global_batch_size, mesh, spec)`` slice.

    Returns:
        The global array (or pytree of arrays), with sharding ``NamedSharding(mesh, spec)``.

    Raises:
        ValueError: the local batch has the wrong leading size, or fewer dims than ``spec``.

    Examples:
        >>> import numpy as np
        >>> mesh = MeshSpec({"data": -1}).build()
        >>> x = make_global_batch(np.arange(16.0).reshape(8, 2), mesh)
        >>> x.shape, x.sharding == NamedSharding(mesh, P("data"))
        ((8, 2), True)
        >>> make_global_batch(np.zeros((6, 2)), mesh, global_batch_size=8)
        Traceback (most recent call last):
        ...
        ValueError: local batch has leading size 6, but process 0 must load rows [0, 8) ...
    """
    _check_spec(mesh, spec)
    sharding = NamedSharding(mesh, spec)
    expected = None
    if global_batch_size is not None:
        start, stop = process_batch(global_batch_size, mesh, spec)
        expected = stop - start

    def one(leaf: Any) -> jax.Array:
        shape = tuple(np.shape(leaf))
        if not shape:
            raise ValueError(f"local batch leaf is a scalar; spec {spec} needs a batch dim")
        if expected is not None and shape[0] != expected:
            raise ValueError(
                f"local batch has leading size {shape[0]}, but process {jax.process_index()} "
                f"must load rows [{start}, {stop}) of the global batch of {global_batch_size} "
                f"(spec {spec}): expected leading size {expected}"
            )
        global_shape = _global_shape(shape, mesh, spec, "local batch")
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    return jax.tree.map(one, local_batch)
