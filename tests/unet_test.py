"""Tests of the DDPM U-Net: exact size, shapes, dropout, timestep use, gradients, dtypes."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq256
from configs import cifar10
from configs import digits
from ddpm_jax import models
from ddpm_jax.config import factories
from ddpm_jax.models import layers
from ddpm_jax.models import ops

# Tiny models run on 8x8 images: level 0 at 8x8, level 1 (with attention) at 4x4.
IMAGE_SIZE = 8
BATCH = 2


def _inputs(channels=1):
  # NumPy rather than jax.random: eager RNG ops would each compile on first use.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, IMAGE_SIZE, IMAGE_SIZE, channels)).astype(np.float32)
  t = rng.integers(0, 1000, (BATCH,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t)


@functools.lru_cache(maxsize=None)
def _random_params(module):
  """Random, non-degenerate params for `module`, built from eval_shape and NumPy.

  The real init leaves the output conv (and every residual branch's last layer) at
  ~0, so a fresh model outputs ~0 whatever its input and properties like "the output
  depends on t" would hold vacuously or fail. Here kernels are N(0, 1/fan_in),
  GroupNorm scales 1 + N(0, 0.1^2) and biases N(0, 0.1^2), so every layer matters.
  This also skips a jitted init, whose RNG takes seconds to compile.
  """
  rng = np.random.default_rng(42)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * noise)

  shapes = models.param_shapes(module, IMAGE_SIZE, 1)
  return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


# Tiny U-Net on 1-channel 8x8 images; caches keyed on it share work between tests.
TINY = models.TinyUNet(out_channels=1)


@functools.lru_cache(maxsize=None)
def _apply_fn(module, train):
  # jit so that each test compiles the model once instead of dispatching op by op.
  return jax.jit(lambda v, x, t, rngs: module.apply(v, x, t, train=train, rngs=rngs))


def test_cifar10_param_count_matches_ddpm():
  model = factories.create_model(cifar10.get_config())
  assert models.param_count(model, 32, 3) == 35_746_307


def test_params_are_float32_even_with_bfloat16_compute():
  config = cifar10.get_config()
  config.model.dtype = "bfloat16"
  shapes = models.param_shapes(factories.create_model(config), 32, 3)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  # Same parameters as the float32 model: the compute dtype must not change the architecture.
  assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == 35_746_307


def test_256_model_builds():
  config = celebahq256.get_config()
  model = factories.create_model(config)
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 256, 256, 3)),
                                     jnp.zeros((1,), jnp.int32), train=False)[0])
  assert out.shape == (1, 256, 256, 3)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("model_var,out_channels", [("fixed_large", 1), ("learned_range", 2),
                                                    ("learned", 2)])
def test_digits_model_output_shape(model_var, out_channels):
  config = digits.get_config()
  config.diffusion.model_var = model_var
  model = factories.create_model(config)
  assert model.out_channels == out_channels
  x, t = _inputs(channels=1)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, train=False)[0])
  assert out.shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, out_channels)


def test_digits_model_runs_and_is_finite():
  model = factories.create_model(digits.get_config())
  x, t = _inputs(channels=1)
  out = _apply_fn(model, False)(_random_params(model), x, t, None)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_tiny_output_shape_and_learned_variance_channels():
  x, t = _inputs()
  out = _apply_fn(TINY, False)(_random_params(TINY), x, t, None)
  assert out.shape == x.shape and out.dtype == jnp.float32
  learned = models.TinyUNet(out_channels=2)
  out2 = jax.eval_shape(lambda: learned.init_with_output(jax.random.key(0), x, t, train=False)[0])
  assert out2.shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 2)


def test_fresh_model_output_is_near_zero():
  # The output conv starts at ~0 (variance 1e-10, as in DDPM), so an untrained model
  # predicts ~0 noise: about 1e-5 here, against O(1) for a conv with the usual init.
  x, t = _inputs()
  out, _ = jax.jit(lambda: TINY.init_with_output(jax.random.key(0), x, t, train=False))()
  assert np.max(np.abs(out)) < 1e-3


def test_dropout_only_in_training():
  model = models.TinyUNet(out_channels=1, dropout=0.5)
  x, t = _inputs()
  variables = _random_params(TINY)  # dropout has no params: same tree as TINY
  train_fn, eval_fn = _apply_fn(model, True), _apply_fn(model, False)
  k1, k2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}

  train1, train1_again, train2 = (train_fn(variables, x, t, k1), train_fn(variables, x, t, k1),
                                  train_fn(variables, x, t, k2))
  np.testing.assert_array_equal(train1, train1_again)  # dropout is a function of its rng
  assert np.max(np.abs(train1 - train2)) > 1e-3

  eval1, eval2, eval_no_rng = (eval_fn(variables, x, t, k1), eval_fn(variables, x, t, k2),
                               eval_fn(variables, x, t, None))
  np.testing.assert_array_equal(eval1, eval2)
  np.testing.assert_array_equal(eval1, eval_no_rng)
  assert np.max(np.abs(eval1 - train1)) > 1e-3


def test_output_depends_on_timestep():
  x, _ = _inputs()
  t0, t1 = jnp.full((BATCH,), 10, jnp.int32), jnp.full((BATCH,), 500, jnp.int32)
  variables = _random_params(TINY)
  fn = _apply_fn(TINY, False)
  out0, out1 = fn(variables, x, t0, None), fn(variables, x, t1, None)
  assert np.max(np.abs(out0 - out1)) > 1e-2 * np.max(np.abs(out0))
  # A scalar timestep is broadcast over the batch.
  np.testing.assert_allclose(fn(variables, x, jnp.int32(10), None), out0, rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_and_reach_every_param():
  x, t = _inputs()

  @jax.jit
  def loss(params):
    return jnp.mean(TINY.apply({"params": params}, x, t, train=False) ** 2)

  grads = jax.grad(loss)(_random_params(TINY)["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


def test_bfloat16_compute_close_to_float32():
  x, t = _inputs()
  model16 = models.TinyUNet(out_channels=1, dtype=jnp.bfloat16)
  variables = _random_params(TINY)
  shapes16 = jax.eval_shape(lambda: model16.init(jax.random.key(0), x, t, train=False))["params"]
  # Same param tree, all float32: one checkpoint serves both compute dtypes.
  assert jax.tree.structure(shapes16) == jax.tree.structure(variables["params"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))

  out32 = _apply_fn(TINY, False)(variables, x, t, None)
  out16 = _apply_fn(model16, False)(variables, x, t, None)
  assert out16.dtype == jnp.float32
  assert np.all(np.isfinite(out16))
  # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op); through ~20
  # layers the error compounds to a few percent, so 5% relative (in L2 norm) is the bound.
  rel_err = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel_err < 5e-2, rel_err


def _equations(jaxpr):
  """Every equation of a jaxpr, recursing into sub-jaxprs (jit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_bfloat16_training_keeps_norms_softmax_and_loss_in_float32():
  """With bfloat16 compute, every reduction (GroupNorm statistics, the softmax, the loss) and every
  exp / rsqrt of the forward pass and the loss reads float32, and the loss is float32."""
  from ddpm_jax.core import losses  # pylint: disable=g-import-not-at-top
  from ddpm_jax.core import schedules  # pylint: disable=g-import-not-at-top

  x, t = _inputs()
  model16 = models.TinyUNet(out_channels=1, dtype=jnp.bfloat16)
  variables = _random_params(TINY)
  loss_fn = losses.get_loss_fn(schedules.make_tables(schedules.get_beta_schedule("linear", 1000)))

  def loss(params):
    model_fn = lambda x_t, t_: model16.apply({"params": params}, x_t, t_, train=False)
    return jnp.mean(loss_fn(model_fn, x, t, x[::-1])[0])

  closed = jax.make_jaxpr(loss)(variables["params"])
  assert closed.out_avals[0].dtype == jnp.float32
  checked = {"reduce_sum", "reduce_max", "exp", "rsqrt", "log"}
  seen = collections.Counter()
  for eqn in _equations(closed.jaxpr):
    if eqn.primitive.name in checked:
      seen[eqn.primitive.name] += 1
      assert all(v.aval.dtype == jnp.float32 for v in eqn.invars), (eqn.primitive, eqn.invars)
  assert seen["reduce_max"] >= 1 and seen["exp"] >= 1 and seen["rsqrt"] >= 1, seen
  # And the convolutions and matmuls really run in bfloat16.
  assert any(eqn.primitive.name == "conv_general_dilated" and
             eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in _equations(closed.jaxpr))


def test_create_model_rejects_unknown_dtype():
  config = cifar10.get_config()
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="bfloat16"):
    factories.create_model(config)


def test_input_size_must_divide_by_downsampling():
  model = models.TinyUNet(out_channels=1)
  with pytest.raises(ValueError, match="divisible"):
    model.init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)), jnp.zeros((1,), jnp.int32), train=False)


