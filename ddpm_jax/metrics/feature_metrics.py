"""Kernel Inception distance and improved precision/recall over feature arrays.

Both compare the generated set with the reference set in the same feature space as FID (the
2048-d pool3 of the FID Inception-v3), but without FID's Gaussian assumption:

* ``kernel_inception_distance``: KID (Binkowski et al., 2018, Sec. 3): the unbiased estimate of
  the squared maximum mean discrepancy under the cubic polynomial kernel
  ``k(a, b) = (a.b / d + 1)^3``, averaged over random equal-size subsets of the two sets. Its
  defaults (100 subsets of ``min(1000, n_real, n_fake)`` features) are those of the common
  implementations (the authors' MMD-GAN code, torch-fidelity, StyleGAN2-ADA, clean-fid), so the
  numbers compare with theirs. It is unbiased, so it can be (slightly) negative.
* ``precision_recall``: improved precision and recall (Kynkaanniemi et al., 2019, Sec. 2): each
  set's manifold is the union of balls around its features, of radius the distance to the
  feature's k-th nearest neighbour in its own set (k = 3 in the paper). Precision is the share of
  generated features inside the real manifold (fidelity), recall the share of real features
  inside the generated manifold (coverage). A point lies on the boundary of its own ball when
  its neighbours tie, so a feature counts as inside when its distance is ``<=`` the radius, as in
  the authors' code.

KID runs in float64 NumPy (its per-subset means differ by ~1e-3 of the kernel's scale, where
float32 sums of a million entries would show). Precision/recall needs every pairwise distance
(three 50k x 50k matrices of 2048-d dot products), so it runs in JAX on the default device, one
block of rows at a time: only a ``[batch_size, N]`` block of distances exists at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
_PR_BATCH = 1024  # rows of a distance block: 1024 x 50k float32 is 200 MB


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3,
                      coef0: float = 1.0) -> np.ndarray:
  """``K[i, j] = (x_i . y_j / d + coef0)^degree`` in float64 (d = the feature dimension)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
  """The unbiased estimate of MMD^2 between the laws of ``x`` [m, D] and ``y`` [n, D].

  ``MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
  - 2 sum_{i, j} k(x_i, y_j) / (m n)`` (Gretton et al., 2012, eq. 3; the diagonal terms
  ``k(x_i, x_i)`` are left out, the cross term keeps every pair since x and y are independent).

  Returns:
    The estimate as a Python float; its expectation is 0 when x and y share a law.
  """
  m, n = len(x), len(y)
  if m < 2 or n < 2:
    raise ValueError(f"The unbiased MMD needs at least 2 features per set, got {m} and {n}.")
  k_xx = polynomial_kernel(x, x, degree, coef0)
  k_yy = polynomial_kernel(y, y, degree, coef0)
  k_xy = polynomial_kernel(x, y, degree, coef0)
  off_xx = k_xx.sum() - np.trace(k_xx)
  off_yy = k_yy.sum() - np.trace(k_yy)
  return float(off_xx / (m * (m - 1)) + off_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray,
                              num_subsets: int = KID_NUM_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE,
                              seed: int = 0) -> dict[str, float]:
  """KID: the mean and std of ``mmd2_unbiased`` over random subsets (Binkowski et al., 2018).

  Each of ``num_subsets`` rounds draws ``m = min(subset_size, n_real, n_fake)`` distinct rows of
  each set (without replacement, independently for the two sets) from a NumPy generator seeded
  with ``seed``, so the result is a function of the features alone.

  Args:
    real: [n_real, D] reference features.
    fake: [n_fake, D] features of generated samples.
    num_subsets: rounds averaged over.
    subset_size: rows per set and round, at most.
    seed: the subsets' random seed.

  Returns:
    ``{"kid": mean, "kid_std": population std over subsets, "kid_subsets": num_subsets,
    "kid_subset_size": m}``.
  """
  real, fake = _check_pair(real, fake)
  m = min(subset_size, len(real), len(fake))
  if num_subsets < 1 or m < 2:
    raise ValueError(f"KID needs num_subsets >= 1 and subsets of >= 2 features, got "
                     f"{num_subsets} subsets of {m} ({len(real)} real, {len(fake)} generated).")
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for s in range(num_subsets):
    x = fake[rng.choice(len(fake), m, replace=False)]
    y = real[rng.choice(len(real), m, replace=False)]
    values[s] = mmd2_unbiased(x, y)
  return {"kid": float(values.mean()), "kid_std": float(values.std()),
          "kid_subsets": int(num_subsets), "kid_subset_size": int(m)}


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K,
                     max_features: int = 0, seed: int = 0,
                     batch_size: int = _PR_BATCH) -> dict[str, float]:
  """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al., 2019, eqs. 1-3).

  ``f(phi, Phi) = 1`` if ``||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||`` for some ``phi'`` in
  ``Phi``; precision ``= mean_{g in fake} f(g, real)``, recall ``= mean_{r in real} f(r, fake)``,
  where ``NN_k(phi', Phi)`` is the k-th nearest neighbour of ``phi'`` in ``Phi`` other than
  itself (the (k+1)-th smallest distance, the first being its distance to itself, 0).

  Args:
    real: [n_real, D] reference features.
    fake: [n_fake, D] features of generated samples.
    k: the neighbourhood size (3 in the paper).
    max_features: when positive, at most this many rows of each set, a random subset drawn with
      ``seed`` (the paper uses 50k of each).
    seed: the subsets' random seed.
    batch_size: rows per block of distances.

  Returns:
    ``{"precision", "recall", "pr_k", "pr_num_real", "pr_num_fake"}``.
  """
  real, fake = _check_pair(real, fake)
  rng = np.random.default_rng(seed)
  if max_features > 0:
    real, fake = (a[np.sort(rng.choice(len(a), max_features, replace=False))]
                  if len(a) > max_features else a for a in (real, fake))
  if k < 1 or min(len(real), len(fake)) <= k:
    raise ValueError(f"Precision/recall with k={k} needs k >= 1 and more than k features per "
                     f"set, got {len(real)} real and {len(fake)} generated.")
  # Distances do not change under a common shift; centring the (all-positive, post-ReLU)
  # features makes |a|^2 + |b|^2 - 2 a.b cancel far less in float32.
  centre = real.mean(axis=0, dtype=np.float64).astype(np.float32)
  real32 = real.astype(np.float32) - centre
  fake32 = fake.astype(np.float32) - centre
  real_r2 = knn_sq_radii(real32, k, batch_size)
  fake_r2 = knn_sq_radii(fake32, k, batch_size)
  real_dev, real_r2_dev = jnp.asarray(real32), jnp.asarray(real_r2)
  batch_size = min(batch_size, len(fake32))
  inside, covered = 0, np.zeros(len(real), bool)
  for start in range(0, len(fake32), batch_size):
    rows = fake32[start:start + batch_size]
    n = len(rows)
    # Padding rows get radius -1, so they cover nothing (a distance is >= 0).
    r2 = np.pad(fake_r2[start:start + n], (0, batch_size - n), constant_values=-1.0)
    inside_block, covers = _cover_block(_pad_rows(rows, batch_size), r2, real_dev, real_r2_dev)
    inside += int(np.asarray(inside_block)[:n].sum())
    covered |= np.asarray(covers)
  return {"precision": inside / len(fake), "recall": int(covered.sum()) / len(real),
          "pr_k": int(k), "pr_num_real": len(real), "pr_num_fake": len(fake)}


