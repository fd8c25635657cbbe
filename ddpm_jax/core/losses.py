"""Training losses, the variational bound in bits/dim, and timestep sampling.

Pure functions of arrays: the network enters only as `model_fn(x_t, t) -> model_out`, where
`model_out` has C channels, or 2C for a learned variance (the prediction, then the variance
channels, as `diffusion.split_model_output` expects). Indices `t = 0..T-1` are the paper's
timesteps 1..T (see `schedules`), so index 0 is the decoder term L_0 and index t > 0 is L_t.

The variational bound (DDPM eq. 5) is
  L = L_T + sum_{t=2}^{T} L_{t-1} + L_0,
  L_T     = KL(q(x_T|x_0) || N(0, I)),
  L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)),
  L_0     = -log p(x_0|x_1)  (a Gaussian discretised to the 256 pixel values, eq. 13),
reported in bits per dimension: nats averaged over all non-batch axes, divided by log 2.
"""

from collections.abc import Callable
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from ddpm_jax.core import denoisers
from ddpm_jax.core import diffusion
from ddpm_jax.core import noise_levels
from ddpm_jax.core.schedules import DiffusionTables

LOSSES = ("mse", "kl", "hybrid")
WEIGHTINGS = ("none", "p2", "min_snr")
T_SAMPLINGS = ("uniform", "importance")
FLOW_T_SAMPLINGS = ("uniform", "logit_normal")
# What the trainer fits: the denoiser, or the noise-conditional classifier of classifier guidance.
OBJECTIVES = ("diffusion", "classifier")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
LossFn = Callable[..., tuple[jnp.ndarray, dict[str, jnp.ndarray]]]

# Probabilities are floored before the log, as in the DDPM/IDDPM code, so that a decoder far
# from the data gives a large finite NLL (and finite gradients) instead of -log 0.
_MIN_PROB = 1e-12
# Edge detection for the first and last bins; pixel values sit 2/255 ~ 0.0078 apart.
_EDGE = 0.999


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over every axis but the first (batch) one."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

  KL = 1/2 [log(s2^2/s1^2) + s1^2/s2^2 + (m1 - m2)^2 / s2^2 - 1].
  Log variances are taken so that a tiny posterior variance never underflows to log 0.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Elementwise log p(x) in nats for x in [-1, 1] under a discretised Gaussian (DDPM eq. 13).

  p(x) = Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s), where the bin of x = -1 starts at -inf
  and the bin of x = 1 ends at +inf, so the 256 bin probabilities sum to one.

  Args:
    x: data, values on the grid k * 2/255 - 1, k = 0..255.
    means: m, broadcastable to x.
    log_scales: log s (half the log variance), broadcastable to x.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  upper = (centered + 1.0 / 255.0) * inv_stdv
  lower = (centered - 1.0 / 255.0) * inv_stdv
  # Phi(b) - Phi(a) cancels catastrophically when both sit in the upper tail; there the mirror
  # image Phi(-a) - Phi(-b) is the same number computed from two small, accurate values.
  mid = jnp.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
  # Edge bins: 1 - Phi(a) is written as Phi(-a) for the same reason.
  prob = jnp.where(x < -_EDGE, ndtr(upper), jnp.where(x > _EDGE, ndtr(-lower), mid))
  return jnp.log(jnp.maximum(prob, _MIN_PROB))


def prior_bpd(tables: DiffusionTables, x0: jnp.ndarray) -> jnp.ndarray:
  """L_T = KL(q(x_T|x_0) || N(0, I)) in bits/dim, shape [B]. Has no trainable parameter."""
  t = jnp.full(x0.shape[:1], tables.num_timesteps - 1, jnp.int32)
  mean, _, log_var = diffusion.q_mean_variance(tables, x0, t)
  return _mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def vlb_term_bpd(tables: DiffusionTables, model_out, x0, x_t, t, *, model_output: str,
                 model_var: str, clip_x0: bool = False) -> jnp.ndarray:
  """One term of the bound in bits/dim, shape [B]: L_{t-1} for index t > 0, L_0 for index 0.

  L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) between diagonal Gaussians (DDPM eq. 5);
  L_0 = -log p(x_0|x_1) under the discretised Gaussian with the mean and variance of p at t = 1.
  """
  true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(tables, x0, x_t, t)
  p = diffusion.p_mean_variance(tables, model_out, x_t, t, model_output=model_output,
                                model_var=model_var, clip_x0=clip_x0)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_var))
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_var))
  return jnp.where(t == 0, nll, kl) / math.log(2.0)


