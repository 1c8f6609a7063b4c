"""Devices: the mesh, where every array lives, multi-process start-up. The only module that
knows about devices.

The layout (why: docs/performance.md):
- one mesh axis, `devices`, over every device of every process;
- parameters, optimiser state, graphs and the carried training state are replicated;
- each BPR batch is split over the devices (padded with zero-weight rows to a multiple of the
  device count, which leaves the loss unchanged);
- the frozen item features are split by ITEM over the devices (padded with zero rows), so each
  device runs the three towers - the dominant cost - on its share of the items only; XLA sums
  the towers' weight gradients across devices. Splitting only the batch would replicate the
  towers on every device and make more devices no faster;
- evaluation splits the users: each device scores its users against all items and keeps their
  top k (`map_blocks`, a `shard_map`).

Everything is expressed with `jax.jit` + `NamedSharding` (and `shard_map` for evaluation), the
API the installed JAX recommends; `pmap` is in maintenance mode and is itself implemented with
`jit` + `shard_map` since JAX 0.8. With one device this is plain `jit` on that device.
"""
import contextlib
import functools
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = 'devices'
DISTRIBUTED_MODES = ('auto', 'on', 'off')


PLATFORMS = ('cpu', 'gpu', 'tpu')
_building_for = []  # the platforms of the enclosing `building_for` blocks, innermost last


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the backend the computations run on, or inside a `building_for`
    block the platform that programs are being built for. Every platform-dependent choice of
    the project (CPU-only options, the sparse product's chunking) asks this."""
    return _building_for[-1] if _building_for else jax.default_backend()


@contextlib.contextmanager
def building_for(target: Optional[str]):
    """Within the block, `platform()` is `target` ('cpu', 'gpu' or 'tpu'; None: unchanged), so
    that what is built there (configs, frozen inputs, jitted steps) is what that platform runs,
    whatever this process's backend is: how `lirdrec_jax.lowering` exports GPU and TPU programs
    from a CPU machine."""
    if target is not None and target not in PLATFORMS:
        raise ValueError(f'platform {target!r}; expected one of {PLATFORMS}')
    if target is not None:
        _building_for.append(target)
    try:
        yield
    finally:
        if target is not None:
            _building_for.pop()


CPU_DOTS = ('xla', 'eigen')
# XLA:CPU option that routes dots to XLA's own (Eigen) GEMMs instead of YNNPACK fusions.
_NO_YNN_DOTS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.lru_cache(maxsize=None)
def _cpu_option_supported(name: str) -> bool:
    """Whether this jaxlib's XLA:CPU knows the compile option `name` (probed once)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: ''})(np.float32(0))
        return True
    except Exception:  # an unknown option is an INVALID_ARGUMENT error at compile time
        return False


def compiler_options(cpu_dot: str) -> Optional[dict]:
    """XLA compile options of the training computations for `model.cpu_dot`.

    'xla' (default): XLA's own choice. 'eigen', on the CPU only: no YNNPACK dot fusions, so the
    towers' float32 GEMMs (shapes (7050, 4096) @ (4096, 256)) run on XLA's Eigen kernels, which
    reach the square-GEMM rate on this project's machine where YNNPACK reaches ~80% of it
    (docs/performance.md). None on GPU/TPU (`train.for_platform` notes it and turns the option
    off there), and with a jaxlib without the option.
    """
    if cpu_dot not in CPU_DOTS:
        raise ValueError(f'config field model.cpu_dot = {cpu_dot!r}; expected one of {CPU_DOTS}')
    if cpu_dot == 'xla' or platform() != 'cpu':
        return None
    name = next(iter(_NO_YNN_DOTS))
    return dict(_NO_YNN_DOTS) if _cpu_option_supported(name) else None


def _several_processes_from_environment() -> bool:
    """Whether the launcher says this is one of several processes (see `initialize_distributed`)."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS'):
        return True
    for var in ('JAX_NUM_PROCESSES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'):
        if int(os.environ.get(var, '1') or 1) > 1:
            return True
    return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def initialize_distributed(mode: str = 'auto') -> bool:
    """Joins the other processes of a multi-process run (`jax.distributed.initialize`).

    Must run before any JAX computation. `mode`:
      'auto': initialise when the environment says there are several processes:
        JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, for hand-started
        processes, e.g. one per GPU host), SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1, or
        several TPU_WORKER_HOSTNAMES;
      'on': always initialise (JAX detects TPU pod slices, Slurm and Open MPI by itself);
      'off': never.
    Returns whether this run is now multi-process.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f'config field parallel.distributed = {mode!r}; expected one of '
                         f'{DISTRIBUTED_MODES}')
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if mode == 'off' or (mode == 'auto' and not _several_processes_from_environment()):
        return False
    kwargs = {}
    if os.environ.get('JAX_NUM_PROCESSES'):
        kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
        kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    jax.distributed.initialize(**kwargs)  # reads JAX_COORDINATOR_ADDRESS itself
    return jax.process_count() > 1


@functools.lru_cache(maxsize=None)
def single_device() -> 'Partitioner':
    """The partitioner of the default device alone (what a caller without one computes on)."""
    return Partitioner(num_devices=1)


def pad_to_multiple(a: np.ndarray, axis: int, multiple: int, fill=0) -> np.ndarray:
    """`a` with `fill` appended along `axis` up to a multiple of `multiple` (host, numpy)."""
    a = np.asarray(a)
    pad = -a.shape[axis] % multiple
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return np.pad(a, widths, constant_values=fill)


class Partitioner:
    """A 1-D device mesh and the placement rules of this project (module docstring).

    Args:
      num_devices: use the first `num_devices` devices (0: all of them, across processes).
      shard_items: split the item features over the devices (else replicate them).
    """

    def __init__(self, num_devices: int = 0, shard_items: bool = True):
        devices = jax.devices()
        if num_devices < 0 or num_devices > len(devices):
            raise ValueError(f'config field parallel.num_devices = {num_devices}; expected 0 '
                             f'(all) or 1..{len(devices)} (the devices JAX sees)')
        if num_devices and jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(f'config field parallel.num_devices = {num_devices}: a '
                             'multi-process run uses every device (set it to 0)')
        devices = devices[:num_devices] if num_devices else devices
        self.mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,),
                                      axis_types=(jax.sharding.AxisType.Auto,))
        self.shard_items = bool(shard_items)

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    @property
    def is_primary(self) -> bool:
        """True on the one process that writes files and logs (process 0)."""
        return jax.process_index() == 0

    def describe(self) -> str:
        kinds = sorted({d.device_kind for d in self.mesh.devices.flat})
        procs = jax.process_count()
        return (f'{self.n_devices} {"/".join(kinds)} device(s)'
                + (f' over {procs} processes' if procs > 1 else '')
                + (', items split over devices' if self.shard_items and self.n_devices > 1
                   else ''))

    # ------------------------------------------------------------------ shardings
    def sharding(self, axis: Optional[int] = None, ndim: int = 1) -> NamedSharding:
        """Replicated (axis None), or split along `axis` of an `ndim`-dimensional array."""
        if axis is None:
            return NamedSharding(self.mesh, P())
        spec = [None] * ndim
        spec[axis] = AXIS
        return NamedSharding(self.mesh, P(*spec))

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(None)

    # ------------------------------------------------------------------ placement
    def _put(self, value, sharding: NamedSharding) -> jax.Array:
        if isinstance(value, jax.Array) and value.is_fully_addressable \
                and jax.process_count() == 1:
            return jax.device_put(value, sharding)
        host = np.asarray(value)  # every process holds the same full value
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of `tree` copied to every device."""
        return jax.tree.map(lambda x: self._put(x, self.replicated), tree)

    def replicate_shapes(self, tree: Any) -> Any:
        """What `replicate` would place, without computing or placing anything: a
        `jax.ShapeDtypeStruct` (shape, dtype, weak type, the replicated sharding) per array
        leaf of `tree` (arrays or ShapeDtypeStructs)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=self.replicated,
            weak_type=bool(getattr(x, 'weak_type', False))), tree)

    def split(self, value, axis: int, fill=0) -> jax.Array:
        """`value` padded along `axis` to a multiple of the device count (with `fill`) and split
        along it. Every process passes the same full host value; each keeps its own shards."""
        if isinstance(value, jax.Array) and value.shape[axis] % self.n_devices == 0:
            return self._put(value, self.sharding(axis, value.ndim))  # no host round trip
        host = pad_to_multiple(np.asarray(value), axis, self.n_devices, fill)
        return self._put(host, self.sharding(axis, host.ndim))

    def split_items(self, value, axis: int) -> jax.Array:
        """An item-indexed frozen array (features), split by item unless `shard_items` is off."""
        if value is None:
            return None
        return self.split(value, axis) if self.shard_items else self._put(value, self.replicated)

    def padded_count(self, n: int) -> int:
        return n + (-n % self.n_devices)

    def layout_hook(self) -> Optional[Callable]:
        """For the model's `layout` field: `hook(x, kind)` pins an activation inside a jitted
        step to 'items' (split by its leading, item axis, when items are split) or
        'replicated'. Without it XLA's automatic partitioner spreads users and the sparse
        products over the devices with collectives inside the product's loop, or replicates
        the towers (docs/performance.md). None on one device (nothing to pin)."""
        if self.n_devices == 1:
            return None

        def hook(x: jax.Array, kind: str) -> jax.Array:
            if kind == 'items' and self.shard_items:
                return jax.lax.with_sharding_constraint(x, self.sharding(0, x.ndim))
            return jax.lax.with_sharding_constraint(x, self.replicated)

        return hook

    # ------------------------------------------------------------------ compilation
    def jit(self, fn: Callable, *, out_shardings: Any = None, donate_argnums=(),
            static_argnames=(), compiler_options: Optional[dict] = None) -> Callable:
        """`jax.jit` on this mesh; inputs keep the shardings they were placed with. Outputs are
        replicated unless `out_shardings` says otherwise. `compiler_options`: XLA options of
        this computation only (see `compiler_options()`)."""
        if out_shardings is None:
            out_shardings = self.replicated
        return jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate_argnums,
                       static_argnames=static_argnames, compiler_options=compiler_options)

    def map_blocks(self, fn: Callable, n_replicated: int, n_split: int) -> Callable:
        """`fn(*replicated, *split)` run once per device on that device's block of the split
        arguments (their leading axis, one entry per device); outputs are split the same way.
        Jitted; this is how evaluation spreads users over devices."""
        in_specs = (P(),) * n_replicated + (P(AXIS),) * n_split
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P(AXIS))
        return jax.jit(mapped)

    # ------------------------------------------------------------------ back to the host
    def to_host(self, x: jax.Array) -> np.ndarray:
        """The full value of `x` as numpy on every process."""
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def barrier(self, name: str) -> None:
        """Wait until every process gets here (no-op with one process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)

    def agree(self, value: int) -> int:
        """Process 0's `value` on every process (e.g. a run directory's timestamp)."""
        if jax.process_count() == 1:
            return int(value)
        from jax.experimental import multihost_utils
        return int(multihost_utils.broadcast_one_to_all(np.int64(value)))

