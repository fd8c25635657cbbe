"""Fréchet distance and Inception score over feature / prediction arrays.

Pure NumPy/SciPy in float64: these run once per evaluation on small summaries
(a mean and a covariance), where float32 round-off in a 2048x2048 matrix square
root would be visible in the third digit of the FID.

Conventions follow TTUR (Heusel et al., 2017) and pytorch-fid:

* Covariances are unbiased (``ddof=1``), as ``np.cov(feats, rowvar=False)``.
* ``frechet_distance`` takes ``sqrtm`` of the product ``S1 S2``; when that is
  not finite it retries with ``eps * I`` added to both covariances; tiny
  imaginary parts from round-off are dropped and large ones raise.
* Statistics files are ``.npz`` with keys ``mu`` and ``sigma`` (plus ``n``
  here), so reference statistics published for pytorch-fid / TTUR load
  directly.

``extract_features`` feeds a (jitted) feature network a whole dataset in
fixed-size batches, padding the last one rather than dropping it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from typing import Callable
from typing import Mapping

import numpy as np
from scipy import special


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Gaussian summary of a feature set: mean, unbiased covariance and count.

  Attributes:
    mu: [D] float64 mean, ``mu = (1/n) sum_i x_i``.
    sigma: [D, D] float64 covariance,
      ``sigma = (1/(n-1)) sum_i (x_i - mu)(x_i - mu)^T``.
    n: number of feature vectors summarised (0 when unknown, e.g. for a stats
      file written by another tool).
  """

  mu: np.ndarray
  sigma: np.ndarray
  n: int

  @classmethod
  def from_features(cls, feats) -> FeatureStats:
    """One-shot statistics of a [N, D] feature array (N >= 2)."""
    acc = FeatureStatsAccumulator()
    acc.update(feats)
    return acc.result()

  def save(self, path: str | os.PathLike) -> None:
    """Writes ``mu``, ``sigma`` and ``n`` to an ``.npz`` file."""
    np.savez(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    """Reads an ``.npz`` with ``mu`` and ``sigma`` (``n`` optional)."""
    with np.load(path) as data:
      mu = np.asarray(data["mu"], np.float64)
      sigma = np.asarray(data["sigma"], np.float64)
      n = int(data["n"]) if "n" in data.files else 0
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(
          f"{path}: expected mu [D] and sigma [D, D], got {mu.shape} and "
          f"{sigma.shape}.")
    return cls(mu=mu, sigma=sigma, n=n)


class FeatureStatsAccumulator:
  """Streaming mean/covariance, so 50k x 2048 features are never held at once.

  Keeps, in float64, ``n``, ``s1 = sum_i (x_i - c)`` and
  ``s2 = sum_i (x_i - c)(x_i - c)^T`` about a shift ``c`` (the first batch's
  mean). Then ``mu = c + s1 / n`` and
  ``sigma = (s2 - s1 s1^T / n) / (n - 1)``. The shift makes the subtraction
  cancel little precision even when features have a large common offset
  (post-ReLU Inception features are all positive); the result equals the
  one-shot ``np.cov`` up to round-off, whatever the batching.
  """

  def __init__(self):
    self._n = 0
    self._shift = None
    self._s1 = None
    self._s2 = None

  @property
  def n(self) -> int:
    return self._n

  def update(self, feats) -> None:
    """Adds a [B, D] batch of features (any float dtype, B may be 0)."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"Expected features of shape [B, D], got {x.shape}.")
    if x.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
      dim = x.shape[1]
      self._s1 = np.zeros(dim, np.float64)
      self._s2 = np.zeros((dim, dim), np.float64)
    elif x.shape[1] != self._shift.shape[0]:
      raise ValueError(
          f"Feature dim changed from {self._shift.shape[0]} to {x.shape[1]}.")
    xc = x - self._shift
    self._n += x.shape[0]
    self._s1 += xc.sum(axis=0)
    self._s2 += xc.T @ xc

  def merged(self, reduce_sum: Callable[[np.ndarray], np.ndarray]) -> FeatureStats:
    """The statistics of the union of every process's features (Chan et al., 1979).

    ``reduce_sum`` sums a float64 array over processes (the identity on one). Two reductions:
    first ``[n, sum_i x_i]`` gives the global mean ``m``; then each process's scatter about
    ``m``, ``s2 - s1 d^T - d s1^T + n d d^T`` with ``d = m - c`` (its shift ``c``), is summed, so
    nothing is shifted by a per-process constant that the others do not know. A process that
    saw no features contributes zeros.
    """
    dim = self._dim_for_merge(reduce_sum)
    s1 = np.zeros(dim) if self._s1 is None else self._s1
    shift = np.zeros(dim) if self._shift is None else self._shift
    first = reduce_sum(np.concatenate([[float(self._n)], self._n * shift + s1]))
    n = int(round(first[0]))
    if n < 2:
      raise ValueError(f"Need at least 2 feature vectors, got {n}.")
    mean = first[1:] / n
    d = mean - shift
    s2 = np.zeros((dim, dim)) if self._s2 is None else self._s2
    scatter = s2 - np.outer(s1, d) - np.outer(d, s1) + self._n * np.outer(d, d)
    sigma = reduce_sum(scatter) / (n - 1)
    return FeatureStats(mu=mean, sigma=0.5 * (sigma + sigma.T), n=n)

  def _dim_for_merge(self, reduce_sum) -> int:
    """The feature dimension, from the processes that saw features (one that saw none: 0)."""
    has = 0.0 if self._shift is None else 1.0
    total = reduce_sum(np.array([has, has * (0 if self._shift is None else len(self._shift))]))
    if total[0] == 0:
      raise ValueError("Need at least 2 feature vectors, got 0.")
    return int(round(total[1] / total[0]))

  def result(self) -> FeatureStats:
    """The statistics of everything added so far (needs n >= 2)."""
    if self._n < 2:
      raise ValueError(f"Need at least 2 feature vectors, got {self._n}.")
    n = self._n
    mean_c = self._s1 / n
    sigma = (self._s2 - n * np.outer(mean_c, mean_c)) / (n - 1)
    # Round-off can leave the matrix a hair asymmetric; symmetric stats
    # round-trip and compare exactly.
    sigma = 0.5 * (sigma + sigma.T)
    return FeatureStats(mu=self._shift + mean_c, sigma=sigma, n=n)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein) distance between two Gaussians.

  ``d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``
  (Dowson & Landau, 1982; FID of Heusel et al., 2017, eq. 6).

  The trace term is computed as ``Tr (R S2 R)^{1/2}`` with ``R = S1^{1/2}``: S1 S2 = R (R S2 R)
  R^{-1} is similar to the PSD matrix R S2 R (for singular S1 by continuity), so both have the
  same eigenvalues, and two symmetric eigendecompositions give the trace. TTUR and pytorch-fid
  take a general (Schur) ``sqrtm`` of S1 S2 instead: the same value to float rounding on
  full-rank covariances, 5-8x slower at Inception's 2,048 features (benchmarks/fid_trace.py),
  and complex or non-finite when the covariances are singular (fewer images than features). Here
  eigenvalues below zero are round-off of a PSD matrix and count as zero, so the result is real
  and finite for any covariances.

  Args:
    mu1: [D] mean of the first feature set.
    sigma1: [D, D] covariance of the first feature set.
    mu2: [D] mean of the second feature set.
    sigma2: [D, D] covariance of the second feature set.

  Returns:
    The squared distance ``d^2`` as a Python float (this is "the FID").

  Raises:
    ValueError: on shape mismatch.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"Mean shapes differ: {mu1.shape} vs {mu2.shape}.")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"Covariance shapes {sigma1.shape}, {sigma2.shape} do not match mean "
        f"shape {mu1.shape}.")

  diff = mu1 - mu2
  lam1, u = np.linalg.eigh(0.5 * (sigma1 + sigma1.T))
  root1 = (u * np.sqrt(np.clip(lam1, 0.0, None))) @ u.T
  inner = root1 @ sigma2 @ root1
  lam = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * tr_covmean)


def frechet_distance_from_stats(stats1: FeatureStats,
                                stats2: FeatureStats) -> float:
  """``frechet_distance`` between two ``FeatureStats``."""
  return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def inception_score(logits_or_probs, num_splits: int = 10,
                    is_probs: bool | None = None) -> tuple[float, float]:
  """Inception score: ``IS = exp(E_x KL(p(y|x) || p(y)))``.

  Salimans et al. (2016), eq. in Sec. 4. Following their released code, the N
  predictions are cut into ``num_splits`` contiguous parts (sizes differ by at
  most one); within each part ``p(y)`` is the mean of ``p(y|x)`` over the part,
  and the score is ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))`` with
  ``0 log 0 = 0``. The mean and (population) std over parts are returned.

  Args:
    logits_or_probs: [N, K] class logits or probabilities.
    num_splits: number of parts to average over.
    is_probs: whether the input already holds probabilities. ``None`` decides
      from the data: non-negative rows that sum to 1 are probabilities,
      anything else is treated as logits and passed through a softmax.

  Returns:
    ``(mean, std)`` of the per-split scores, as Python floats.
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2:
    raise ValueError(f"Expected [N, K] predictions, got shape {x.shape}.")
  n = x.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f"num_splits must be in [1, {n}], got {num_splits}.")
  if is_probs is None:
    is_probs = bool((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0,
                                                   atol=1e-4))
  probs = x if is_probs else special.softmax(x, axis=1)
  return inception_score_of_share(probs, 0, n, num_splits)


