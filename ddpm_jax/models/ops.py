"""A bias add whose gradient, a sum over every pixel, is computed as a dot.

A conv's (or a per-pixel Dense's) bias gradient sums the output gradient over the batch and
the pixels for each channel: a *column* reduction of a [pixels, channels] array. XLA:CPU emits
it as a loop that runs many times slower than the same sum computed as a matrix product with a
vector of ones, so `bias_add`'s backward pass is written as `ones @ g`: the same sum in another
order, equal up to float rounding. (The same treatment of GroupNorm's statistics and gradients
lost in an alternating A/B run, because it has to materialise the products it sums;
docs/performance.md.)

Inside `jax.shard_map` (the train step) the parameters are invariant over the mesh axis and the
activations vary. `jax.custom_vjp` must return a cotangent of its input's type, so each op first
casts its parameters to the activations' varying axes (`lax.pcast(..., to="varying")`); the
transpose of that cast is the `psum` over devices that a plain `x + b` would have had.
"""

import jax
from jax import lax
import jax.numpy as jnp


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes along which x varies (empty outside shard_map)."""
  return jax.typeof(x).manual_axis_type.varying


def _varying_like(x: jax.Array, param: jax.Array) -> jax.Array:
  """`param` cast to vary over the mesh axes along which `x` varies (no-op outside shard_map)."""
  missing = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
  return lax.pcast(param, missing, to="varying") if missing else param


def _row_sum(x2d: jax.Array) -> jax.Array:
  """[n, c] -> [c], the sum over rows as `ones[1, n] @ x` in float32 (a GEMM, not a loop)."""
  ones = jnp.ones((1, x2d.shape[0]), x2d.dtype)
  return lax.dot_general(ones, x2d, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)[0]


@jax.custom_vjp
def _bias_add(x, bias):
  return x + bias.astype(x.dtype)


def _bias_add_fwd(x, bias):
  return _bias_add(x, bias), bias  # the [C] bias only tells the backward pass its dtype


def _bias_add_bwd(bias, g):
  return g, _row_sum(g.reshape(-1, g.shape[-1])).astype(bias.dtype)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def bias_add(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x + bias over the last axis; the bias gradient is a dot over every other axis.

  Args:
    x: [..., C], in the compute dtype.
    bias: [C], in its own (parameter) dtype: cast to x's for the sum, as flax's layers do, while
      its gradient is accumulated in float32 and returned in the bias's dtype (with a bfloat16 x,
      more precise than flax's bfloat16 reduction; the same sum up to rounding).
  """
  return _bias_add(x, _varying_like(x, bias))
