"""Image editing with an unconditional or class-conditional diffusion model: inpainting and SDEdit.

Pure functions of arrays and callables (`model_fn(x_t, t) -> raw output`, samplers from
`ddpm_jax.sampling.get_sampler`); the `--mode=edit` driver is `evaluation/drivers.py`.

Masks are *keep* masks: 1 where the pixel is known (kept from the input), 0 where it is generated.
A named shape names the kept region, e.g. `left_half` keeps the left half and fills the right.

Inpainting by replacement (Song et al. 2021, "Score-based generative modeling", app. I; the base
of RePaint): after every sampler step to timestep t', the known pixels are overwritten by a fresh
forward sample x_t'^known = alpha(t') x0 + s(t') z ~ q(x_t' | x0), and by x0 itself after the
last step, so the known pixels of the output equal the input exactly.

RePaint (Lugmayr et al. 2022, Alg. 1 and sec. 4.2): the same replacement in the ancestral sampler,
but every `jump` steps the state is pushed back `jump` steps with the forward transitions
x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z and denoised again, `count` extra times, so that
the generated region can harmonise with the known one.

SDEdit (Meng et al. 2022): x_t0 = alpha(t0) x + s(t0) z, then any sampler from t0 down to 0
(`x_start`/`t_start`), optionally with a target class for a conditional model.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion
from ddpm_jax.core import noise_levels


def _box(h, w, top, bottom, left, right):
  m = np.zeros((h, w), np.float32)
  m[top:bottom, left:right] = 1.0
  return m


# name -> keep mask [H, W] (1 = known). "center_box" fills the central half-size square.
MASKS: dict[str, Callable[[int, int], np.ndarray]] = {
    "left_half": lambda h, w: _box(h, w, 0, h, 0, w // 2),
    "right_half": lambda h, w: _box(h, w, 0, h, w // 2, w),
    "top_half": lambda h, w: _box(h, w, 0, h // 2, 0, w),
    "bottom_half": lambda h, w: _box(h, w, h // 2, h, 0, w),
    "center_box": lambda h, w: 1.0 - _box(h, w, h // 4, h - h // 4, w // 4, w - w // 4),
    "outside_box": lambda h, w: _box(h, w, h // 4, h - h // 4, w // 4, w - w // 4),
    "every_other_row": lambda h, w: np.repeat((np.arange(h) % 2 == 0)[:, None], w, 1)
                                      .astype(np.float32),
    # Half of the pixels, drawn at random once (seed 0 of NumPy's PCG64 for every size).
    "random_half": lambda h, w: (np.random.default_rng(0).permutation(h * w) < (h * w) // 2)
                                .reshape(h, w).astype(np.float32),
}


def make_mask(spec: str, height: int, width: int) -> np.ndarray:
  """A keep mask float32 [H, W, 1] from a name of `MASKS` or a PNG path (white = known).

  Raises:
    ValueError: an unknown name, or a PNG whose size is not H x W.
  """
  if spec in MASKS:
    return MASKS[spec](height, width)[..., None]
  if spec.lower().endswith(".png"):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(spec) as img:
      m = np.asarray(img.convert("L"), np.float32) / 255.0
    if m.shape != (height, width):
      raise ValueError(f"Mask {spec} is {m.shape[0]}x{m.shape[1]} but the images are "
                       f"{height}x{width}; give a {height}x{width} PNG (white = known).")
    return (m > 0.5).astype(np.float32)[..., None]
  raise ValueError(f"Unknown mask {spec!r}: give a PNG path or one of {sorted(MASKS)}.")


def q_sample_at(tables, x0, t, noise):
  """x_t = alpha(t) x0 + s(t) noise at a (fractional) index t, [B] or scalar; t < 0 gives x0.

  (alpha, s) = `noise_levels.vp_at(tables, t)`, the samplers' coefficients at t; t < 0 is clean
  data there (alpha = 1, s = 0), which this keeps exact rather than trusting 1 x0 + 0 noise.
  """
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x0.shape[:1])
  alpha, s = noise_levels.vp_at(tables, t)
  bcast = lambda v: v.reshape(v.shape + (1,) * (x0.ndim - 1))
  return jnp.where(bcast(t < 0), x0, bcast(alpha) * x0 + bcast(s) * noise)


def replacement_post_step(tables, x0_known, mask):
  """`post_step` for any sampler: known pixels <- q(x_t' | x0_known) (x0 itself at t' = -1)."""
  mask = jnp.asarray(mask, jnp.float32)

  def post_step(i, x_next, t_next, key):
    del i
    known = q_sample_at(tables, x0_known, t_next, jax.random.normal(key, x_next.shape))
    return mask * known + (1.0 - mask) * x_next
  return post_step


def paste(x0_known, mask, x):
  """The output: the input's exact pixels where mask = 1, the sample elsewhere."""
  mask = jnp.asarray(mask, x.dtype)
  return mask * jnp.asarray(x0_known, x.dtype) + (1.0 - mask) * x