def test_timestep_embedding_formula():
  t = jnp.array([0, 1, 999], jnp.int32)
  emb = layers.timestep_embedding(t, 8)
  freqs = np.exp(-np.log(10_000.0) / 3 * np.arange(4))
  args = np.array([0, 1, 999], np.float64)[:, None] * freqs[None]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  np.testing.assert_allclose(emb, expected, atol=1e-4)
  assert emb.dtype == jnp.float32


def test_avg_pool_resampling_variant_runs():
  model = models.TinyUNet(out_channels=1, resamp_with_conv=False)
  x, t = _inputs()
  variables = _random_params(model)
  # Resampling has no params, and the output keeps the input's shape.
  assert not any("sample" in name for name in variables["params"])
  assert _apply_fn(model, False)(variables, x, t, None).shape == x.shape


# --- Class-conditional U-Net (model.num_classes) ---------------------------------------------

COND = models.TinyUNet(out_channels=1, num_classes=3)


def test_unconditional_param_tree_unchanged_and_conditional_adds_only_the_embedding():
  uncond = models.param_shapes(TINY, IMAGE_SIZE, 1)
  cond = models.param_shapes(COND, IMAGE_SIZE, 1)
  assert "class_emb" not in uncond
  assert cond["class_emb"]["embedding"].shape == (3 + 1, 4 * 16)  # K + 1 rows, null last
  rest = {k: v for k, v in cond.items() if k != "class_emb"}
  assert jax.tree.map(lambda s: s.shape, rest) == jax.tree.map(lambda s: s.shape, uncond)


