"""The FID Inception-v3 (TF "2015-12-05" graph) in Flax, with a local loader.

This is the network TTUR and pytorch-fid compute FID with. It is torchvision's
Inception-v3 layout (Szegedy et al., 2016) with the FID graph's differences:

* the pool branch of the A, C and first E blocks averages over the valid
  (unpadded) window only (``count_include_pad=False``), as TF does;
* the last E block (``Mixed_7c``) max-pools in its pool branch instead;
* BatchNorm runs in inference mode with ``eps = 1e-3``;
* the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused).

Inputs are images [N, H, W, 3] in the uint8 range [0, 255] (any dtype).
``preprocess`` resizes them bilinearly to 299x299 with half-pixel centres and
no antialiasing (what pytorch-fid's ``F.interpolate(..., align_corners=False)``
does; TTUR's TF1 ``resize_bilinear`` used corner-aligned sampling, which moves
FID slightly) and maps ``x -> x / 127.5 - 1`` into [-1, 1]. The network then
returns ``{'pool3': [N, 2048], 'logits': [N, 1008]}``.

Weights file format (``.npz``). A flat mapping from '/'-joined Flax variable
paths, *without* the collection name, to float32 arrays in Flax layout:

* ``<layer>/conv/kernel``: conv kernel [KH, KW, C_in, C_out] (HWIO);
* ``<layer>/bn/scale`` and ``<layer>/bn/bias``: BatchNorm affine, [C_out]
  (collection ``params``);
* ``<layer>/bn/mean`` and ``<layer>/bn/var``: BatchNorm running statistics,
  [C_out] (collection ``batch_stats``);
* ``fc/kernel`` [2048, 1008] and ``fc/bias`` [1008].

``<layer>`` mirrors torchvision's module names, e.g. ``Conv2d_1a_3x3`` or
``Mixed_6b/branch7x7dbl_3``, so ``Mixed_5b.branch1x1.conv.weight`` in a PyTorch
state dict becomes ``Mixed_5b/branch1x1/conv/kernel`` here. The file is made
once, on a machine with internet, by ``tools/convert_inception_weights.py``
from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; nothing here ever
downloads.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from typing import Callable
from typing import Mapping

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL3_DIM = 2048
# Parameters in the 'params' collection (BatchNorm running stats excluded).
# torchvision's inception_v3(aux_logits=False) has 23,834,568 with a
# 1000-way fc; the FID graph's 1008-way fc adds 8 * (2048 + 1) = 16,392.
NUM_PARAMS = 23_850_960
# Full float32 convolutions and matmuls. The default precision lets TPUs use
# bf16 passes and recent GPUs TF32, which moves features by ~1e-3 relative and
# FID with them; the network is a small part of an evaluation's cost.
_PRECISION = jax.lax.Precision.HIGHEST

Variables = Mapping[str, Any]


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=_PRECISION, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_valid(x):
  """3x3/1 average over the in-image part of each window (TF semantics)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled-1x1 branches."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1),
                     name="branch_pool")(_avg_pool_valid(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_valid(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 heads.

  Attributes:
    pool: 'avg' (``Mixed_7b``) or 'max' (``Mixed_7c``, the FID graph's quirk).
  """

  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    match self.pool:
      case "avg":
        pooled = _avg_pool_valid(x)
      case "max":
        # Max-pool pads with -inf, so the padding never wins (torch/TF agree).
        pooled = nn.max_pool(x, (3, 3), strides=(1, 1),
                             padding=((1, 1), (1, 1)))
      case _:
        raise ValueError(f"Unknown pool {self.pool!r}; expected 'avg'/'max'.")
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3.

  ``__call__`` takes uint8-range images [N, H, W, 3] (see ``preprocess``);
  ``features`` takes [N, 299, 299, 3] inputs already in [-1, 1].

  Attributes:
    num_classes: classifier outputs (1008 in the FID graph).
  """

  num_classes: int = NUM_LOGITS

  def __call__(self, images):
    return self.features(preprocess(images))

  @nn.compact
  def features(self, x):
    """Returns ``{'pool3': [N, 2048], 'logits': [N, num_classes]}``."""
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    # Dropout sits here in training graphs; inference skips it.
    logits = nn.Dense(self.num_classes, precision=_PRECISION,
                      name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


def preprocess(images) -> jax.Array:
  """uint8-range [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1].

  ``y = resize_bilinear(x, 299x299) / 127.5 - 1``; resizing is skipped when
  the input is already 299x299 (a half-pixel bilinear resize to the same size
  is the identity anyway).
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"Expected images [N, H, W, 3], got {x.shape}.")
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    # antialias=False: a plain bilinear tap like pytorch-fid; jax's default
    # would low-pass filter when downsampling and shift FID for large inputs.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                         method="bilinear", antialias=False)
  return x / 127.5 - 1.0


def inception_variable_shapes(model: InceptionV3 | None = None) -> Variables:
  """Abstract variables (``jax.ShapeDtypeStruct``), without any compute."""
  model = model or InceptionV3()
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(
      functools.partial(model.init, method=InceptionV3.features),
      jax.random.key(0), x)


def _flatten(variables: Variables) -> dict[str, tuple[str, Any]]:
  """'/'-joined path (collection dropped) -> (collection, leaf)."""
  flat = {}
  for collection, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
      if path in flat:
        raise ValueError(f"Variable {path!r} appears in two collections.")
      flat[path] = (collection, leaf)
  return flat


def save_inception_params(path: str | os.PathLike,
                          variables: Variables) -> None:
  """Writes ``variables`` as the flat ``.npz`` described in the module doc."""
  flat = _flatten(variables)
  np.savez(path, **{k: np.asarray(leaf) for k, (_, leaf) in flat.items()})


def load_inception_params(path: str | os.PathLike,
                          reference_variables: Variables | None = None
                          ) -> Variables:
  """Loads a weights ``.npz`` and checks it against the expected variables.

  Args:
    path: local ``.npz`` in the format of the module docstring.
    reference_variables: variables (or ``ShapeDtypeStruct``s) giving the
      expected names, shapes and dtypes; defaults to
      ``inception_variable_shapes()``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of ``jax.Array``s.

  Raises:
    ValueError: naming every missing, unused and wrongly shaped weight.
  """
  if reference_variables is None:
    reference_variables = inception_variable_shapes()
  expected = _flatten(reference_variables)
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}

  missing = sorted(set(expected) - set(arrays))
  unused = sorted(set(arrays) - set(expected))
  mismatched = sorted(
      f"{k}: file {arrays[k].shape} vs expected {tuple(expected[k][1].shape)}"
      for k in set(arrays) & set(expected)
      if arrays[k].shape != tuple(expected[k][1].shape))
  if missing or unused or mismatched:
    problems = []
    for title, names in (("missing", missing), ("unused", unused),
                         ("shape mismatch", mismatched)):
      if names:
        problems.append(f"{title} ({len(names)}): " + ", ".join(names))
    raise ValueError(f"Inception weights {os.fspath(path)!r} do not match the "
                     "network; " + "; ".join(problems))

  nested: dict[str, dict[str, Any]] = {}
  for key, (collection, ref) in expected.items():
    nested.setdefault(collection, {})[key] = jnp.asarray(arrays[key],
                                                         ref.dtype)
  return {c: traverse_util.unflatten_dict(tree, sep="/")
          for c, tree in nested.items()}


@jax.jit
def _jit_preprocess(images):
  return preprocess(images)


@jax.jit
def _jit_features(variables, x):
  return InceptionV3().apply(variables, x, method=InceptionV3.features)


def make_inception_fn(
    variables: Variables) -> Callable[[Any], dict[str, jax.Array]]:
  """Returns ``fn(images_uint8) -> {'pool3', 'logits'}`` for batches.

  Preprocessing and the network are jitted separately and the weights are an
  argument, not a constant: the network then compiles once per batch size,
  whatever the input resolution, and new weights reuse the compiled code.
  Sharding the batch over a mesh before the call shards the computation.
  """

  def fn(images):
    return _jit_features(variables, _jit_preprocess(images))

  return fn
