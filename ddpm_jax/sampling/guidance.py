"""Guidance as `model_fn -> model_fn` wrappers, so that every sampler is guided unchanged.

Pure functions of arrays and callables; nothing here reads a config.

Classifier-free guidance (Ho & Salimans 2022, eq. 6), with w the guidance scale:
  eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null).
The weights (1 + w, -w) sum to one and, at fixed (x_t, t), x0 and v are affine functions of eps
(x0 = (x_t - s eps) / alpha, v = (eps - s x_t) / alpha), so the same combination applied to an
x0 or v prediction gives exactly the guided eps: one formula serves every parameterisation.
A learned variance keeps the conditional pass's variance channels (as GLIDE and ADM do).
Both passes run as one forward pass on the concatenated batch [x; x] with labels [c; null].

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): guidance
applies only where t_min <= t <= t_max (timestep indices); elsewhere the conditional output is
returned. The default interval is the whole range [0, T-1], i.e. standard CFG; the paper's best
ImageNet interval is the middle of the noise levels, which is a setting, not our default.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the
same extrapolation, away from a weaker model of the same task (a smaller network, or an earlier
checkpoint) instead of the unconditional one: (1 + w) f(x, t) - w f_guide(x, t). It applies to
unconditional models too, and combines with the guidance interval the same way.

Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier log p(c|x_t, t)
and scale s, g = grad_x log p(c|x_t, t):
  * Algorithm 1 (ancestral): mu~ = mu + s Sigma g. The ancestral mean is
    mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t), so the same shift is made by
    eps~ = eps - s Sigma sqrt(1 - beta_t) sqrt(1 - abar_t) / beta_t g  (`mode="ancestral"`).
    It is exact for the full T-step ancestral sampler without x0 clipping (clipping acts on the
    shifted prediction); on a respaced grid it uses the per-index beta_t, an approximation.
  * Algorithm 2 (DDIM and the ODE samplers): eps~ = eps - s sqrt(1 - abar_t) g (`mode="eps"`).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.core import diffusion
from ddpm_jax.core import noise_levels

CondModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
CLASSIFIER_MODES = ("eps", "ancestral")


_bcast = noise_levels.per_example


def vp_coefficients(tables, t: jnp.ndarray):
  """(alpha, s) at fractional indices t, float32 jnp: `noise_levels.vp_at`, the samplers' own
  log-sigma interpolation (kept name)."""
  return noise_levels.vp_at(tables, jnp.asarray(t, jnp.float32))


def in_interval(t: jnp.ndarray, interval: tuple[float, float] | None) -> jnp.ndarray | bool:
  if interval is None:
    return True
  lo, hi = interval
  return (t >= lo) & (t <= hi)


def classifier_free(cond_fn: CondModelFn, labels: jnp.ndarray, null_label: int, scale: float, *,
                    model_var: str, interval: tuple[float, float] | None = None) -> ModelFn:
  """model_fn(x, t) = (1 + w) f(x, t, c) - w f(x, t, null) from one pass over 2B examples.

  Args:
    cond_fn: the conditional network, `cond_fn(x, t, y) -> raw output` (C or 2C channels).
    labels: int [B], the requested classes c.
    null_label: the null class (model.num_classes).
    scale: w >= 0. w = 0 returns `cond_fn(x, t, labels)` itself: plain conditional sampling.
    model_var: decides whether the output carries variance channels (kept from the cond pass).
    interval: guide only where interval[0] <= t <= interval[1]; None = every t.
  """
  if scale < 0:
    raise ValueError(f"guidance scale must be >= 0, got {scale}.")
  labels = jnp.asarray(labels, jnp.int32)
  if scale == 0:
    return lambda x, t: cond_fn(x, t, labels)

  def model_fn(x, t):
    b = x.shape[0]
    y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
    out = cond_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
    cond, uncond = out[:b], out[b:]
    return combine(cond, uncond, scale, model_var, in_interval(t, interval))
  return model_fn


def combine(cond: jnp.ndarray, uncond: jnp.ndarray, scale: float, model_var: str,
            active=True) -> jnp.ndarray:
  """(1 + w) cond - w uncond on the prediction channels; cond's variance channels kept."""
  pc, var = diffusion.split_model_output(cond, model_var)
  pu, _ = diffusion.split_model_output(uncond, model_var)
  guided = (1.0 + scale) * pc - scale * pu
  if active is not True:
    guided = jnp.where(_bcast(jnp.asarray(active), guided), guided, pc)
  return guided if var is None else jnp.concatenate([guided, var], axis=-1)