def knn_sq_radii(feats: np.ndarray, k: int, batch_size: int = _PR_BATCH) -> np.ndarray:
  """[N] squared distance from each row of ``feats`` [N, D] to its k-th nearest other row."""
  feats = np.asarray(feats, np.float32)
  on_device = jnp.asarray(feats)
  batch_size = min(batch_size, len(feats))
  out = []
  for start in range(0, len(feats), batch_size):
    rows = feats[start:start + batch_size]
    out.append(np.asarray(_kth_sq_dist(_pad_rows(rows, batch_size), on_device, k))[:len(rows)])
  return np.concatenate(out)


def _check_pair(real, fake) -> tuple[np.ndarray, np.ndarray]:
  """Both as float arrays, as given (float32 caches stay float32: 50k x 2048 is 400 MB)."""
  real = np.asarray(real, np.result_type(real, np.float32))
  fake = np.asarray(fake, np.result_type(fake, np.float32))
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"Expected real [N, D] and generated [M, D] features, got {real.shape} and "
                     f"{fake.shape}.")
  return real, fake


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """``x`` padded with zero rows to ``rows`` rows (every block has one shape: one compile)."""
  return np.pad(x, [(0, rows - x.shape[0]), (0, 0)])


def _sq_dists(a, b):
  """[A, B] squared Euclidean distances, at full float32 matmul precision (TPUs default to
  bfloat16 passes, far too coarse for nearest-neighbour radii), clipped at 0."""
  dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * dots
  return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_sq_dist(rows, feats, k):
  # The k + 1 smallest distances of each row; the smallest is the row's own (0).
  return -jax.lax.top_k(-_sq_dists(rows, feats), k + 1)[0][:, -1]


@jax.jit
def _cover_block(fake_rows, fake_r2, real, real_r2):
  """Which fake rows lie in the real manifold, and which real rows these fake balls cover."""
  d2 = _sq_dists(fake_rows, real)  # [B, N_real]
  inside = jnp.any(d2 <= real_r2[None, :], axis=1)
  covers = jnp.any(d2 <= fake_r2[:, None], axis=0)
  return inside, covers
