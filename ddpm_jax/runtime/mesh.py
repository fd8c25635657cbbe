"""The device mesh: one `data` axis over every device of every host; batches on and off it."""

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every host (or the given ones)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: the step places data itself through shard_map, and the samplers leave the
  # partitioning of their loops to XLA, which Explicit axes would not allow.
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles each process's slice of the batch into one global array sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(x) -> np.ndarray:
  """A (possibly sharded, multi-process) array gathered whole onto every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of an array sharded over its leading axis, and their global indices.

  Nothing crosses hosts: the rows are the process's addressable shards (a replicated copy of the
  same rows counts once), in index order.
  """
  rows, index, seen = [], [], set()
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start in seen:
      continue
    seen.add(start)
    data = np.asarray(shard.data)
    rows.append(data)
    index.append(np.arange(start, start + len(data)))
  return np.concatenate(rows), np.concatenate(index)
