"""Tests for ddpm_jax.metrics.inception (random weights; no network access).

Compiling the full network on CPU dominates the cost, so the network is
compiled once (batch 2 at 299x299): 32x32 inputs go through a separately
jitted resize and reuse it, and so do reloaded weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.metrics import inception

BATCH = 2


@pytest.fixture(scope="module")
def shapes():
  return inception.inception_variable_shapes()


@pytest.fixture(scope="module")
def variables(shapes):
  """He-scaled random weights and random BN statistics, made in NumPy.

  Cheaper than compiling ``model.init`` for the full network, and every
  tensor (running stats included) holds distinct values, so a loader that
  mixed up names would change the outputs.
  """
  rng = np.random.default_rng(0)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = np.prod(s.shape[:-1])
      return rng.normal(0, np.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
    if "'var'" in name or "'scale'" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (BATCH, 299, 299, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def outputs(variables, images):
  return jax.tree.map(np.asarray,
                      inception.make_inception_fn(variables)(images))


def test_param_count(shapes):
  sizes = [x.size for x in jax.tree.leaves(shapes["params"])]
  assert sum(sizes) == inception.NUM_PARAMS == 23_850_960
  # 94 conv layers, each with a BatchNorm (scale, bias | mean, var), + fc.
  assert len(sizes) == 94 * 3 + 2
  assert len(jax.tree.leaves(shapes["batch_stats"])) == 94 * 2
  fc = shapes["params"]["fc"]
  assert fc["kernel"].shape == (2048, 1008) and fc["bias"].shape == (1008,)
  assert shapes["params"]["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3,
                                                                       3, 32)


def test_outputs_at_299(outputs):
  assert outputs["pool3"].shape == (BATCH, inception.POOL3_DIM)
  assert outputs["logits"].shape == (BATCH, inception.NUM_LOGITS)
  for v in outputs.values():
    assert np.isfinite(v).all()
  # pool3 is an average of ReLU outputs.
  assert (outputs["pool3"] >= 0).all() and outputs["pool3"].std() > 0
  assert not np.allclose(outputs["pool3"][0], outputs["pool3"][1])


def test_32x32_uint8_inputs_are_resized(variables, images):
  small = images[:, :32, :32]
  out = inception.make_inception_fn(variables)(small)
  assert out["pool3"].shape == (BATCH, 2048)
  assert out["logits"].shape == (BATCH, 1008)
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())
  # The module's own __call__ takes the same uint8-range input.
  abstract = jax.eval_shape(inception.InceptionV3().apply, variables,
                            jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.uint8))
  assert abstract["pool3"].shape == (3, 2048)


def _torch_bilinear_reference(x, out_size):
  """F.interpolate(mode='bilinear', align_corners=False) written in NumPy.

  Source coordinate ``(dst + 0.5) * in / out - 0.5``, clamped at 0; the
  right neighbour index is clamped to the last pixel.
  """
  def weights(n_in):
    src = np.maximum((np.arange(out_size) + 0.5) * n_in / out_size - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((out_size, n_in))
    np.add.at(m, (np.arange(out_size), i0), 1 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m

  wh, ww = weights(x.shape[1]), weights(x.shape[2])
  rows = np.einsum("ph,nhwc->npwc", wh, x.astype(np.float64))
  return np.einsum("npwc,qw->npqc", rows, ww)


@pytest.mark.parametrize("size", [32, 400])
def test_preprocess_matches_pytorch_fid_resize(size):
  rng = np.random.default_rng(size)
  x = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(x))
  want = _torch_bilinear_reference(x, 299) / 127.5 - 1.0
  assert got.shape == (1, 299, 299, 3)
  # float32 sample coordinates drift by ~1e-5 pixel over 299 outputs; 1e-4
  # here is 0.013 grey levels, far below one uint8 step.
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert got.min() >= -1.0 and got.max() <= 1.0


def test_preprocess_at_299_is_scaling_only(images):
  np.testing.assert_allclose(np.asarray(inception.preprocess(images)),
                             images / 127.5 - 1.0, atol=1e-6)


def test_fid_variant_pooling():
  # count_include_pad=False: a constant image stays constant at the border.
  ones = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(inception._avg_pool_valid(ones), ones)
  # Mixed_7b average-pools its pool branch, Mixed_7c max-pools (traced only).
  x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
  ops = {}
  for pool in ("avg", "max"):
    block = inception.InceptionE(pool)
    block_vars = jax.eval_shape(block.init, jax.random.key(0), x)
    ops[pool] = str(jax.make_jaxpr(block.apply)(block_vars, x))
  assert "reduce_window_sum" in ops["avg"]
  assert "reduce_window_max" not in ops["avg"]
  assert "reduce_window_max" in ops["max"]
  assert "reduce_window_sum" not in ops["max"]
  with pytest.raises(ValueError, match="pool"):
    jax.eval_shape(inception.InceptionE("min").init, jax.random.key(0), x)


def _flat(variables):
  flat = inception._flatten(variables)
  return {k: np.asarray(v) for k, (_, v) in flat.items()}


def test_weights_round_trip(tmp_path, variables, images, outputs, shapes):
  path = tmp_path / "inception.npz"
  inception.save_inception_params(path, variables)
  loaded = inception.load_inception_params(path, shapes)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  again = inception.make_inception_fn(loaded)(images)
  for key in outputs:
    np.testing.assert_array_equal(np.asarray(again[key]), outputs[key])


@pytest.mark.parametrize("problem, key, message", [
    ("missing", "Mixed_6b/branch7x7_2/bn/mean", "missing"),
    ("extra", "Mixed_6b/branch7x7_2/bn/num_batches_tracked", "unused"),
    ("shape", "Mixed_7c/branch_pool/conv/kernel", "shape mismatch"),
])
def test_loader_rejects_bad_files(tmp_path, variables, shapes, problem, key,
                                  message):
  flat = _flat(variables)
  if problem == "missing":
    del flat[key]
  elif problem == "extra":
    flat[key] = np.zeros((), np.int64)
  else:
    flat[key] = np.swapaxes(flat[key], -1, -2)  # OIHW-style mix-up.
  path = tmp_path / f"{problem}.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=message) as err:
    inception.load_inception_params(path, shapes)
  assert key in str(err.value)


def test_every_conv_and_matmul_runs_at_full_precision(shapes):
  # Default precision would let TPUs/GPUs use bf16/TF32 and shift the FID.
  jaxpr = str(jax.make_jaxpr(inception.InceptionV3().apply)(
      shapes, jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.uint8)))
  assert jaxpr.count("conv_general_dilated[") == 94
  assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 95
