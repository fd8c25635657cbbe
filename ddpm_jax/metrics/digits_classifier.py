"""An offline FID/IS analogue for the embedded 8x8 digits dataset, with a floor.

Inception-v3 is meaningless on 8x8 grey images (and needs weights from the
internet), so the digits default is scored with a small CNN trained here, in
a few seconds, on the digits *train* split (the first 1,437 images of
sklearn's ``load_digits``, the same images the diffusion model trains on).
Its penultimate layer (128-d) plays the part of Inception's pool3 and its 10
logits the part of the ImageNet classifier.

Which images play which part (the design of ``digits_score``):

* **Classifier**: the train split. The diffusion model also trains on it;
  that is harmless, since neither the reference nor the floor uses it.
* **Reference statistics**: half of the 360 held-out *test* images, which
  neither network has seen. A classifier's features are over-fitted on its
  own training images (confident, tightly clustered), so a train-split
  reference would make every held-out image look far away: earlier versions
  printed real test digits at FD 43 next to samples at FD 16.
* **Floor**: the other half of the held-out images, scored against that
  reference exactly as samples are. It is what a perfect generator (one that
  draws fresh digits from the data distribution) would score.
* **Equal sample counts**: FD is biased upwards by ``O(1/n)`` in the number
  of images, so samples and floor are both scored on ``n = min(N, 180)``
  images (``N`` the number of samples; a random subset of the samples when
  ``N > n``). Both numbers are averaged over ``num_splits`` random halvings
  of the held-out set (each with its own sample subset), which averages out
  the choice of halves.

A generator whose samples follow the held-out digits' distribution scores,
in expectation, the floor; a worse one scores above it. The diffusion model,
though, learns the train split, and sklearn's digits are ordered by writer:
real *train* digits sit about 1.5x above the floor, in the classifier's
features and equally in raw pixels (so this is a shift between writers, not
the classifier's over-fitting). That level is reported too, as
``frechet_distance_train_real`` (same n, same halvings): a model that
reproduces its training set exactly scores there, and noise scores ~8x the
floor.

The reported numbers:

* ``frechet_distance``, ``frechet_distance_floor`` and
  ``frechet_distance_train_real``: the Fréchet distance
  ``||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^{1/2})`` of samples, of
  held-out real digits and of real train digits to the reference
  (``fid.frechet_distance``), at ``fd_num_images`` images each;
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` in [1, 10];
* ``mean_confidence``: ``E_x max_y p(y|x)``, with the held-out real digits'
  value as ``mean_confidence_real``;
* ``class_histogram``: predicted classes (mode dropping shows up here first).

Samples go through the same uint8 quantisation as for FID: float samples in
[-1, 1] become ``round((x + 1) * 127.5)`` in [0, 255], and the classifier sees
``u / 127.5 - 1``, exactly what the input pipeline feeds the diffusion model.

These numbers are comparable only between runs that use the same classifier
(same seed and ``_CACHE_VERSION``) and the same ``fd_num_images``; they are
not FIDs.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any
from typing import Callable
from typing import Mapping

from absl import logging
from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax.data.digits import load_digits_arrays
from ddpm_jax.metrics import fid

NUM_CLASSES = 10
FEATURE_DIM = 128
# Bump when the architecture or training recipe changes, so stale caches are
# not loaded (the file name carries it).
_CACHE_VERSION = 1
_BATCH_SIZE = 128
_NUM_STEPS = 600
_LEARNING_RATE = 1e-2
_EVAL_BATCH = 256

Variables = Mapping[str, Any]


def _patches_3x3(x, stride: int = 1):
  """[N, H, W, C] -> [N, H/stride, W/stride, 9C] zero-padded 3x3 patches.

  A Dense layer on these is exactly a 'SAME' 3x3 convolution. XLA:CPU's
  convolution emitter is slow on 8x8 maps with small channel counts; nine
  slices and a matmul are much faster there, which keeps training short.
  """
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  views = [xp[:, i:i + h:stride, j:j + w:stride, :]
           for i in range(3) for j in range(3)]
  return jnp.concatenate(views, axis=-1)


class DigitsClassifier(nn.Module):
  """conv3x3(16) -> conv3x3(32, /2) -> Dense(128) [features] -> Dense(10).

  Swish rather than ReLU so no feature unit is dead on every input; a dead
  unit gives a zero row in both covariances.
  """

  num_classes: int = NUM_CLASSES
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x):
    """Maps [N, 8, 8, 1] floats in [-1, 1] to {'features', 'logits'}."""
    x = nn.swish(nn.Dense(16, name="conv1")(_patches_3x3(x)))
    x = nn.swish(nn.Dense(32, name="conv2")(_patches_3x3(x, stride=2)))
    x = x.reshape(x.shape[0], -1)
    features = nn.swish(nn.Dense(self.feature_dim, name="feature")(x))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return {"features": features, "logits": logits}


def to_uint8(samples) -> np.ndarray:
  """Quantises samples to uint8 [N, 8, 8, 1], as for FID.

  uint8 input is kept; float input in [-1, 1] maps to
  ``clip(round((x + 1) * 127.5), 0, 255)``. A missing channel axis is added.
  """
  x = np.asarray(samples)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
    raise ValueError(f"Expected digits [N, 8, 8, 1], got {x.shape}.")
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"Expected uint8 or float samples, got {x.dtype}.")
  if not np.isfinite(x).all():
    # A diverged sampler must not pass as black images.
    raise ValueError("Samples contain NaN or inf.")
  return np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0,
                 255).astype(np.uint8)


def _to_model_input(images_uint8):
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


@jax.jit
def _apply(variables, images_uint8):
  return DigitsClassifier().apply(variables, _to_model_input(images_uint8))


def make_digits_fn(
    variables: Variables) -> Callable[[Any], dict[str, jax.Array]]:
  """Returns ``fn(images_uint8 [B, 8, 8, 1]) -> {'features', 'logits'}``."""
  return functools.partial(_apply, variables)


def digits_features(variables: Variables, samples) -> dict[str, np.ndarray]:
  """Features [N, 128] and logits [N, 10] of uint8 or [-1, 1] samples."""
  return fid.extract_features(make_digits_fn(variables), to_uint8(samples),
                              batch_size=_EVAL_BATCH)


def _shift_augment(rng, x):
  """Moves each image by up to one pixel in each direction (background fill).

  Generated digits are rarely perfectly centred; translation invariance keeps
  the features about shape rather than position.
  """
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (x.shape[0], 2), 0, 3)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (8, 8, 1))

  return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("num_steps", "batch_size"))
def _train(rng, images, labels, num_steps: int, batch_size: int):
  """Minimises ``E[-log softmax(f(x))_y]`` with AdamW in one ``fori_loop``.

  Batches are drawn uniformly with replacement and shift-augmented; the
  learning rate warms up over 5% of the steps and then decays as a cosine.
  """
  model = DigitsClassifier()
  init_rng, loop_rng = jax.random.split(rng)
  params = model.init(init_rng, images[:1])["params"]
  tx = optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, _LEARNING_RATE, num_steps // 20,
                                         num_steps), weight_decay=1e-4)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(i, carry):
    p, opt_state = carry
    batch_rng, aug_rng = jax.random.split(jax.random.fold_in(loop_rng, i))
    # With replacement: a per-step permutation costs more than the step.
    idx = jax.random.randint(batch_rng, (batch_size,), 0, images.shape[0])
    x = _shift_augment(aug_rng, images[idx])
    grads = jax.grad(loss_fn)(p, x, labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, num_steps, step, (params, tx.init(params)))
  return {"params": params}


def train_digits_classifier(seed: int = 0) -> tuple[Variables, float]:
  """Trains the classifier on the train split and scores the test split.

  Args:
    seed: PRNG seed for init, batch order and augmentation.

  Returns:
    ``(variables, test_accuracy)``, the accuracy on the 360 held-out images.
  """
  train_x, train_y = load_digits_arrays("train")
  variables = _train(jax.random.key(seed), _to_model_input(train_x),
                     jnp.asarray(train_y, jnp.int32), num_steps=_NUM_STEPS,
                     batch_size=_BATCH_SIZE)
  variables = jax.tree.map(np.asarray, variables)
  test_x, test_y = load_digits_arrays("test")
  logits = digits_features(variables, test_x)["logits"]
  accuracy = float(np.mean(np.argmax(logits, axis=-1) == test_y))
  return variables, accuracy


def _cache_path(cache_dir: str | os.PathLike, seed: int) -> str:
  return os.path.join(
      cache_dir, f"digits_classifier_v{_CACHE_VERSION}_seed{seed}.msgpack")


def _matches_architecture(variables) -> bool:
  expected = jax.eval_shape(DigitsClassifier().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  try:
    same = jax.tree.map(lambda a, b: a.shape == b.shape, variables, expected)
  except ValueError:  # Different tree structure.
    return False
  return all(jax.tree.leaves(same))


def get_digits_classifier(cache_dir: str | os.PathLike,
                          seed: int = 0) -> tuple[Variables, float]:
  """Loads the classifier from ``cache_dir``, training and saving it once.

  The cache is one msgpack file (``flax.serialization``) holding the
  variables and the test accuracy. It is written atomically (temp file then
  rename), so concurrent evaluators never read half a file.

  Args:
    cache_dir: directory for the cache file; created if missing.
    seed: training seed (part of the file name).

  Returns:
    ``(variables, test_accuracy)``.
  """
  path = _cache_path(cache_dir, seed)
  if os.path.exists(path):
    with open(path, "rb") as f:
      state = serialization.msgpack_restore(f.read())
    if _matches_architecture(state.get("variables")):
      return state["variables"], float(state["test_accuracy"])
    logging.warning("Digits classifier cache %s does not match the network; "
                    "retraining.", path)

  variables, accuracy = train_digits_classifier(seed)
  os.makedirs(cache_dir, exist_ok=True)
  payload = serialization.msgpack_serialize(
      {"variables": variables, "test_accuracy": np.float64(accuracy)})
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(payload)
  os.replace(tmp, path)
  logging.info("Digits classifier: test accuracy %.4f, cached at %s.",
               accuracy, path)
  return variables, accuracy


def _mean_confidence(logits) -> float:
  """``E_x max_y softmax(logits(x))_y``."""
  return float(np.mean(np.max(jax.nn.softmax(np.asarray(logits, np.float64)),
                              axis=-1)))


def digits_score(samples, cache_dir: str | os.PathLike, seed: int = 0,
                 num_splits: int = 10) -> dict[str, Any]:
  """Scores digit samples against held-out real digits, next to their floor.

  Args:
    samples: [N, 8, 8, 1] (or [N, 8, 8]) uint8 in [0, 255] or float in
      [-1, 1]; floats are quantised to uint8 first. N >= 2.
    cache_dir: where the classifier is cached (see ``get_digits_classifier``).
    seed: classifier training seed; also seeds the halvings and subsets.
    num_splits: random halvings of the held-out split to average over.

  Returns:
    A dict with
      'frechet_distance': mean over halvings of the FD between
        ``fd_num_images`` samples and the reference half;
      'frechet_distance_floor': the same for the other, held-out half of the
        real digits: what a perfect generator scores;
      'frechet_distance_train_real': the same for real train-split digits,
        the score of a model that reproduces its training set;
      'fd_num_images': n, the image count of each FD;
      'inception_score': ``exp(E_x KL(p(y|x) || p(y)))`` of all samples
        (one split), between 1 and 10;
      'mean_confidence': mean max class probability of all samples;
      'mean_confidence_real': the same for the 360 held-out real digits;
      'class_histogram': list of 10 counts of predicted classes;
      'classifier_test_accuracy': held-out accuracy of the classifier.
  """
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
  variables, accuracy = get_digits_classifier(cache_dir, seed)
  out = digits_features(variables, samples)
  if len(out["features"]) < 2:
    raise ValueError("digits_score needs at least 2 samples for a covariance.")
  held_out = digits_features(variables, load_digits_arrays("test")[0])
  train_features = digits_features(variables,
                                   load_digits_arrays("train")[0])["features"]
  half = len(held_out["features"]) // 2
  n = min(len(out["features"]), half)
  rng = np.random.default_rng(seed)
  fd_samples, fd_floor, fd_train = [], [], []
  for _ in range(num_splits):
    order = rng.permutation(len(held_out["features"]))
    reference = fid.FeatureStats.from_features(
        held_out["features"][order[:half]])
    floor = fid.FeatureStats.from_features(
        held_out["features"][order[half:half + n]])
    subset = rng.choice(len(out["features"]), n, replace=False)
    sample_stats = fid.FeatureStats.from_features(out["features"][subset])
    fd_samples.append(fid.frechet_distance_from_stats(reference, sample_stats))
    fd_floor.append(fid.frechet_distance_from_stats(reference, floor))
    train_stats = fid.FeatureStats.from_features(
        train_features[rng.choice(len(train_features), n, replace=False)])
    fd_train.append(fid.frechet_distance_from_stats(reference, train_stats))
  is_mean, _ = fid.inception_score(out["logits"], num_splits=1,
                                   is_probs=False)
  predicted = np.argmax(out["logits"], axis=-1)
  return {
      "frechet_distance": float(np.mean(fd_samples)),
      "frechet_distance_floor": float(np.mean(fd_floor)),
      "frechet_distance_train_real": float(np.mean(fd_train)),
      "fd_num_images": n,
      "inception_score": is_mean,
      "mean_confidence": _mean_confidence(out["logits"]),
      "mean_confidence_real": _mean_confidence(held_out["logits"]),
      "class_histogram":
          np.bincount(predicted, minlength=NUM_CLASSES).tolist(),
      "classifier_test_accuracy": accuracy,
  }
