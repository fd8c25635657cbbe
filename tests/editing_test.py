"""Inpainting (replacement, RePaint) and SDEdit (ddpm_jax/sampling/editing.py and --mode=edit in
ddpm_jax/evaluation/drivers.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax.config import validation_tasks
from ddpm_jax.core import schedules
from ddpm_jax.evaluation import drivers
from ddpm_jax.sampling import editing
from ddpm_jax.sampling import guidance
from tests import helpers


def _tables(t, name="linear"):
  return schedules.make_tables(schedules.get_beta_schedule(name, t, False), dtype=jnp.float32)


TABLES = _tables(20)
MODEL = models.TinyUNet(out_channels=1)
_rng = np.random.default_rng(0)
PARAMS = jax.tree.map(lambda s: jnp.asarray(0.3 * _rng.standard_normal(s.shape), jnp.float32),
                      models.param_shapes(MODEL, 8, 1))
MODEL_FN = lambda x, t: MODEL.apply({"params": PARAMS}, x, t, train=False)
X0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)


@pytest.mark.parametrize("mask_name", ["left_half", "center_box"])
def test_inpainting_keeps_known_pixels_exactly(mask_name):
  mask = editing.make_mask(mask_name, 8, 8)
  sample_fn = sampling.get_sampler("ddim", TABLES, num_steps=5)
  out, _ = jax.jit(lambda r: editing.inpaint(sample_fn, MODEL_FN, TABLES, r, X0, mask))(
      jax.random.key(0))
  known = np.broadcast_to(mask > 0, out.shape)
  np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(X0)[known])
  assert np.abs(np.asarray(out)[~known] - np.asarray(X0)[~known]).max() > 0.1
  rp = jax.jit(lambda r: editing.repaint(MODEL_FN, TABLES, r, X0, mask, jump=2, count=2))(
      jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(rp)[known], np.asarray(X0)[known])


def test_repaint_schedule_walks_down_with_jumps_back():
  ts = editing.repaint_schedule(20, jump=3, count=2)
  assert ts[0] == 19 and ts[-1] == -1
  assert set(np.abs(np.diff(ts))) == {1}
  ups = np.sum(np.diff(ts) > 0)
  assert ups == 3 * 2 * len(range(0, 20 - 3, 3))  # jump x count per jump position
  np.testing.assert_array_equal(editing.repaint_schedule(20, 0, 0), np.arange(19, -2, -1))


def test_inpainting_gaussian_data_recovers_the_conditional_mean():
  """x0 ~ N(mu, Sigma) in 4 dims (2x2 images), with the exact eps(x_t, t) = s C_t^-1 (x_t - a mu),
  C_t = a^2 Sigma + s^2 I. Keeping the left column, the unknown pixels' sample mean must match
  mu_u + Sigma_uk Sigma_kk^-1 (x_k - mu_k). Measured (N = 2000, cosine T = 100): RePaint (jump 1,
  20 resamplings) is off by 0.04 (tolerance 0.05); plain replacement is off by ~0.28 on the
  coupled pixel, the known failure RePaint fixes (Lugmayr et al. 2022, sec. 4.2)."""
  tables = _tables(100, "cosine")
  mu = np.array([0.3, -0.2, 0.1, 0.0])
  sigma = 0.2 * np.array([[1, .9, .8, .7], [.9, 1, .9, .8], [.8, .9, 1, .9], [.7, .8, .9, 1.]])

  def exact_eps(x, t):
    a, s = guidance.vp_coefficients(tables, t)
    c = a[:, None, None] ** 2 * sigma + s[:, None, None] ** 2 * np.eye(4)
    xf = x.reshape(x.shape[0], 4) - a[:, None] * mu
    return (s[:, None] * jnp.linalg.solve(c, xf[..., None])[..., 0]).reshape(x.shape)

  mask = editing.make_mask("left_half", 2, 2)  # keeps flat pixels 0 and 2
  known = np.array([0.8, 0.0, -0.4, 0.0])
  k, u = [0, 2], [1, 3]
  cond_mean = mu[u] + sigma[np.ix_(u, k)] @ np.linalg.solve(sigma[np.ix_(k, k)], known[k] - mu[k])
  x0 = jnp.asarray(np.tile(known.reshape(1, 2, 2, 1), (2000, 1, 1, 1)), jnp.float32)
  sample_fn = sampling.get_sampler("ancestral", tables, model_var="fixed_small", clip_x0=False)
  plain, _ = jax.jit(lambda r: editing.inpaint(sample_fn, exact_eps, tables, r, x0, mask))(
      jax.random.key(0))
  rp = jax.jit(lambda r: editing.repaint(exact_eps, tables, r, x0, mask, jump=1, count=20,
                                         model_var="fixed_small", clip_x0=False))(
      jax.random.key(0))
  err_rp = np.abs(np.asarray(rp).reshape(-1, 4)[:, u].mean(0) - cond_mean).max()
  err_plain = np.abs(np.asarray(plain).reshape(-1, 4)[:, u].mean(0) - cond_mean).max()
  print(f"conditional-mean error: RePaint {err_rp:.3f}, plain replacement {err_plain:.3f}")
  assert err_rp < 0.05
  assert err_plain > 2 * err_rp  # resampling is what recovers it


def test_sdedit_starts_from_the_noised_input():
  sample_fn = sampling.get_sampler("ddim", TABLES, num_steps=10)
  near = jax.jit(lambda r: editing.sdedit(sample_fn, MODEL_FN, TABLES, r, X0, 0.0)[0])(
      jax.random.key(0))
  # t0 = 0: one denoising step from alpha_0 x + s_0 z, s_0 = sqrt(beta_0) ~ 0.01.
  assert np.abs(np.asarray(near) - np.asarray(X0)).max() < 0.1


def test_bad_edit_input_fails_naming_what_was_expected(tmp_path):
  with pytest.raises(ValueError, match="one of"):
    editing.make_mask("diagonal", 8, 8)
  Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "m.png")
  with pytest.raises(ValueError, match="8x8 PNG"):
    editing.make_mask(str(tmp_path / "m.png"), 8, 8)
  np.savez(tmp_path / "x.npz", images=np.zeros((2, 16, 16, 1), np.uint8))
  with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
    drivers.load_inputs(str(tmp_path / "x.npz"), 8, 1, 4)
  config = helpers.tiny_config("digits", **{"edit.task": "sdedit", "edit.t0": 20})
  with pytest.raises(ValueError, match=r"\[0, 19\]"):
    validation_tasks.check_edit(config)
  config = helpers.tiny_config("digits", **{"edit.class_label": 3})
  with pytest.raises(ValueError, match="unconditional"):
    validation_tasks.check_edit(config)


@pytest.mark.slow
def test_end_to_end_conditional_train_sample_and_edit(tmp_path):
  workdir = str(tmp_path / "run")
  cond = {"model.num_classes": 10, "training.num_train_steps": 4}
  # The command lines, run in-process (helpers.run_main): the CLI's flags and dispatch without a
  # child process's start-up.
  proc = helpers.run_main(helpers.main_command(workdir, **cond))
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.savez(tmp_path / "in.npz", images=np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1),
                                                                            dtype=np.uint8))
  runs = {
      "sample": ["--mode=sample", "--config.sampling.num_samples=8",
                 "--config.sampling.sampler=ddim",
                 "--config.sampling.class_label=3", "--config.sampling.guidance_scale=1.0"],
      "inpaint": ["--mode=edit", f"--config.edit.input={tmp_path / 'in.npz'}",
                  "--config.edit.mask=center_box", "--config.sampling.sampler=ddim"],
      "sdedit": ["--mode=edit", f"--config.edit.input={tmp_path / 'in.npz'}",
                 "--config.edit.task=sdedit", "--config.edit.t0=10", "--config.edit.class_label=8",
                 "--config.sampling.sampler=ddim"],
  }
  for name, flags in runs.items():
    proc = helpers.run_main(helpers.main_command(workdir, *flags, **cond))
    assert proc.returncode == 0, (name, proc.stderr[-3000:])
  edits = sorted(os.listdir(os.path.join(workdir, "edits")))
  assert any(e.startswith("inpaint") and e.endswith(".png") for e in edits)
  assert any(e.startswith("sdedit") and e.endswith(".npz") for e in edits)
  inpainted = np.load(os.path.join(workdir, "edits", next(e for e in edits if e.startswith(
      "inpaint") and e.endswith(".npz"))))
  known = np.broadcast_to(inpainted["mask"][..., None] > 0, inpainted["input"].shape)
  np.testing.assert_array_equal(inpainted["output"][known], inpainted["input"][known])
  bad = helpers.run_main(helpers.main_command(workdir, "--mode=sample",
                                             "--config.sampling.class_label=10", **cond))
  assert bad.returncode != 0 and "valid labels are 0..9" in bad.stderr