def _mse_weight(snr, weighting: str, model_output: str, p2_k: float, p2_gamma: float,
                min_snr_gamma: float):
  """Per-example weight of the MSE term as a function of SNR_t = abar_t / (1 - abar_t).

  p2 (Choi et al. 2022): (k + SNR)^-gamma.
  min_snr (Hang et al. 2023): min(SNR, gamma) rescaled to the prediction target:
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v.
  """
  if weighting == "none":
    return jnp.ones_like(snr)
  if weighting == "p2":
    return (p2_k + snr) ** -p2_gamma
  if model_output == "eps":
    # gamma / max(SNR, gamma) is min(SNR, gamma) / SNR without the 0/0 at SNR = 0 (jsd, zero
    # terminal SNR), where the limit is 1, and it never divides by anything below gamma.
    return min_snr_gamma / jnp.maximum(snr, min_snr_gamma)
  if model_output == "x0":
    return jnp.minimum(snr, min_snr_gamma)
  return jnp.minimum(snr, min_snr_gamma) / (snr + 1.0)


def get_loss_fn(tables: DiffusionTables, *, loss: str = "mse", model_output: str = "eps",
                model_var: str = "fixed_large", weighting: str = "none",
                hybrid_lambda: float = 0.001, p2_k: float = 1.0, p2_gamma: float = 1.0,
                min_snr_gamma: float = 5.0) -> LossFn:
  """Returns `loss_fn(model_fn, x0, t, noise) -> (loss [B], aux)` for one training step.

  With x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4) and w_t the weighting:
    mse:    w_t |target - f(x_t, t)|^2 averaged over dims (L_simple, DDPM eq. 14), the target
            being eps, x_0 or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022).
    kl:     T L_{t-1} in bits/dim: under t ~ U{0..T-1} an unbiased estimate of L - L_T (the
            bound without its constant prior term). Trains mean and variance.
    hybrid: w_t mse + lambda T L_{t-1} with the mean seen through a stop-gradient, so the bound
            trains only the variance (Improved DDPM, eq. 16, lambda = 0.001 on the sum over
            t, which T L_{t-1} estimates). With a fixed variance the bound term then has no
            gradient at all, and hybrid trains exactly like mse.

  Args:
    tables: the schedule tables (closed over).
    loss: one of `LOSSES`.
    model_output: what the network predicts, one of `diffusion.MODEL_OUTPUTS`.
    model_var: one of `diffusion.MODEL_VARS`; learned ones need loss 'kl' or 'hybrid'.
    weighting: one of `WEIGHTINGS`, applied to the mse term only.
    hybrid_lambda: lambda of the hybrid loss.
    p2_k, p2_gamma: k and gamma of the P2 weighting (k > 0 keeps it finite at SNR = 0).
    min_snr_gamma: gamma of the min-SNR weighting.

  Returns:
    loss_fn(model_fn, x0, t, noise): x0 [B, ...] in [-1, 1], t int [B], noise like x0. Returns
    the per-example loss [B] (multiply by importance weights, then average) and a dict of [B]
    float32 arrays: 'mse' (unweighted), 'vlb' (L_{t-1} in bits/dim) and 'weight' (w_t). Both
    'mse' and 'vlb' are always reported, whether or not the loss uses them, so training curves
    are comparable across losses.
  """
  diffusion.check_choice("loss", loss, LOSSES)
  diffusion.check_choice("model_output", model_output, diffusion.MODEL_OUTPUTS)
  diffusion.check_choice("model_var", model_var, diffusion.MODEL_VARS)
  diffusion.check_choice("weighting", weighting, WEIGHTINGS)
  learned = model_var in diffusion.LEARNED_VARS
  if loss == "mse" and learned:
    raise ValueError(
        f"loss='mse' with model_var={model_var!r} would leave the variance channels untrained "
        "(L_simple does not depend on them); use loss='hybrid' or loss='kl'.")
  if hybrid_lambda < 0 or p2_gamma < 0 or min_snr_gamma <= 0 or p2_k <= 0:
    raise ValueError("Need hybrid_lambda >= 0, p2_k > 0, p2_gamma >= 0 and min_snr_gamma > 0; "
                     f"got {hybrid_lambda}, {p2_k}, {p2_gamma}, {min_snr_gamma}.")
  num_timesteps = tables.num_timesteps

  def loss_fn(model_fn: ModelFn, x0, t, noise):
    x0 = x0.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    x_t = diffusion.q_sample(tables, x0, t, noise)
    # The loss is taken in float32 whatever the model's compute dtype: bfloat16's 8-bit
    # mantissa loses the small mean differences that the KL terms are made of.
    model_out = model_fn(x_t, t).astype(jnp.float32)
    pred, var_out = diffusion.split_model_output(model_out, model_var)

    alpha, s = diffusion.vp_at_index(tables, t, x0.ndim)
    target = noise_levels.output_from_x0_eps(x0, noise, alpha, s, model_output)
    mse = _mean_flat(jnp.square(target - pred))
    snr = diffusion.gather(tables.snr, t, 1).astype(jnp.float32)
    weight = _mse_weight(snr, weighting, model_output, p2_k, p2_gamma, min_snr_gamma)

    if loss == "kl":
      vlb_out = model_out
    elif learned:
      # Hybrid: the bound sees a frozen mean, so its gradient reaches only the variance.
      vlb_out = jnp.concatenate([jax.lax.stop_gradient(pred), var_out], axis=-1)
    else:
      # Nothing of the model's output is trained by the bound here; it is only reported.
      vlb_out = jax.lax.stop_gradient(model_out)
    vlb = vlb_term_bpd(tables, vlb_out, x0, x_t, t, model_output=model_output,
                       model_var=model_var, clip_x0=False)

    if loss == "mse":
      per_example = weight * mse
    elif loss == "kl":
      per_example = num_timesteps * vlb
    else:
      per_example = weight * mse + hybrid_lambda * num_timesteps * vlb
    return per_example, {"mse": mse, "vlb": vlb, "weight": weight}

  return loss_fn