def test_labels_change_the_output_and_none_means_the_null_class():
  variables = _random_params(COND)
  x, t = _inputs()
  apply = jax.jit(lambda y: COND.apply(variables, x, t, y, train=False))
  out = {c: np.asarray(apply(jnp.full((BATCH,), c, jnp.int32))) for c in range(4)}
  null = np.asarray(jax.jit(lambda: COND.apply(variables, x, t, train=False))())
  np.testing.assert_array_equal(null, out[3])
  for c in range(3):
    assert np.abs(out[c] - out[3]).max() > 1e-3


def test_labels_on_an_unconditional_unet_fail():
  x, t = _inputs()
  with pytest.raises(ValueError, match="unconditional"):
    TINY.apply(_random_params(TINY), x, t, jnp.zeros((BATCH,), jnp.int32), train=False)


def test_float_timesteps_interpolate_between_integer_ones():
  variables = _random_params(TINY)
  x, _ = _inputs()
  apply = jax.jit(lambda t: TINY.apply(variables, x, t, train=False))
  a, b = apply(jnp.full((BATCH,), 10.0)), apply(jnp.full((BATCH,), 11.0))
  mid = apply(jnp.full((BATCH,), 10.5))
  assert np.all(np.isfinite(mid))
  assert np.abs(mid - a).max() > 0 and np.abs(mid - b).max() > 0


def test_create_model_reads_num_classes():
  config = digits.get_config()
  assert factories.create_model(config).num_classes == 0
  config.model.num_classes = 10
  assert factories.create_model(config).num_classes == 10


def test_create_model_reads_num_groups():
  config = digits.get_config()
  assert factories.create_model(config).num_groups == 32  # DDPM's
  config.model.num_groups = 8
  assert factories.create_model(config).num_groups == 8
  config.training.objective, config.model.num_classes = "classifier", 10
  assert factories.create_model(config).num_groups == 8  # the noisy classifier's too


@pytest.mark.parametrize("ch,ch_mult,num_res_blocks", [(16, (1, 2), 1), (32, (1,), 1),
                                                       (8, (2, 1, 3), 2), (32, (2,), 0)])
def test_group_norm_channels_are_those_of_the_unets_group_norms(ch, ch_mult, num_res_blocks):
  module = models.UNet(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                       attn_resolutions=(2,), dropout=0.0, resamp_with_conv=True, out_channels=1,
                       num_groups=1)
  shapes = models.param_shapes(module, IMAGE_SIZE, 1)
  normalised = {leaf.shape[0] for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
                if path[-1].key == "scale"}  # one GroupNorm scale per normalised channel
  assert models.group_norm_channels(ch, ch_mult, num_res_blocks) == tuple(sorted(normalised))


@pytest.mark.parametrize("field,other", [("num_classes", 10), ("num_groups", 8)])
def test_runs_recorded_before_a_model_field_existed_still_load_and_resume(tmp_path, field, other):
  import json  # pylint: disable=g-import-not-at-top

  from ddpm_jax.runtime import run_config  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  old = json.loads(run_config.config_to_json(config))
  del old["model"][field]  # a config.json written before the field existed
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert run_config.load(str(tmp_path)).model[field] == config.model[field]
  assert f"model.{field}" not in run_config.check_resume(config, str(tmp_path), 10)
  config.model[field] = other
  with pytest.raises(ValueError, match=f"model.{field}"):
    run_config.check_resume(config, str(tmp_path), 10)


@pytest.mark.parametrize("shape", [(3, 5), (2, 8, 8, 16), (7, 9, 11)])
@pytest.mark.parametrize("p", [0.9, 0.5])
def test_threefry_bernoulli_is_jax_random_bernoulli_bit_for_bit(shape, p):
  for seed in (0, 123456789):
    key = jax.random.key(seed)
    fast = jax.jit(layers.threefry_bernoulli, static_argnums=(1, 2))(
        jax.random.key_data(key), p, shape)
    np.testing.assert_array_equal(fast, jax.random.bernoulli(key, p, shape))