def classifier_grad(log_prob_fn: Callable, x: jnp.ndarray, t: jnp.ndarray,
                    labels: jnp.ndarray) -> jnp.ndarray:
  """g_b = grad_{x_b} log p(c_b | x_b, t_b), from `log_prob_fn(x, t) -> log-probs [B, K]`.

  Examples are independent, so the gradient of the sum over the batch is each one's gradient.
  """
  def total(x_):
    logp = log_prob_fn(x_, t)
    return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  return jax.grad(total)(x.astype(jnp.float32))


def classifier_guidance(model_fn: ModelFn, log_prob_fn: Callable, labels: jnp.ndarray,
                        scale: float, tables, *, model_output: str, model_var: str,
                        mode: str = "eps",
                        interval: tuple[float, float] | None = None) -> ModelFn:
  """Shifts the model's prediction by the classifier gradient (see the module docstring).

  The eps shift d is carried into the model's own parameterisation at fixed x_t by
  `noise_levels.add_eps_shift`: eps: eps + d;  x0: x0 - (s / alpha) d;  v: v + d / alpha, with
  (alpha, s) = `noise_levels.vp_at(tables, t)`, the samplers' coefficients at the same t.

  Args:
    model_fn: the (possibly already guided) model, `model_fn(x, t)`.
    log_prob_fn: `log_prob_fn(x_t, t) -> log p(. | x_t, t)` [B, K] (log-softmax of a classifier).
    labels: int [B], the requested classes.
    scale: s >= 0.
    tables: the schedule's DiffusionTables.
    model_output, model_var: the model's parameterisation.
    mode: "ancestral" (Algorithm 1, for the ancestral sampler) or "eps" (Algorithm 2).
    interval: guide only where interval[0] <= t <= interval[1]; None = every t.
  """
  diffusion.check_choice("classifier guidance mode", mode, CLASSIFIER_MODES)
  diffusion.check_choice("model_output", model_output, diffusion.MODEL_OUTPUTS)
  if scale < 0:
    raise ValueError(f"classifier guidance scale must be >= 0, got {scale}.")
  labels = jnp.asarray(labels, jnp.int32)
  betas = jnp.asarray(tables.betas, jnp.float32)

  def guided_fn(x, t):
    out = model_fn(x, t)
    pred, var = diffusion.split_model_output(out, model_var)
    alpha, s = vp_coefficients(tables, t)  # What the sampler uses at this t.
    g = classifier_grad(log_prob_fn, x, t, labels)
    if mode == "eps":
      d = -scale * _bcast(s, x) * g
    else:
      ti = jnp.clip(jnp.round(t).astype(jnp.int32), 0, betas.size - 1)
      log_var = diffusion.model_log_variance(tables, var, x, ti, model_var)
      beta = _bcast(betas[ti], x)
      d = -scale * jnp.exp(log_var) * jnp.sqrt(1.0 - beta) * _bcast(s, x) / beta * g
    d = jnp.where(_bcast(jnp.asarray(in_interval(t, interval)), d), d, 0.0)
    pred = noise_levels.add_eps_shift(pred, d, _bcast(alpha, x), _bcast(s, x), model_output)
    return pred if var is None else jnp.concatenate([pred, var], axis=-1)
  return guided_fn


def autoguidance(model_fn: ModelFn, guide_fn: ModelFn, scale: float, *, model_var: str,
                 interval: tuple[float, float] | None = None) -> ModelFn:
  """model_fn(x, t) = (1 + w) f(x, t) - w f_guide(x, t), Karras et al. 2024 (autoguidance).

  Args:
    model_fn: the main model, `model_fn(x, t)` (its own conditioning closed over).
    guide_fn: the weaker guide, same signature and the same parameterisation (eps, x0 or v: the
      combination is affine, so it is the guided eps in any of them; see the module docstring).
    scale: w >= 0. w = 0 returns `model_fn` itself: plain sampling, bitwise.
    model_var: decides whether the output carries variance channels (the main model's kept).
    interval: guide only where interval[0] <= t <= interval[1]; None = every t.
  """
  if scale < 0:
    raise ValueError(f"autoguidance scale must be >= 0, got {scale}.")
  if scale == 0:
    return model_fn

  def guided_fn(x, t):
    return combine(model_fn(x, t), guide_fn(x, t), scale, model_var, in_interval(t, interval))
  return guided_fn