def get_edm_loss_fn(sigma_data: float = denoisers.SIGMA_DATA) -> LossFn:
  """Returns `loss_fn(model_fn, x0, sigma, noise) -> (loss [B], aux)`, EDM's training loss.

  `model_fn(x, time_input)` is the raw network F; the loss is lambda(sigma) ||D(x_0 + sigma n,
  sigma) - x_0||^2 averaged over pixels with D = `denoisers.network_denoiser(F, 'edm')` and
  lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1). aux: 'mse' is the
  unweighted ||D - x_0||^2, 'weight' is lambda(sigma).
  """
  def loss_fn(model_fn: ModelFn, x0, sigma, noise):
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    denoise = denoisers.network_denoiser(lambda x, c: model_fn(x, c).astype(jnp.float32), "edm",
                                         sigma_data)
    mse = _mean_flat(jnp.square(denoise(x0 + noise_levels.per_example(sigma, x0) * noise, sigma)
                                - x0))
    weight = denoisers.edm_loss_weight(sigma, sigma_data)
    return weight * mse, {"mse": mse, "weight": weight}

  return loss_fn


def get_flow_loss_fn() -> LossFn:
  """Returns `loss_fn(model_fn, x0, t, noise) -> (loss [B], aux)`, conditional flow matching.

  x_t = (1 - t) x_0 + t eps and the loss is ||F(x_t, 1000 t) - (eps - x_0)||^2 averaged over
  pixels (Lipman et al. 2023; Liu et al. 2023), unweighted. aux 'mse' is the loss itself.
  """
  def loss_fn(model_fn: ModelFn, x0, t, noise):
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    x_t = denoisers.flow_interpolate(x0, noise, t)
    velocity = model_fn(x_t, denoisers.FLOW_TIME_SCALE * t).astype(jnp.float32)
    mse = _mean_flat(jnp.square(velocity - denoisers.flow_target(x0, noise)))
    return mse, {"mse": mse}

  return loss_fn


