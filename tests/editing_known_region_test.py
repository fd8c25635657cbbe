"""What the known pixels hold *during* inpainting, not only at the end.

Property: inpainting by replacement writes, after every sampler step to index t', a fresh forward
sample x_t'^known = alpha(t') x0 + s(t') z ~ q(x_t' | x0) over the known pixels (mask = 1), and x0
itself after the last step; RePaint does the same after each reverse step, and its forward
(re-noising) steps carry that marginal up to the next index. So at every intermediate noise level
the standardised residual of the known pixels, z = (x_t - alpha(t) x0) / s(t), with (alpha, s) =
`noise_levels.vp_at(tables, t)`, is N(0, 1) and independent of x0. Writing the clean x0 instead
(or the right sample at the wrong level) is hidden by the final paste, so it is checked here.

Checks, over the n known pixel values of one state (512 images of 4x4x1, left half known, so
n = 4096; x0 ~ U(-0.2, 1) so that its mean is far from 0), at every level with s(t) > 0.05 (below
that z amplifies float32 rounding):
  |mean z| < 5 / sqrt(n),  |std z - 1| < 5 / sqrt(2 n),  |corr(z, x0)| < 5 / sqrt(n),
5-sigma bounds of the sample statistics of n i.i.d. N(0, 1) values (the std's standard error is
1 / sqrt(2 n)); with fixed keys the tests are deterministic.

Where the states are observed:
  * `inpaint` with every sampler: the trajectory (trajectory_every=1). `loop.run` records, at step
    i, the carry x that step i starts from, which for i >= 1 is step i - 1's output *after*
    `post_step`, at t = grid[i] (the recorded 't'). Record 0 is the initial x_T ~ N(0, I), never
    passed through `post_step`, so it is skipped. The final output must equal x0 on the known
    pixels bitwise, both after `paste` and before it (the sampler's own output, t' = -1).
  * `repaint`: every model call, through `jax.debug.callback(ordered=True)` in model_fn; the call
    at index t sees x_t. The first call sees the initial N(0, I) draw and is skipped (with T = 100
    linear, alpha(T - 1) = 0.6, so it is not q(x_T | x0)); each later call is checked on its own.

The model is a zero-eps model (eps_hat = 0), which makes every sampler cheap; what the known pixels
hold does not depend on the model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.core import noise_levels
from ddpm_jax.core import schedules
from ddpm_jax.sampling import editing

SHAPE = (512, 4, 4, 1)
MASK = editing.make_mask("left_half", 4, 4)  # [4, 4, 1], 8 known pixels per image
KNOWN = np.broadcast_to(MASK > 0, SHAPE)
X0 = jnp.asarray(np.random.default_rng(3).uniform(-0.2, 1.0, SHAPE), jnp.float32)
N = int(KNOWN.sum())  # 4096
S_MIN = 0.05
TOL_MEAN = 5 / np.sqrt(N)
TOL_STD = 5 / np.sqrt(2 * N)
TOL_CORR = 5 / np.sqrt(N)

zero_eps = lambda x, t: jnp.zeros_like(x)


def _tables(t, name):
  return schedules.make_tables(schedules.get_beta_schedule(name, t, False), dtype=jnp.float32)


def _known_region_errors(x_t, t, tables):
  """Failures (strings) of the known pixels of x_t [B, H, W, C] at index t as q(x_t | x0)."""
  alpha, s = noise_levels.vp_at(tables, np.float64(t))
  x0 = np.asarray(X0, np.float64)[KNOWN]
  z = (np.asarray(x_t, np.float64)[KNOWN] - alpha * x0) / s
  mean, std, corr = z.mean(), z.std(), np.corrcoef(z, x0)[0, 1]
  errors = []
  if abs(mean) >= TOL_MEAN:
    errors.append(f"t={t:.2f} (s={s:.3f}): mean z = {mean:+.4f}, tolerance {TOL_MEAN:.4f}")
  if abs(std - 1) >= TOL_STD:
    errors.append(f"t={t:.2f} (s={s:.3f}): std z = {std:.4f}, tolerance 1 +- {TOL_STD:.4f}")
  if abs(corr) >= TOL_CORR:
    errors.append(f"t={t:.2f} (s={s:.3f}): corr(z, x0) = {corr:+.4f}, tolerance {TOL_CORR:.4f}")
  return errors


def _noisy(tables, t):
  return float(noise_levels.vp_at(tables, np.float64(t))[1]) > S_MIN


@functools.cache
def _inpaint_on_every_schedule(sampler):
  """{schedule: (output, trajectory)} of `sampler`'s 20-step inpainting, from one compilation.

  The runs are independent loops under one jit, the same computations as one jit per schedule;
  a compile per sampler instead of per case (the runs themselves are tiny).
  """
  runs = {}
  for schedule in sorted(schedules.SCHEDULES):
    tables = _tables(1000, schedule)
    runs[schedule] = (sampling.get_sampler(sampler, tables, num_steps=20, trajectory_every=1),
                      tables)
  outs = jax.jit(lambda r: {name: editing.inpaint(fn, zero_eps, tables, r, X0, MASK)
                            for name, (fn, tables) in runs.items()})(jax.random.key(0))
  return jax.device_get(outs)


@pytest.mark.parametrize("schedule", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_inpaint_known_pixels_are_forward_samples_at_every_step(sampler, schedule):
  tables = _tables(1000, schedule)
  out, traj = _inpaint_on_every_schedule(sampler)[schedule]
  np.testing.assert_array_equal(np.asarray(out)[KNOWN], np.asarray(X0)[KNOWN])
  xs, ts = np.asarray(traj["x_t"]), np.asarray(traj["t"])
  assert xs.shape[0] == ts.shape[0] >= 20
  checked = [k for k in range(1, ts.size) if _noisy(tables, ts[k])]  # 0: the initial x_T
  assert len(checked) >= 10, (ts, checked)  # most of the path is checked, not a corner of it
  errors = [e for k in checked for e in _known_region_errors(xs[k], ts[k], tables)]
  assert not errors, f"{sampler}/{schedule}, {len(checked)} levels checked:\n" + "\n".join(errors)


def test_replacement_post_step_ends_on_x0_before_the_paste():
  """The sampler's own last state (post_step at t' = -1), not only the pasted output, is x0."""
  tables = _tables(1000, "linear")
  sample_fn = sampling.get_sampler("ddim", tables, num_steps=5)
  post = editing.replacement_post_step(tables, X0, MASK)
  x, _ = jax.jit(lambda r: sample_fn(zero_eps, r, SHAPE, post_step=post))(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(x)[KNOWN], np.asarray(X0)[KNOWN])


@pytest.mark.parametrize("schedule", sorted(schedules.SCHEDULES))
def test_repaint_model_sees_forward_samples_of_the_known_pixels(schedule):
  tables = _tables(100, schedule)
  jump, count = 3, 2
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda x, t: calls.append((np.asarray(x), float(np.asarray(t)[0]))), x, t,
                       ordered=True)
    return jnp.zeros_like(x)

  out = jax.jit(lambda r: editing.repaint(model_fn, tables, r, X0, MASK, jump=jump, count=count))(
      jax.random.key(0))
  out = np.asarray(out)
  jax.effects_barrier()
  np.testing.assert_array_equal(out[KNOWN], np.asarray(X0)[KNOWN])
  ts = editing.repaint_schedule(tables.num_timesteps, jump, count)
  reverse_from = ts[:-1][np.diff(ts) < 0]
  np.testing.assert_array_equal([t for _, t in calls], reverse_from)  # one call per reverse step
  checked = [(x, t) for x, t in calls[1:] if _noisy(tables, t)]  # calls[0]: the initial N(0, I)
  revisited = {t for _, t in checked if sum(u == t for _, u in checked) > 1}
  assert len(checked) >= 150 and len(revisited) >= 30, (len(checked), len(revisited))
  errors = [e for x, t in checked for e in _known_region_errors(x, t, tables)]
  assert not errors, f"RePaint/{schedule}, {len(checked)} calls checked:\n" + "\n".join(errors)