def inception_score_of_share(probs, offset: int, total: int, num_splits: int = 10,
                             reduce_sum: Callable[[np.ndarray], np.ndarray] = lambda a: a,
                             indices=None) -> tuple[float, float]:
  """``inception_score`` of ``total`` predictions held in contiguous shares by many processes.

  This process holds rows ``offset ... offset + len(probs) - 1`` of the [total, K] class
  probabilities. Part k is rows ``[k total / S, (k+1) total / S)``; its ``p(y)`` is the sum of
  its rows over all processes (``reduce_sum``) over its size, and its score
  ``exp(sum_x KL(p(y|x) || p(y)) / size)`` likewise needs only the reduced per-part KL sums.
  With one process (``offset=0``, identity reduction) this is the single-host computation.
  ``indices`` (the global row of each of ``probs``, any order) replaces the contiguous rows from
  ``offset`` for shares that are not contiguous (each process's own samples).

  Returns:
    ``(mean, std)`` over the parts, identical on every process.
  """
  probs = np.asarray(probs, np.float64).reshape(-1, np.shape(probs)[-1])
  if not 1 <= num_splits <= total:
    raise ValueError(f"num_splits must be in [1, {total}], got {num_splits}.")
  bounds = [k * total // num_splits for k in range(num_splits + 1)]
  rows = (np.arange(offset, offset + probs.shape[0]) if indices is None
          else np.asarray(indices, np.int64))
  part_of = np.searchsorted(bounds, rows, side="right") - 1  # the part each local row is in
  sizes = np.diff(bounds).astype(np.float64)
  prob_sums = np.zeros((num_splits, probs.shape[1]))
  np.add.at(prob_sums, part_of, probs)
  p_y = reduce_sum(prob_sums) / sizes[:, None]
  # rel_entr(p, q) = p log(p / q) with 0 log 0 = 0, so one-hot rows are fine.
  kl = special.rel_entr(probs, p_y[part_of]).sum(axis=1)
  kl_sums = np.zeros(num_splits)
  np.add.at(kl_sums, part_of, kl)
  scores = np.exp(reduce_sum(kl_sums) / sizes)
  return float(np.mean(scores)), float(np.std(scores))


def extract_features(fn: Callable[[Any], Mapping[str, Any]], images,
                     batch_size: int = 200) -> dict[str, np.ndarray]:
  """Runs a batched feature function over all of ``images``.

  The last partial batch is padded (by repeating its final image) and the
  padding is cut from the outputs: no image is dropped (a loader that drops
  the last batch biases FID), and every call has the same shape, so a jitted
  ``fn`` compiles once.

  Args:
    fn: maps a [batch_size, ...] array to a dict of [batch_size, ...] arrays.
    images: [N, ...] array, N >= 1.
    batch_size: rows per call.

  Returns:
    The dict of ``fn``'s outputs over all N rows, as NumPy arrays.
  """
  images = np.asarray(images)
  if images.shape[0] == 0:
    raise ValueError("extract_features needs at least one image.")
  outputs: dict[str, list[np.ndarray]] = {}
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    n = batch.shape[0]
    if n < batch_size:
      pad = np.repeat(batch[-1:], batch_size - n, axis=0)
      batch = np.concatenate([batch, pad], axis=0)
    for k, v in fn(batch).items():
      outputs.setdefault(k, []).append(np.asarray(v)[:n])
  return {k: np.concatenate(v, axis=0) for k, v in outputs.items()}