def noise_level_sampler(parameterization: str, *, p_mean: float = denoisers.P_MEAN,
                        p_std: float = denoisers.P_STD, flow_t: str = "uniform",
                        flow_t_mean: float = 0.0, flow_t_std: float = 1.0):
  """Returns `draw(key) -> (level, weight)`, one example's training noise level (float32
  scalars) for 'edm' (sigma, log-normal) or 'flow' (t: uniform on [0, 1), or logit-normal),
  weight 1. DDPM's integer t are `sample_timesteps`."""
  if parameterization == "edm":
    return lambda key: (denoisers.edm_sample_sigma(key, (), p_mean, p_std), jnp.float32(1.0))
  if parameterization == "flow":
    diffusion.check_choice("flow t sampling", flow_t, FLOW_T_SAMPLINGS)
    if flow_t == "uniform":
      return lambda key: (jax.random.uniform(key, ()), jnp.float32(1.0))
    return lambda key: (denoisers.logit_normal_t(key, (), flow_t_mean, flow_t_std),
                        jnp.float32(1.0))
  raise ValueError(f"noise_level_sampler takes 'edm' or 'flow', got {parameterization!r}")


def get_classifier_loss_fn(tables: DiffusionTables) -> LossFn:
  """Returns `loss_fn(model_fn, x0, t, noise, labels) -> (cross-entropy [B], aux)`.

  The noise-conditional classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4) is
  trained on the forward marginal: with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM
  eq. 4), the loss is -log softmax(f(x_t, t))_c for the example's label c. `model_fn(x_t, t)`
  returns the logits [B, K]; aux holds 'accuracy', 1 where argmax f(x_t, t) = c, else 0.
  """
  def loss_fn(model_fn: ModelFn, x0, t, noise, labels):
    x_t = diffusion.q_sample(tables, x0.astype(jnp.float32), t, noise.astype(jnp.float32))
    logits = model_fn(x_t, t).astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return ce, {"accuracy": accuracy}

  return loss_fn


# --- Timestep sampling --------------------------------------------------------------------------


@flax.struct.dataclass
class ImportanceState:
  """Loss history for importance sampling of t (Improved DDPM, sec. 3.3).

  history: float32 [T, H], the newest H values of the loss at each t, oldest first.
  counts: int32 [T], how many of the H slots of each t are filled (capped at H).
  """

  history: jnp.ndarray
  counts: jnp.ndarray


def init_importance_state(num_timesteps: int, history_len: int = 10) -> ImportanceState:
  return ImportanceState(history=jnp.zeros((num_timesteps, history_len), jnp.float32),
                         counts=jnp.zeros((num_timesteps,), jnp.int32))


def importance_probs(state: ImportanceState, uniform_prob: float = 0.001) -> jnp.ndarray:
  """p(t), shape [T]: uniform until every t has a full history, then (IDDPM eq. 18)

    p(t) = (1 - u) sqrt(E[L_t^2]) / sum_t' sqrt(E[L_t'^2]) + u / T,   u = `uniform_prob`,

  where the expectation is the mean over the history. The uniform part keeps every p(t) > 0,
  so the weights 1 / (T p(t)) stay bounded.
  """
  num_timesteps, history_len = state.history.shape
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
  total = jnp.sum(rms)
  # An all-zero history (a perfect model) has no preferred t; fall back to uniform, not 0/0.
  probs = rms / jnp.where(total > 0, total, 1.0)
  probs = jnp.where(total > 0, (1.0 - uniform_prob) * probs + uniform_prob / num_timesteps,
                    uniform)
  warmed_up = jnp.all(state.counts >= history_len)
  return jnp.where(warmed_up, probs, uniform)