def inpaint(sample_fn, model_fn, tables, rng, x0_known, mask):
  """Inpainting by replacement with any sampler; returns (images, trajectory)."""
  post = replacement_post_step(tables, x0_known, mask)
  x, traj = sample_fn(model_fn, rng, x0_known.shape, post_step=post)
  return paste(x0_known, mask, x), traj


def repaint_schedule(num_timesteps: int, jump: int, count: int) -> np.ndarray:
  """The visited indices of RePaint (Lugmayr et al. 2022, their `get_schedule_jump`), ending at -1.

  Going down one index at a time from T-1; every `jump` indices (while above `jump`), it goes
  back up `jump` indices, `count` times per position. jump = 0 or count = 0: plain T..-1.
  """
  jumps = {}
  if jump > 0 and count > 0:
    jumps = {j: count for j in range(0, num_timesteps - jump, jump)}
  t, ts = num_timesteps, []
  while t >= 1:
    t -= 1
    ts.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump):
        t += 1
        ts.append(t)
  ts.append(-1)
  return np.asarray(ts, np.int32)


def repaint(model_fn, tables, rng, x0_known, mask, *, jump: int, count: int,
            model_output: str = "eps", model_var: str = "fixed_large", clip_x0: bool = True):
  """Inpainting with RePaint resampling over the full T-step ancestral process.

  Every transition of `repaint_schedule` is either a reverse step from index t to t - 1 (the
  ancestral step on the unknown pixels, q(x_{t-1} | x0_known) on the known ones; x0 itself after
  index 0) or a forward step x_{t+1} = sqrt(1 - beta_{t+1}) x_t + sqrt(beta_{t+1}) z.

  Returns:
    The images, known pixels pasted exactly.
  """
  ts = repaint_schedule(tables.num_timesteps, jump, count)
  t_from, t_to = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])
  mask = jnp.asarray(mask, jnp.float32)
  shape = x0_known.shape
  b = shape[0]
  x = jax.random.normal(rng, shape, jnp.float32)
  betas = jnp.asarray(tables.betas, jnp.float32)

  def reverse(x, t, key):
    k_noise, k_known = jax.random.split(key)
    tt = jnp.full((b,), t, jnp.int32)
    out = diffusion.p_mean_variance(tables, model_fn(x, tt.astype(jnp.float32)), x, tt,
                                    model_output=model_output, model_var=model_var,
                                    clip_x0=clip_x0)
    z = jax.random.normal(k_noise, shape)
    unknown = out.mean + jnp.where(t > 0, jnp.exp(0.5 * out.log_var), 0.0) * z
    known = q_sample_at(tables, x0_known, t - 1, jax.random.normal(k_known, shape))
    return mask * known + (1.0 - mask) * unknown

  def forward(x, t_next, key):
    beta = betas[t_next]
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * jax.random.normal(key, shape)

  def body(i, x):
    key = jax.random.fold_in(rng, i + 1)
    return jax.lax.cond(t_to[i] < t_from[i], lambda: reverse(x, t_from[i], key),
                        lambda: forward(x, t_to[i], key))

  x = jax.lax.fori_loop(0, ts.size - 1, body, x)
  return paste(x0_known, mask, x)


def sdedit(sample_fn, model_fn, tables, rng, x, t0: float):
  """SDEdit: noise x to index t0 with q(x_t0 | x), then run the sampler from there to 0."""
  k_noise, k_sample = jax.random.split(rng)
  x_t0 = q_sample_at(tables, jnp.asarray(x, jnp.float32), t0, jax.random.normal(k_noise, x.shape))
  return sample_fn(model_fn, k_sample, x.shape, x_start=x_t0, t_start=t0)
