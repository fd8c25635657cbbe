"""Samplers of p(x_0): ancestral (DDPM), DDIM and DPM-Solver++(2M), as pure jittable functions.

The network enters as `model_fn(x_t, t) -> model_out`, with `t` an int32 [B] array of array
indices 0..T-1 (see `schedules`) and `model_out` the raw output that `diffusion` understands
(C channels, or 2C for learned variances). Every sampler is a single `lax.fori_loop`, so
`jax.jit(sample_fn)` traces the model once whatever the number of steps.

Randomness is tied to the global array shape, never to a device: x_T ~ N(0, I) is drawn from
`rng` with the full shape and the noise of sampler step i from `jax.random.fold_in(rng, i)`. With
JAX's partitionable threefry this makes the samples identical however the batch is sharded.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.schedules import DiffusionTables

SAMPLERS = ("ancestral", "ddim", "dpm_solver_pp")
SPACINGS = ("uniform", "quadratic")

# DPM-Solver++ with fewer model calls than this takes a first-order step into index 0.
_LOWER_ORDER_FINAL_STEPS = 15

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
Trajectory = dict[str, jnp.ndarray] | None
SampleFn = Callable[[ModelFn, jax.Array, tuple[int, ...]], tuple[jnp.ndarray, Trajectory]]


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """The S = `num_steps` timestep indices a respaced sampler visits, in increasing order.

  With q_i the spacing curve at i = 0..S-1,

    uniform:   q_i = (T - 1) * i / (S - 1)        rounded half up
    quadratic: q_i = (T - 1) * (i / (S - 1))**2   rounded down (DDIM paper, sec. D.2)

  and then tau_i = max(q_i, tau_{i-1} + 1), which only changes the dense start of the quadratic
  curve, where its gaps are below one index. So tau_0 = 0, tau_{S-1} = T - 1 (if S > 1; S = 1
  gives [0]) and the sequence is strictly increasing; S = T gives every index for either spacing.

  Both curves end at T - 1 rather than at DDIM's 0.8 T (quadratic) or T - T/S (uniform): the
  samplers start from x ~ N(0, I), which is only the marginal at the last index.

  Args:
    num_timesteps: T, the length of the schedule.
    num_steps: S, with 1 <= S <= T.
    spacing: one of `SPACINGS`.

  Returns:
    An int64 array [S].
  """
  diffusion.check_choice("spacing", spacing, SPACINGS)
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule length), "
                     f"got {num_steps}.")
  frac = np.linspace(0.0, 1.0, num_steps, dtype=np.float64)
  last = num_timesteps - 1
  if spacing == "uniform":
    q = np.floor(last * frac + 0.5)
  else:
    q = np.floor(last * frac**2)
  # tau_i - i = running max of (q_i - i), i.e. tau_i = max(q_i, tau_{i-1} + 1). Since q is
  # convex or linear with q_{S-1} = T - 1, this never pushes an index past T - 1.
  i = np.arange(num_steps)
  steps = np.maximum.accumulate(q.astype(np.int64) - i) + i
  assert steps[0] == 0 and steps[-1] == last * (num_steps > 1) and np.all(np.diff(steps) > 0)
  return steps


class _Stepper(NamedTuple):
  """One sampler: the timesteps it visits and its update rule.

  `step(i, x, aux, model_out, t, key) -> (x_next, aux, pred_x0)` is sampler step i (0-based,
  in sampling order), at the timestep t = `timesteps[i]` (int32 [B]); `aux` is carried state
  beyond x (the previous x0 prediction of a multistep solver), started by `init_aux(x_T)`.
  """
  timesteps: np.ndarray  # [N] int, decreasing: the order in which the model is called.
  init_aux: Callable[[jnp.ndarray], Any]
  step: Callable[..., tuple[jnp.ndarray, Any, jnp.ndarray]]


def _ancestral(tables: DiffusionTables, model_output: str, model_var: str,
               clip_x0: bool) -> _Stepper:
  """DDPM Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, over all T steps.

  mu_theta is the posterior mean at the (optionally clipped) x0 prediction (DDPM eqs. 7, 11)
  and sigma_t^2 the variance chosen by `model_var`; z = 0 at the last step (index 0), so the
  output is mu_theta(x_1, 1) = x0_hat (coef1 = 1, coef2 = 0 there).
  """
  timesteps = np.arange(tables.num_timesteps)[::-1]

  def step(i, x, aux, model_out, t, key):
    out = diffusion.p_mean_variance(tables, model_out, x, t, model_output=model_output,
                                    model_var=model_var, clip_x0=clip_x0)
    noise = jax.random.normal(key, x.shape, x.dtype)
    scale = jnp.where(i < timesteps.size - 1, jnp.exp(0.5 * out.log_var), 0.0)
    return out.mean + scale * noise, aux, out.pred_x0

  return _Stepper(timesteps, lambda x: (), step)


def _ddim(tables: DiffusionTables, model_output: str, model_var: str, clip_x0: bool,
          timesteps: np.ndarray, eta: float) -> _Stepper:
  """DDIM (Song et al. 2021, eq. 12) on the respaced `timesteps` (decreasing).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev),

  with abar_prev taken at the next timestep visited (1 after the last, index 0), so the last
  step returns x0_hat. eta = 0 is the deterministic DDIM; eta = 1 on all T steps is DDPM with
  fixed_small variances. eps_hat is recomputed from the clipped x0_hat (`predict_x0_eps`).
  """
  abar = tables.abar[timesteps].astype(jnp.float32)
  abar_prev = jnp.append(abar[1:], 1.0)
  # 1 - abar from the float64-made sqrt(1 - abar): it cancels near t = 0 in the compute dtype.
  one_minus_abar = jnp.square(tables.sqrt_one_minus_abar[timesteps].astype(jnp.float32))
  one_minus_abar_prev = jnp.append(one_minus_abar[1:], 0.0)
  sigma = eta * jnp.sqrt(one_minus_abar_prev / one_minus_abar * (1.0 - abar / abar_prev))
  # Rounding can make 1 - abar_prev - sigma^2 slightly negative when eta = 1 at the last step.
  dir_coef = jnp.sqrt(jnp.maximum(one_minus_abar_prev - sigma**2, 0.0))
  x0_coef = jnp.sqrt(abar_prev)

  def step(i, x, aux, model_out, t, key):
    pred, _ = diffusion.split_model_output(model_out, model_var)  # A learned variance is unused.
    x0, eps = diffusion.predict_x0_eps(tables, pred, x, t, model_output, clip_x0)
    x_prev = x0_coef[i] * x0 + dir_coef[i] * eps
    if eta > 0:  # Static: the deterministic sampler draws no noise at all.
      x_prev = x_prev + sigma[i] * jax.random.normal(key, x.shape, x.dtype)
    return x_prev, aux, x0

  return _Stepper(timesteps, lambda x: (), step)


def _dpm_solver_pp(tables: DiffusionTables, model_output: str, model_var: str, clip_x0: bool,
                   timesteps: np.ndarray) -> _Stepper:
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction.

  In log-SNR time lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar), with
  h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i and D_i the x0 prediction at step i:

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h_i) D'_i,
    D'_i    = (1 + 1 / (2 r_i)) D_i - (1 / (2 r_i)) D_{i-1}
            = D_i + h_i / (2 h_{i-1}) (D_i - D_{i-1}).

  The first step is first order (DDIM with eta = 0), having no D_{i-1}, and so is the last: it
  goes from index 0 to clean data (alpha = 1, sigma = 0, lambda = +inf), where h is infinite and
  the update is exactly x = D, the x0 prediction at index 0. Below `_LOWER_ORDER_FINAL_STEPS`
  steps, the step into index 0 is first order too ("lower_order_final" of the reference code):
  its h is then much larger than h_{i-1}, and extrapolating D that far is unstable.

  The expm1 form keeps every coefficient finite when abar = 0 at the last index (jsd, zero
  terminal SNR): lambda = -inf there, expm1(-inf) = -1 and the first step is
  x = sigma_next x_T + alpha_next D; the next step's h / (2 h_prev) is then 0.
  """
  lam = 0.5 * tables.log_snr[timesteps].astype(jnp.float32)
  lam_next = jnp.append(lam[1:], jnp.inf)
  alpha_next = jnp.append(tables.sqrt_abar[timesteps[1:]].astype(jnp.float32), 1.0)
  sigma = tables.sqrt_one_minus_abar[timesteps].astype(jnp.float32)
  sigma_next = jnp.append(sigma[1:], 0.0)
  h = lam_next - lam
  x_coef = sigma_next / sigma
  d_coef = -alpha_next * jnp.expm1(-h)
  # First-order steps get correction weight 0; the masked-out values there may be inf or NaN,
  # which `where` drops.
  n = timesteps.size
  last_second_order = n - 2 if n >= _LOWER_ORDER_FINAL_STEPS else n - 3
  second_order = (jnp.arange(n) > 0) & (jnp.arange(n) <= last_second_order)
  corr = jnp.where(second_order, h / (2.0 * jnp.append(jnp.inf, h[:-1])), 0.0)

  def step(i, x, x0_prev, model_out, t, key):
    del key  # Deterministic.
    pred, _ = diffusion.split_model_output(model_out, model_var)
    x0, _ = diffusion.predict_x0_eps(tables, pred, x, t, model_output, clip_x0)
    d = x0 + corr[i] * (x0 - x0_prev)
    return x_coef[i] * x + d_coef[i] * d, x0, x0

  return _Stepper(timesteps, jnp.zeros_like, step)