def sample_timesteps(rng, batch_size: int, num_timesteps: int, method: str = "uniform",
                     state: ImportanceState | None = None):
  """Draws t int32 [B] and weights float32 [B] such that E[w_t L_t] = (1/T) sum_t L_t.

  uniform: t ~ U{0..T-1}, w = 1. importance: t ~ `importance_probs(state)`, w = 1 / (T p(t)),
  which is exactly 1 during the warm-up (while p is uniform).
  """
  diffusion.check_choice("t sampling method", method, T_SAMPLINGS)
  if method == "uniform":
    t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, jnp.int32)
    return t, jnp.ones((batch_size,), jnp.float32)
  if state is None:
    raise ValueError("Importance sampling of t needs an ImportanceState.")
  if state.history.shape[0] != num_timesteps:
    raise ValueError(f"ImportanceState covers {state.history.shape[0]} timesteps, "
                     f"not {num_timesteps}.")
  probs = importance_probs(state)
  t = jax.random.choice(rng, num_timesteps, (batch_size,), replace=True, p=probs)
  t = t.astype(jnp.int32)
  warmed_up = jnp.all(state.counts >= state.history.shape[1])
  weights = jnp.where(warmed_up, 1.0 / (num_timesteps * probs[t]), 1.0)
  return t, weights.astype(jnp.float32)


def update_importance_state(state: ImportanceState, t, losses) -> ImportanceState:
  """Pushes each (t_i, loss_i) into the history of t_i, keeping the newest H values.

  A sequential loop over the batch, so a t drawn several times gets every one of its losses
  in order. Call it with the losses of the whole global batch (all-gathered) so that every
  replica holds the same state. Losses should be the unweighted per-example loss.
  """
  history_len = state.history.shape[1]
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)

  def push(i, carry):
    history, counts = carry
    ti, count = t[i], counts[t[i]]
    row = history[ti]
    # Until the row is full, write the next free slot; then drop the oldest and append.
    filling = row.at[jnp.minimum(count, history_len - 1)].set(losses[i])
    row = jnp.where(count < history_len, filling, jnp.append(row[1:], losses[i]))
    return history.at[ti].set(row), counts.at[ti].set(jnp.minimum(count + 1, history_len))

  history, counts = jax.lax.fori_loop(0, t.shape[0], push, (state.history, state.counts))
  return ImportanceState(history=history, counts=counts)


# --- The full bound, for evaluation -------------------------------------------------------------


def vlb_bpd(model_fn: ModelFn, tables: DiffusionTables, x0, rng, *, model_output: str,
            model_var: str, clip_x0: bool = True) -> dict[str, jnp.ndarray]:
  """The whole variational bound of x0 in bits/dim, each entry of shape [B].

  Returns 'prior' (L_T), 'terms' (sum_{t=2}^{T} L_{t-1}, array indices 1..T-1), 'decoder' (L_0)
  and 'total' (their sum, DDPM eq. 5). One loop over every t compiles once; each t draws fresh
  noise from fold_in(rng, t), so the estimate is the same however the t are ordered.
  """
  diffusion.check_choice("model_output", model_output, diffusion.MODEL_OUTPUTS)
  diffusion.check_choice("model_var", model_var, diffusion.MODEL_VARS)
  x0 = x0.astype(jnp.float32)
  batch = x0.shape[0]

  def body(i, carry):
    terms, decoder = carry
    noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, x0.dtype)
    t = jnp.full((batch,), i, jnp.int32)
    x_t = diffusion.q_sample(tables, x0, t, noise)
    model_out = model_fn(x_t, t).astype(jnp.float32)
    term = vlb_term_bpd(tables, model_out, x0, x_t, t, model_output=model_output,
                        model_var=model_var, clip_x0=clip_x0)
    return jnp.where(i > 0, terms + term, terms), jnp.where(i == 0, term, decoder)

  zeros = jnp.zeros((batch,), jnp.float32)
  terms, decoder = jax.lax.fori_loop(0, tables.num_timesteps, body, (zeros, zeros))
  prior = prior_bpd(tables, x0)
  return {"prior": prior, "terms": terms, "decoder": decoder, "total": prior + terms + decoder}
