"""EDM and flow matching as configured runs (`diffusion.parameterization`): the training loss and
the samplers see one denoiser, the sampling ladder, and every invalid combination fails first.

The exact-score sampling of both parameterisations by every sampler is in denoisers_test; the
1-vs-N-device equality of their train step in train_step_test.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import denoisers
from ddpm_jax.core import losses
from ddpm_jax.core import noise_levels
from ddpm_jax.core import schedules
from ddpm_jax.evaluation import drivers
from ddpm_jax.training import train

from helpers import tiny_config

SHAPE = (12, 4, 4, 1)


def _net(x, time_input):
  """A fixed nonlinear stand-in for the U-Net: any function of (x, time input) will do."""
  return jnp.tanh(1.3 * x + 0.4) * jnp.sin(time_input / 300.0 + 0.2)[:, None, None, None]


def _draw(seed=0):
  kx, kn, kt = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.uniform(kx, SHAPE, minval=-1.0, maxval=1.0)
  noise = jax.random.normal(kn, SHAPE)
  index = jax.random.randint(kt, SHAPE[:1], 0, 20)
  return x0, noise, index


@pytest.mark.parametrize("parameterization", ["edm", "flow"])
def test_training_loss_and_samplers_see_the_same_denoiser(parameterization):
  """At ladder level k, the sampler's model of x0 (VP x_t at index k) and the training loss
  (VE x_0 + sigma_k n, or flow x_t at t = sigma_k / (1 + sigma_k)) evaluate the same D:
    EDM:  ||D - x_0||^2 is the loss's unweighted mse, and the loss is lambda(sigma) times it;
    flow: D - x_0 = t (eps - x_0 - v), so ||D - x_0||^2 = t^2 x the flow-matching loss.
  A time input scaled differently in training and sampling breaks both."""
  config = tiny_config(**{"diffusion.parameterization": parameterization})
  tables = factories.tables_from_config(config)
  x0, noise, k = _draw()
  sigma = noise_levels.sigma_at(tables, k)
  x_t = (x0 + sigma[:, None, None, None] * noise) / jnp.sqrt(1 + sigma**2)[:, None, None, None]
  d = factories.sampler_model_fn(config, tables, _net)(x_t, k)
  sampler_err = jnp.mean(jnp.square(d - x0), axis=(1, 2, 3))
  loss_fn = factories.loss_fn_from_config(config, tables)
  assert factories.model_output(config) == "x0"
  if parameterization == "edm":
    loss, aux = loss_fn(_net, x0, sigma, noise)
    np.testing.assert_allclose(aux["mse"], sampler_err, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(loss, denoisers.edm_loss_weight(sigma) * sampler_err, rtol=2e-4)
  else:
    t = denoisers.flow_t_from_sigma(sigma)
    loss, aux = loss_fn(_net, x0, t, noise)
    np.testing.assert_allclose(t**2 * loss, sampler_err, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(aux["mse"], loss)


def test_edm_network_sees_250_c_noise_and_c_in_x():
  """A network that returns its time input: D = c_skip x + c_out 250 log(sigma) / 4, in the loss
  (VE input x0 + sigma n) and in the sampler (the same point as VP x_t at ladder index k)."""
  config = tiny_config(**{"diffusion.parameterization": "edm"})
  tables = factories.tables_from_config(config)
  x0, noise, k = _draw(1)
  sigma = noise_levels.sigma_at(tables, k)
  seen = []

  def spy(x, time_input):
    seen.append(x)
    return jnp.broadcast_to(time_input[:, None, None, None], x.shape)

  b = lambda v: v[:, None, None, None]
  x_ve = x0 + b(sigma) * noise
  c_skip, c_out, c_in, _ = (np.asarray(c) for c in denoisers.edm_scalings(sigma))
  expected = b(c_skip) * x_ve + b(c_out) * b(62.5 * np.log(sigma))
  _, aux = factories.loss_fn_from_config(config, tables)(spy, x0, sigma, noise)
  np.testing.assert_allclose(aux["mse"], np.mean((expected - x0) ** 2, axis=(1, 2, 3)),
                             rtol=1e-4)
  np.testing.assert_allclose(seen[-1], b(c_in) * x_ve, rtol=1e-5, atol=1e-6)
  x_t = x_ve / b(np.sqrt(1 + sigma**2))
  np.testing.assert_allclose(factories.sampler_model_fn(config, tables, spy)(x_t, k), expected,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parameterization", ["edm", "flow"])
def test_sampling_tables_are_the_edm_ladder(parameterization):
  config = tiny_config(**{"diffusion.parameterization": parameterization,
                          "diffusion.sigma_min": 0.01, "diffusion.sigma_max": 40.0})
  tables = factories.tables_from_config(config)
  sigma = np.asarray(noise_levels.sigma_at(tables, jnp.arange(20)))
  np.testing.assert_allclose(sigma, denoisers.edm_sigmas(20, 0.01, 40.0), rtol=1e-5)
  # A DDPM run keeps its schedule's tables.
  ddpm = tiny_config(**{"diffusion.sigma_min": 0.01, "diffusion.sigma_max": 40.0})
  np.testing.assert_array_equal(factories.tables_from_config(ddpm).betas,
                                schedules.get_beta_schedule("linear", 20).astype(np.float32))


def test_training_noise_levels_follow_their_distributions():
  """EDM: log sigma ~ N(p_mean, p_std^2); flow: t ~ U[0, 1) or sigmoid(N(m, s^2))."""
  keys = jax.random.split(jax.random.key(3), 20_000)
  draw = losses.noise_level_sampler("edm", p_mean=-0.7, p_std=0.9)
  log_sigma = np.log(np.asarray(jax.vmap(draw)(keys)[0]))
  assert abs(log_sigma.mean() + 0.7) < 0.03 and abs(log_sigma.std() - 0.9) < 0.03
  t = np.asarray(jax.vmap(losses.noise_level_sampler("flow"))(keys)[0])
  assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
  np.testing.assert_allclose(np.quantile(t, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.015)
  draw = losses.noise_level_sampler("flow", flow_t="logit_normal", flow_t_mean=0.5,
                                    flow_t_std=0.8)
  logit = np.asarray(jax.scipy.special.logit(jax.vmap(draw)(keys)[0]))
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
  weights = jax.vmap(draw)(keys[:4])[1]
  np.testing.assert_array_equal(weights, np.ones(4, np.float32))


@pytest.mark.parametrize("override,message", [
    ({"diffusion.parameterization": "score"}, "ddpm"),
    ({"diffusion.flow_t": "beta"}, "logit_normal"),
    ({"diffusion.loss": "hybrid", "diffusion.model_var": "learned_range"}, "diffusion.loss"),
    ({"diffusion.weighting": "min_snr"}, "diffusion.weighting"),
    ({"diffusion.t_sampling": "importance"}, "diffusion.t_sampling"),
    ({"diffusion.zero_terminal_snr": True}, "zero_terminal_snr"),
    ({"diffusion.model_var": "learned"}, "fixed_large"),
    ({"training.objective": "classifier", "model.num_classes": 10}, "training.objective"),
    ({"diffusion.sigma_min": 90.0}, "sigma_min"),
    ({"diffusion.sigma_data": 0.0}, "sigma_data"),
    ({"sampling.classifier_workdir": "runs/classifier", "sampling.classifier_scale": 1.0},
     "sampling.classifier_workdir"),
])
@pytest.mark.parametrize("parameterization", ["edm", "flow"])
def test_invalid_edm_and_flow_settings_fail_naming_the_fix(parameterization, override, message):
  config = tiny_config(**{"diffusion.parameterization": parameterization, **override})
  with pytest.raises(ValueError, match=message):
    validation.validate(config, mode="train", open_data=False)


@pytest.mark.slow
@pytest.mark.parametrize("parameterization", ["edm", "flow"])
def test_a_trained_run_samples_and_evaluates_as_its_parameterization(tmp_path, parameterization):
  """Train a few steps, then --mode=sample and the bound (eval) read the network as what it was
  trained as; a config that says otherwise is refused before anything compiles."""
  overrides = {"diffusion.parameterization": parameterization, "training.num_train_steps": 2,
               "training.checkpoint_every": 2, "sampling.sampler": "heun",
               "sampling.num_steps": 4, "sampling.num_samples": 8, "eval.metrics": ("bpd",),
               "eval.bpd_num_examples": 8}
  workdir = str(tmp_path / parameterization)
  train.train_and_evaluate(tiny_config(**overrides), workdir)
  with np.load(drivers.sample(tiny_config(**overrides), workdir)) as data:
    samples = data["samples"]
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  report = drivers.evaluate(tiny_config(**overrides), workdir)
  assert np.isfinite(report["bpd_total"]) and report["bpd_total"] > 0
  wrong = tiny_config(**{**overrides, "diffusion.parameterization": "ddpm"})
  with pytest.raises(ValueError, match="misread"):
    drivers.sample(wrong, workdir)
  # A sample-only sweep point links the run's checkpoints and has no config.json of its own:
  # the run's record is found through the link.
  linked = tmp_path / "point"
  linked.mkdir()
  os.symlink(os.path.join(workdir, "checkpoints"), linked / "checkpoints")
  with pytest.raises(ValueError, match="misread"):
    drivers.sample(wrong, str(linked))