def _run(stepper: _Stepper, trajectory_every: int) -> SampleFn:
  """Wraps a stepper into sample_fn: x_T ~ N(0, I), then one fori_loop over its steps."""
  timesteps = np.asarray(stepper.timesteps)
  n = timesteps.size
  every = trajectory_every
  # The recorded steps are those i with (n - 1 - i) % every == 0, so the last step (index 0,
  # whose pred_x0 is the sample) is always among them.
  first = (n - 1) % every if every else 0
  num_records = (n - 1) // every + 1 if every else 0

  def sample_fn(model_fn: ModelFn, rng: jax.Array, shape: tuple[int, ...]):
    shape = tuple(shape)
    x = jax.random.normal(rng, shape, jnp.float32)
    traj = None
    if every:
      traj = {"x_t": jnp.zeros((num_records,) + shape, x.dtype),
              "pred_x0": jnp.zeros((num_records,) + shape, x.dtype)}

    def body(i, carry):
      x, aux, traj = carry
      t = jnp.full(shape[:1], jnp.asarray(timesteps, jnp.int32)[i], jnp.int32)
      # The state stays float32 even if the network computes (and returns) bf16.
      model_out = model_fn(x, t).astype(x.dtype)
      x_next, aux, pred_x0 = stepper.step(i, x, aux, model_out, t, jax.random.fold_in(rng, i))
      if traj is not None:
        k = jnp.clip((i - first) // every, 0, num_records - 1)
        keep = (i >= first) & ((i - first) % every == 0)
        new = {"x_t": x, "pred_x0": pred_x0}
        traj = {name: buf.at[k].set(jnp.where(keep, new[name], buf[k]))
                for name, buf in traj.items()}
      return x_next, aux, traj

    x, _, traj = jax.lax.fori_loop(0, n, body, (x, stepper.init_aux(x), traj))
    if traj is not None:
      traj["t"] = jnp.asarray(timesteps[first::every], jnp.int32)
    return x, traj

  return sample_fn


def get_sampler(name: str, tables: DiffusionTables, *, model_output: str = "eps",
                model_var: str = "fixed_large", num_steps: int | None = None, eta: float = 0.0,
                spacing: str = "uniform", clip_x0: bool = True,
                trajectory_every: int = 0) -> SampleFn:
  """Returns `sample_fn(model_fn, rng, shape) -> (x0, trajectory)` for the sampler `name`.

  Every argument is checked here, before anything is traced.

  Args:
    name: one of `SAMPLERS`. "ancestral" always runs all T steps; "ddim" and "dpm_solver_pp"
      run on `respaced_timesteps(T, num_steps, spacing)`.
    tables: the schedule's `DiffusionTables`.
    model_output: what the network predicts, one of `diffusion.MODEL_OUTPUTS`.
    model_var: one of `diffusion.MODEL_VARS`. Only the ancestral sampler uses the variance; the
      others only need to know whether the output carries 2C channels.
    num_steps: number of model calls S, 1 <= S <= T; None means T. The ancestral sampler only
      accepts None or T, as it has no respacing of its variances.
    eta: DDIM's noise scale (0 is deterministic, 1 is DDPM-like); must be 0 for the others.
    spacing: one of `SPACINGS`, for the respaced samplers.
    clip_x0: clip the x0 prediction to [-1, 1] at every step (eps_hat follows it).
    trajectory_every: if positive, also record the state every that many sampler steps.

  Returns:
    sample_fn(model_fn, rng, shape): `model_fn(x_t, t)` with x_t float32 [shape] and t int32
    [shape[0]] returns the raw network output; `rng` is a PRNG key; `shape` is the global batch
    shape [B, ...]. It returns the sample x0 (float32 [shape], not clipped beyond what the
    sampler does) and None, or a trajectory dict (K recordings, the last at index 0):
      'x_t'     [K, *shape]: the model input at the recorded step,
      'pred_x0' [K, *shape]: the x0 prediction made from it,
      't'       [K] int32:   its timestep index, decreasing.
  """
  diffusion.check_choice("sampler", name, SAMPLERS)
  diffusion.check_choice("spacing", spacing, SPACINGS)
  diffusion.check_choice("model_output", model_output, diffusion.MODEL_OUTPUTS)
  diffusion.check_choice("model_var", model_var, diffusion.MODEL_VARS)
  num_timesteps = tables.num_timesteps
  num_steps = num_timesteps if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule length), "
                     f"got {num_steps}.")
  if name == "ancestral" and num_steps != num_timesteps:
    raise ValueError(f"The ancestral sampler runs all {num_timesteps} steps; got num_steps="
                     f"{num_steps} (use 'ddim' or 'dpm_solver_pp' for fewer steps).")
  if eta < 0 or (name != "ddim" and eta != 0):
    raise ValueError(f"eta must be >= 0, and only 'ddim' uses it; got eta={eta} for {name!r}.")
  if trajectory_every < 0:
    raise ValueError(f"trajectory_every must be >= 0, got {trajectory_every}.")

  if name == "ancestral":
    stepper = _ancestral(tables, model_output, model_var, clip_x0)
  else:
    timesteps = respaced_timesteps(num_timesteps, num_steps, spacing)[::-1]
    if name == "ddim":
      stepper = _ddim(tables, model_output, model_var, clip_x0, timesteps, float(eta))
    else:
      stepper = _dpm_solver_pp(tables, model_output, model_var, clip_x0, timesteps)
  return _run(stepper, int(trajectory_every))
