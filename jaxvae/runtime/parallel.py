"""Data-parallel training and scoring with jax.sharding: one mesh axis, `data`.

The batch is split over the devices on the `data` axis; parameters and optimiser state are
replicated, so XLA inserts the gradient all-reduce itself (GSPMD). The same code runs on one
device (a 1-device mesh), on several devices of one host, and on several processes
(`initialize_distributed` first, then every process runs the same program).

Multi-process data: every process holds the same image array (e.g. `np.load(..., mmap_mode="r")`)
and the same global permutation; of each global batch it reads only the rows its own devices
hold (`process_rows`), and `shard_batch` assembles the global array from those local rows. The
global batch is therefore identical to the single-process one, and so is the result, up to
the order of the floating-point reduction across devices.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvae.base.errors import ConfigError

AXIS = "data"


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           local_device_ids=None, timeout_s: int = 300) -> None:
    """Join a multi-process JAX job; call in every process before any JAX computation.

    Selects the gloo CPU collectives (the default in jax 0.10, set explicitly so that CPU
    jobs keep working if the default changes; GPUs/TPUs use their own collectives).

    Args:
      coordinator_address: "host:port" of process 0, reachable by all processes
        (e.g. "127.0.0.1:12345" for processes on one machine).
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      local_device_ids: devices this process drives (None: all visible ones).
      timeout_s: seconds to wait for all processes to join.
    """
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)


def make_mesh(devices=None) -> Mesh:
    """A 1-D device mesh with axis `data` over `devices` (default: all devices of the job).

    The axis type is Auto (shardings given to jit, propagated by XLA), not the Explicit mode
    that `jax.make_mesh` now defaults to.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh (params, optimiser state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the `data` axis."""
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh) -> None:
    """Raise ConfigError unless `batch_size` splits evenly over the devices.

    Args:
      batch_size: global batch size.
      mesh: a Mesh, or the device count as an int.
    """
    n = mesh if isinstance(mesh, int) else mesh.size
    if batch_size % n:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {n} devices of the "
                          f"mesh; choose a multiple of {n}")


def replicate(tree, mesh: Mesh):
    """Place a pytree of arrays on every device of the mesh.

    In a multi-process job every process must pass the same values; each builds the global
    array from its own copy (device_put cannot target other processes' devices).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)),
        tree)


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold (all rows in one process).

    Returns:
      slice into the global batch; contiguous because the mesh orders devices by process.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted(idx[0].start or 0 for idx in index_map.values())
    stops = sorted(global_batch if idx[0].stop is None else idx[0].stop
                   for idx in index_map.values())
    rows = slice(starts[0], stops[-1])
    if stops[-1] - starts[0] != sum(b - a for a, b in zip(starts, stops, strict=True)):
        raise ConfigError("this process's devices are not contiguous on the mesh; build the mesh "
                          "with make_mesh() (devices ordered by process)")
    return rows


def shard_batch(local_rows, mesh: Mesh, global_batch: int | None = None) -> jax.Array:
    """Assemble a global batch, split over `data`, from the rows this process holds.

    Args:
      local_rows: (b, ...) numpy array, this process's rows (`process_rows`); in a single
        process simply the whole batch.
      mesh: the device mesh.
      global_batch: global batch size (default: b * process count).

    Returns:
      (global_batch, ...) jax.Array sharded on its leading axis.
    """
    local_rows = np.asarray(local_rows)
    if global_batch is None:
        global_batch = local_rows.shape[0] * jax.process_count()
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows,
                                                  (global_batch,) + local_rows.shape[1:])
