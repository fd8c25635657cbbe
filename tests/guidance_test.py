"""Classifier-free and classifier guidance wrappers (ddpm_jax/sampling/guidance.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import diffusion
from ddpm_jax.core import losses
from ddpm_jax.core import schedules
from ddpm_jax.models import noisy_classifier as classifier
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.sampling import guidance
from ddpm_jax.training import train_step as train_step_lib
from tests import helpers

T = 20
TABLES = schedules.make_tables(schedules.get_beta_schedule("linear", T, False), dtype=jnp.float32)
COND = models.TinyUNet(out_channels=2, num_classes=3)  # learned-variance-sized output


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                      shapes)


PARAMS = _random(models.param_shapes(COND, 8, 1))


def cond_fn(x, t, y):
  return COND.apply({"params": PARAMS}, x, t, y, train=False)


def _x(b=4, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, 8, 8, 1)), jnp.float32)


def test_batched_pass_equals_two_separate_passes_and_keeps_cond_variance():
  x, t, y, w = _x(), jnp.array([3.0, 7.5, 12.0, 19.0]), jnp.array([0, 1, 2, 1]), 2.0
  fn = guidance.classifier_free(cond_fn, y, 3, w, model_var="learned_range")
  got = np.asarray(jax.jit(fn)(x, t))
  c = np.asarray(jax.jit(cond_fn)(x, t, y))
  u = np.asarray(jax.jit(cond_fn)(x, t, jnp.full((4,), 3)))
  want = (1 + w) * c[..., :1] - w * u[..., :1]
  np.testing.assert_allclose(got[..., :1], want, atol=1e-5)
  # The variance channel is the conditional pass's; 1e-5 allows for the batch-of-8 pass
  # rounding differently from the batch-of-4 one.
  np.testing.assert_allclose(got[..., 1:], c[..., 1:], atol=1e-5)


def test_interval_limits_guidance_to_its_timesteps():
  x, t, y = _x(), jnp.array([2.0, 8.0, 12.0, 18.0]), jnp.array([0, 1, 2, 1])
  fn = guidance.classifier_free(cond_fn, y, 3, 4.0, model_var="fixed_large", interval=(5, 15))
  got, c = np.asarray(jax.jit(fn)(x, t)), np.asarray(jax.jit(cond_fn)(x, t, y))
  inside = np.array([False, True, True, False])
  np.testing.assert_allclose(got[~inside], c[~inside], atol=1e-5)
  assert np.abs(got[inside] - c[inside]).max() > 1e-2


def test_w0_equals_plain_conditional_sampling_bitwise():
  config = helpers.tiny_config("digits", **{"model.num_classes": 3,
                                            "diffusion.model_var": "learned_range",
                                            "sampling.class_label": 2,
                                            "sampling.guidance_scale": 0.0})
  sample_fn = sampling.get_sampler("ddim", TABLES, model_var="learned_range", num_steps=5)
  y = jnp.full((4,), 2, jnp.int32)
  guided = conditioning.guided_model_fn(config, cond_fn, 4)
  run = lambda fn: jax.jit(lambda r: sample_fn(fn, r, (4, 8, 8, 1))[0])(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(run(guided)),
                                np.asarray(run(lambda x, t: cond_fn(x, t, y))))


@pytest.mark.parametrize("output", ["x0", "v"])
def test_cfg_on_x0_and_v_outputs_is_cfg_on_the_implied_eps(output):
  x, t = _x(), jnp.array([3.0, 7.0, 12.0, 19.0])
  c, u = jax.jit(cond_fn)(x, t, jnp.array([0, 1, 2, 1])), jax.jit(cond_fn)(x, t, jnp.full(4, 3))
  ti = t.astype(jnp.int32)
  to_eps = {"x0": lambda p: diffusion.eps_from_x0(TABLES, x, ti, p),
            "v": lambda p: diffusion.eps_from_v(TABLES, x, ti, p)}[output]
  w = 1.5
  guided = guidance.combine(c[..., :1], u[..., :1], w, "fixed_large")
  np.testing.assert_allclose(to_eps(guided), (1 + w) * to_eps(c[..., :1]) - w * to_eps(u[..., :1]),
                             atol=2e-4)


CLS = classifier.NoisyClassifier(num_classes=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(), num_groups=8)
CLS_PARAMS = _random(jax.eval_shape(lambda: CLS.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                     jnp.zeros((1,)), train=False))["params"], 3)
LOG_PROB = classifier.log_prob_fn(CLS, CLS_PARAMS)


def test_classifier_gradient_matches_finite_differences():
  x, t, y = _x(2, 5), jnp.array([4.0, 11.0]), jnp.array([2, 0])
  g = np.asarray(jax.jit(lambda x_: guidance.classifier_grad(LOG_PROB, x_, t, y))(x))
  f = jax.jit(lambda x_: jnp.take_along_axis(LOG_PROB(x_, t), y[:, None], -1)[:, 0])
  rng = np.random.default_rng(0)
  h = 1e-2
  for _ in range(3):  # directional derivatives along random unit directions
    v = rng.standard_normal(x.shape).astype(np.float32)
    v /= np.linalg.norm(v.reshape(2, -1), axis=1)[:, None, None, None]
    fd = (np.asarray(f(x + h * v)) - np.asarray(f(x - h * v))) / (2 * h)
    np.testing.assert_allclose(np.sum((g * v).reshape(2, -1), 1), fd, rtol=2e-2, atol=2e-3)


def test_classifier_guidance_shifts_eps_and_ancestral_mean_as_in_dhariwal_nichol():
  x, t, y, s = _x(2, 6), jnp.array([4.0, 11.0]), jnp.array([2, 0]), 3.0
  eps_fn = lambda x_, t_: cond_fn(x_, t_, None)[..., :1]
  g = guidance.classifier_grad(LOG_PROB, x, t, y)
  sqrt_1m_abar = jnp.sqrt(1 - TABLES.abar[t.astype(jnp.int32)]).reshape(-1, 1, 1, 1)
  alg2 = guidance.classifier_guidance(eps_fn, LOG_PROB, y, s, TABLES, model_output="eps",
                                      model_var="fixed_small", mode="eps")
  np.testing.assert_allclose(alg2(x, t), eps_fn(x, t) - s * sqrt_1m_abar * g, atol=1e-5)
  alg1 = guidance.classifier_guidance(eps_fn, LOG_PROB, y, s, TABLES, model_output="eps",
                                      model_var="fixed_small", mode="ancestral")
  ti = t.astype(jnp.int32)
  pmv = lambda out: diffusion.p_mean_variance(TABLES, out, x, ti, model_output="eps",
                                              model_var="fixed_small", clip_x0=False)
  plain, guided = pmv(eps_fn(x, t)), pmv(alg1(x, t))
  np.testing.assert_allclose(guided.mean, plain.mean + s * plain.var * g, atol=1e-5)


def test_guidance_on_an_unconditional_model_and_bad_labels_fail_before_compile():
  config = helpers.tiny_config("digits", **{"sampling.guidance_scale": 1.0})
  with pytest.raises(ValueError, match="class-conditional model"):
    validation.check_guidance(config)
  config = helpers.tiny_config("digits", **{"model.num_classes": 10, "sampling.class_label": 10})
  with pytest.raises(ValueError, match="valid labels are 0..9"):
    validation.check_guidance(config)
  config = helpers.tiny_config("digits", **{"data.label_key": "", "model.num_classes": 10})
  with pytest.raises(ValueError, match="needs labels"):
    validation.check_training_labels(config)


# --- Classifier guidance from the project's own trainer (training.objective = classifier) ---

CLASSIFIER = {"training.objective": "classifier", "model.num_classes": 10}


def test_classifier_loss_is_the_cross_entropy_of_the_noisy_input():
  loss_fn = losses.get_classifier_loss_fn(TABLES)
  x0, noise = _x(3, 7), _x(3, 8)
  t, labels = jnp.array([0, 9, 19]), jnp.array([2, 0, 1])
  seen = {}

  def model_fn(x_t, t_):  # fixed logits; records the input it was given
    seen["x_t"] = x_t
    return jnp.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])

  ce, aux = loss_fn(model_fn, x0, t, noise, labels)
  np.testing.assert_allclose(seen["x_t"], diffusion.q_sample(TABLES, x0, t, noise), atol=1e-6)
  logits = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(ce, -log_softmax[np.arange(3), [2, 0, 1]], rtol=1e-6)
  np.testing.assert_array_equal(aux["accuracy"], [1.0, 1.0, 0.0])


def test_classifier_objective_trains_with_finite_loss_and_accuracy_in_unit_interval():
  config = helpers.tiny_config("digits", **CLASSIFIER)
  parts = validation.validate(config, mode="sample")
  mesh = mesh_lib.make_mesh()
  model = factories.create_model(config)
  assert isinstance(model, classifier.NoisyClassifier) and model.num_classes == 10
  assert isinstance(parts.model, classifier.NoisyClassifier) and parts.sample_fn is None
  tables = factories.tables_from_config(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  loss_fn = factories.loss_fn_from_config(config, tables)
  step = train_step_lib.from_config(config, model, loss_fn, mesh)
  rng = np.random.default_rng(0)
  losses_seen = []
  for _ in range(2):
    batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, (8,)).astype(np.int32),
             "preempt": np.zeros((jax.device_count(),), bool)}
    state, metrics = step(state, mesh_lib.global_batch(mesh, batch))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and int(metrics["finite"]) == 1
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    losses_seen.append(float(metrics["loss"]))
  # An untrained 10-way classifier sits near the uniform cross-entropy log 10.
  assert abs(losses_seen[0] - np.log(10)) < 1.0


def test_classifier_objective_and_guidance_fail_before_compile(tmp_path):
  with pytest.raises(ValueError, match="model.num_classes > 0"):
    validation.validate(helpers.tiny_config(
        "digits", **{"training.objective": "classifier"}), mode="sample")
  with pytest.raises(ValueError, match="needs labels"):
    validation.check_training_labels(helpers.tiny_config(
        "digits", **CLASSIFIER, **{"data.label_key": ""}))
  with pytest.raises(ValueError, match="'diffusion', 'classifier'"):
    validation.validate(helpers.tiny_config(
        "digits", **{"training.objective": "clasifier"}), mode="sample")
  guided = {"sampling.classifier_workdir": str(tmp_path), "sampling.classifier_scale": 1.0}
  with pytest.raises(ValueError, match="no config.json"):
    validation.check_classifier(helpers.tiny_config("digits", **guided))
  (tmp_path / "config.json").write_text(run_config.config_to_json(
      helpers.tiny_config("digits", **CLASSIFIER)))
  with pytest.raises(ValueError, match="has no checkpoint"):
    validation.check_classifier(helpers.tiny_config("digits", **guided))
  with pytest.raises(ValueError, match="classifier_scale must be >= 0"):
    validation.check_classifier(helpers.tiny_config(
        "digits", **{**guided, "sampling.classifier_scale": -1.0}))


@pytest.mark.slow
def test_end_to_end_train_classifier_and_sample_with_classifier_guidance(tmp_path):
  run = helpers.run_main  # the command lines in-process: flags and dispatch, no start-up
  steps = {"training.num_train_steps": 3}
  cls_dir, gen_dir = str(tmp_path / "classifier"), str(tmp_path / "uncond")
  for workdir, extra in [(cls_dir, CLASSIFIER), (gen_dir, {})]:
    proc = run(helpers.main_command(workdir, **steps, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(cls_dir, "samples"))  # no grids of a classifier
  flags = ["--mode=sample", "--config.sampling.num_samples=8",
           "--config.sampling.sampler=ancestral", f"--config.sampling.classifier_workdir={cls_dir}",
           "--config.sampling.class_label=3"]
  proc = run(helpers.main_command(gen_dir, *flags, "--config.sampling.classifier_scale=2.0",
                                  **steps))
  assert proc.returncode == 0, proc.stderr[-3000:]
  npz = [f for f in os.listdir(os.path.join(gen_dir, "samples")) if f.endswith("_cg2.0_step3.npz")]
  assert len(npz) == 1, os.listdir(os.path.join(gen_dir, "samples"))
  samples = np.load(os.path.join(gen_dir, "samples", npz[0]))["samples"]
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  bad = run(helpers.main_command(gen_dir, *flags[:-1], "--config.sampling.class_label=10",
                                 **steps))
  assert bad.returncode != 0 and "valid target classes are 0..9" in bad.stderr
