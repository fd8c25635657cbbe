"""The degradation operators against their defining identities, on random inputs, every task.

A A^+ A = A and A^+ A A^+ = A^+ (Moore-Penrose), <A x, y> = <x, A^T y> (adjointness), A^+ equal
to NumPy's pseudo-inverse of the dense matrix, and pinv_reg(v, eps) = A^T (A A^T + eps I)^-1 v.
The dense matrix is built by applying A to the standard basis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import degradations
from ddpm_jax.sampling import editing

# task -> (image size, channels)
SHAPES = {"sr2": (8, 1), "sr4": (8, 3), "blur_gauss": (8, 1), "blur_uniform": (8, 3),
          "colourise": (4, 3), "inpaint": (8, 3), "denoise": (4, 1)}
assert set(SHAPES) == set(degradations.TASKS)


def _op(task):
  size, c = SHAPES[task]
  mask = editing.make_mask("random_half", size, size) if task == "inpaint" else None
  return degradations.make(task, size, c, mask), (size, size, c)


def _dense(fn, in_shape):
  """The matrix of a linear map on arrays of `in_shape` (one batch element)."""
  d = int(np.prod(in_shape))
  basis = jnp.eye(d, dtype=jnp.float32).reshape((d,) + in_shape)
  return np.asarray(jax.jit(fn)(basis), np.float64).reshape(d, -1).T


@pytest.mark.parametrize("task", degradations.TASKS)
def test_moore_penrose_and_adjoint_identities(task):
  op, shape = _op(task)
  key = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(key[0], (3,) + shape)
  y = jax.random.normal(key[1], op.y_shape((3,) + shape))
  ax = op.A(x)
  np.testing.assert_allclose(op.A(op.pinv(ax)), ax, atol=1e-5)  # A A^+ A = A
  np.testing.assert_allclose(op.pinv(op.A(op.pinv(y))), op.pinv(y), atol=1e-5)
  lhs = jnp.sum(ax * y, axis=(1, 2, 3))
  rhs = jnp.sum(x * op.At(y), axis=(1, 2, 3))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", degradations.TASKS)
def test_pinv_and_regularised_solve_match_dense_linear_algebra(task):
  op, shape = _op(task)
  a = _dense(op.A, shape)
  y_shape = op.y_shape((1,) + shape)[1:]
  np.testing.assert_allclose(_dense(op.pinv, y_shape), np.linalg.pinv(a, rcond=1e-6), atol=1e-5)
  np.testing.assert_allclose(_dense(op.At, y_shape), a.T, atol=1e-6)
  for eps in (0.3, 2.0):
    want = a.T @ np.linalg.inv(a @ a.T + eps * np.eye(a.shape[0]))
    got = _dense(lambda v, e=eps: op.pinv_reg(v, e), y_shape)
    np.testing.assert_allclose(got, want, atol=1e-5)
  # A per-example eps ([B]) is each example's own solve.
  v = jax.random.normal(jax.random.key(1), (2,) + y_shape)
  both = op.pinv_reg(v, jnp.asarray([0.3, 2.0]))
  np.testing.assert_allclose(both[1], op.pinv_reg(v[1:], 2.0)[0], atol=1e-6)


def test_super_resolution_pinv_is_nearest_upsampling_and_a_is_average_pooling():
  op = degradations.make("sr2", 4, 1)
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_allclose(op.A(x)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  np.testing.assert_allclose(op.pinv(op.A(x))[0, :2, :2, 0], [[2.5, 2.5], [2.5, 2.5]])


def test_blur_is_the_circular_convolution_with_its_kernel():
  # A point at (0, 0) spreads into the kernel, wrapped around the borders.
  op = degradations.make("blur_uniform", 8, 1)
  x = jnp.zeros((1, 8, 8, 1)).at[0, 0, 0, 0].set(1.0)
  out = np.asarray(op.A(x))[0, :, :, 0]
  want = np.zeros((8, 8))
  for i in (-1, 0, 1):
    for j in (-1, 0, 1):
      want[i % 8, j % 8] = 1 / 9
  # The truncated spectrum changes the kernel only by the discarded frequencies (< 3% of max).
  np.testing.assert_allclose(out, want, atol=0.03)


@pytest.mark.parametrize("task, size, channels, message", [
    ("sr2", 7, 1, "divisible by 2"),
    ("sr4", 6, 3, "divisible by 4"),
    ("colourise", 8, 1, "colour model"),
    ("blur_gauss", 4, 1, "larger than"),
    ("deblur", 8, 1, "valid choices"),
])
def test_bad_shapes_fail_naming_the_fix(task, size, channels, message):
  with pytest.raises(ValueError, match=message):
    degradations.check(task, size, channels)