def test_dropout_has_the_masks_of_flax_dropout():
  """Same name, same rng stream, same masks: the output of nn.Dropout, for typed and raw keys."""

  class Block(nn.Module):
    dropout: type

    @nn.compact
    def __call__(self, x, train):
      return self.dropout(0.1, deterministic=not train)(x) + self.dropout(0.3)(x, not train)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
  for key in (jax.random.key(3), jax.random.PRNGKey(3)):
    ours = Block(layers.Dropout).apply({}, x, True, rngs={"dropout": key})
    flax_out = Block(nn.Dropout).apply({}, x, True, rngs={"dropout": key})
    np.testing.assert_array_equal(ours, flax_out)
    # Zero where both layers drop: about 0.1 * 0.3 of the elements, so both sample masks.
    assert 0.015 < float(jnp.mean(ours == 0)) < 0.06
  np.testing.assert_array_equal(Block(layers.Dropout).apply({}, x, False), 2 * x)


# ---- ops.bias_add and the Conv / Dense built on it: flax's layers, with a dot-form bias grad ----

def _pixels_and_bias(channels=8):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 6, 6, channels)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal((channels,)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  return x, b, w


def test_bias_add_gradients_are_those_of_x_plus_b():
  x, b, w = _pixels_and_bias()
  loss = lambda add: lambda x_, b_: jnp.sum(w * jnp.sin(add(x_, b_)))
  ours = jax.grad(loss(ops.bias_add), (0, 1))(x, b)
  ref = jax.grad(loss(jnp.add), (0, 1))(x, b)
  np.testing.assert_array_equal(ops.bias_add(x, b), x + b)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-5)
  # The bias gradient is a dot, not XLA's column reduction (the point of the op).
  hlo = jax.jit(jax.grad(loss(ops.bias_add), 1)).lower(x, b).compile().as_text()
  assert " dot(" in hlo and " reduce(" not in hlo


def test_bias_add_gradient_under_shard_map_sums_over_devices():
  """Under shard_map's varying-axes check (as in the train step) the invariant bias gets the
  psum over devices of the per-device sums: the gradient of the whole batch, on 1 and 4
  devices."""
  x, b, w = _pixels_and_bias()
  ref = jax.grad(lambda b_: jnp.sum(w * jnp.sin(x + b_)))(b)
  for n in (1, 4):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def per_device(x_, w_, b_):
      return jax.grad(lambda bb: jnp.sum(w_ * jnp.sin(ops.bias_add(x_, bb))))(b_)

    spec = jax.sharding.PartitionSpec
    grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec("data"), spec("data"),
                                                                  spec()), out_specs=spec()))
    got = grad(jax.device_put(x, shard), jax.device_put(w, shard),
               jax.device_put(b, jax.sharding.NamedSharding(mesh, spec())))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("strides,kernel", [(1, 3), (2, 3), (1, 1)])
def test_conv_is_flax_conv_with_the_same_params(strides, kernel, dtype):
  x, _, _ = _pixels_and_bias()
  ours = layers.Conv(5, kernel, strides, dtype)
  ref = nn.Conv(5, (kernel, kernel), strides=(strides, strides), padding="SAME", dtype=dtype,
                param_dtype=jnp.float32, kernel_init=layers.default_init)
  params = ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(0), x), params)
  params = jax.tree.map(lambda p: p + 0.3, params)  # a non-zero bias
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
  g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x).astype(jnp.float32))))(params)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x).astype(jnp.float32))))(params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g_ours))
  if dtype == jnp.float32:
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4), g_ours,
                 g_ref)
    return
  # bfloat16 compute: the kernel gradients are the same computation as flax's; the bias gradient
  # is the sum of the bf16 upstream gradient, which we accumulate in float32 (flax in bf16).
  np.testing.assert_allclose(g_ours["params"]["kernel"], g_ref["params"]["kernel"], rtol=1e-6)
  upstream = np.cos(np.asarray(ref.apply(params, x).astype(jnp.float32), np.float64))
  exact = upstream.reshape(-1, 5).sum(0)
  np.testing.assert_allclose(g_ours["params"]["bias"], exact, rtol=1e-2, atol=1e-2)


def test_dense_is_flax_dense_with_the_same_params():
  x, _, _ = _pixels_and_bias()
  ours, ref = layers.Dense(7), nn.Dense(7, kernel_init=layers.default_init)
  params = ref.init(jax.random.key(1), x)
  np.testing.assert_array_equal(ours.init(jax.random.key(1), x)["params"]["kernel"],
                                params["params"]["kernel"])
  params = jax.tree.map(lambda p: p + 0.3, params)
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
  g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x))))(params)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x))))(params)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4), g_ours, g_ref)
