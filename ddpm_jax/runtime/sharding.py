"""A train state sharded over the mesh (FSDP / ZeRO-3, `training.shard_state=True`).

Each large leaf of the params, the EMA, the post-hoc EMAs and the optimiser state is split along
one dimension over the `data` axis, so a device keeps 1/N of it; leaves smaller than
`MIN_SHARD_SIZE` elements, or with no dimension divisible by N, stay replicated (biases,
GroupNorm scales, the step counter). `leaf_spec` picks the dimension: the largest one divisible
by N (the first on ties), so the rule depends only on the shapes and N.

Inside the shard_map step (`training.train_step`) the forward and backward passes see the full
params: `gather` all-gathers each sharded leaf (`lax.all_gather(..., tiled=True)`). The transpose
of that all-gather is a reduce-scatter, so autodiff returns each device's shard of the gradient
already summed over devices (ZeRO-3's reduce-scatter), and Adam, the EMA and the post-hoc EMAs
then update the shards alone. The global gradient norm adds the shards' squared norms over the
axis (`global_norm`).

Checkpoints hold the global arrays (Orbax writes each shard from the device that has it); a
restore target built for another mesh carries that mesh's shardings, and Orbax reshards onto it,
so a run written at 4 devices resumes at 2 or 1.
"""

import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ddpm_jax.runtime.mesh import AXIS

# Leaves with fewer elements stay replicated: sharding them saves less than it costs to gather.
MIN_SHARD_SIZE = 1024
# The TrainState fields that are sharded; the rest (step, rng, importance history) are replicated.
SHARDED_FIELDS = ("params", "ema_params", "opt_state", "phema")


def leaf_spec(shape: tuple[int, ...], num_devices: int) -> P:
  """The PartitionSpec of one leaf: its largest dimension divisible by `num_devices` over `data`,
  or replicated (P()) when it is small or no dimension divides."""
  if num_devices <= 1 or math.prod(shape) < MIN_SHARD_SIZE:
    return P()
  candidates = [(size, -i) for i, size in enumerate(shape) if size % num_devices == 0]
  if not candidates:
    return P()
  dim = -max(candidates)[1]
  return P(*([None] * dim + [AXIS]))


def sharded_dim(spec: P) -> int | None:
  """The dimension a leaf is split along, None if replicated."""
  return next((i for i, name in enumerate(spec) if name == AXIS), None)


def state_specs(state_shapes: Any, num_devices: int, shard: bool) -> Any:
  """The PartitionSpec tree of a TrainState (of arrays or ShapeDtypeStructs): `leaf_spec` for the
  leaves of `SHARDED_FIELDS` when `shard`, P() everywhere else."""
  def field_specs(name, value):
    if shard and name in SHARDED_FIELDS:
      return jax.tree.map(lambda a: leaf_spec(tuple(a.shape), num_devices), value)
    return jax.tree.map(lambda _: P(), value)
  return state_shapes.replace(**{name: field_specs(name, getattr(state_shapes, name))
                                 for name in ("step", "params", "ema_params", "opt_state", "rng",
                                              "importance", "phema")})


def named(mesh: Mesh, specs: Any) -> Any:
  """PartitionSpecs -> NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def gather(tree: Any, specs: Any) -> Any:
  """Inside shard_map: each sharded leaf all-gathered whole (its autodiff transpose is the
  reduce-scatter of the gradient); replicated leaves as they are."""
  def one(x, spec):
    dim = sharded_dim(spec)
    return x if dim is None else lax.all_gather(x, AXIS, axis=dim, tiled=True)
  return jax.tree.map(one, tree, specs, is_leaf=lambda x: isinstance(x, P))


def global_norm(tree: Any, specs: Any) -> jax.Array:
  """Inside shard_map: the L2 norm of the whole tree, the sharded leaves' squares summed over
  the axis (invariant: every device computes the same value)."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  local = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x, s in zip(leaves, spec_leaves)
           if sharded_dim(s) is not None]
  whole = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x, s in zip(leaves, spec_leaves)
           if sharded_dim(s) is None]
  total = sum(whole, jnp.zeros((), jnp.float32))
  if local:
    total = total + lax.psum(sum(local), AXIS)
  return jnp.sqrt(total)


def any_sharded(specs: Any) -> bool:
  return any(sharded_dim(s) is not None
             for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def bytes_per_device(tree: Any) -> dict:
  """{device: bytes of the tree's shards it holds}, read from the arrays' addressable shards."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def expected_bytes(tree: Any, specs: Any, num_devices: int) -> int:
  """What `bytes_per_device` should be on each device: 1/N of each sharded leaf, all of each
  replicated one."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize //
             (num_devices if sharded_dim(s) is not None else 1)
             for x, s in zip(leaves, spec_leaves))


def reshard(tree: Any, shardings: Any) -> Any:
  """`tree` laid out as `shardings` (one sharding, or a tree of them), by a jitted identity: a
  collective that every process runs."""
  return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A replicated copy of `tree` on `mesh`: what the samplers, the evaluation and the post-hoc EMA
  snapshots read. Every process must call it."""
  return reshard(tree, NamedSharding(mesh, P()))


def train_bytes_per_param(num_devices: int, shard: bool, num_phema: int = 0) -> float:
  """Bytes per parameter that one device holds during a train step, activations aside, as this
  module lays the state out (float32 everywhere):

    replicated: params 4 + EMA 4 + Adam's two moments 8 + 4 per post-hoc EMA, and the gradient 4;
    sharded:    that state / N, the gradient's shard 4 / N, and, while the step runs, the whole
                params gathered (4) and the whole gradient before its reduce-scatter (4).

  The step gathers the whole tree at once, so the transient 8 bytes do not shrink with N; a
  gather per layer would bring them down to one layer's.
  """
  state = 16 + 4 * num_phema
  if not shard:
    return state + 4
  return (state + 4) / num_devices + 8
