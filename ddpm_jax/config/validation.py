"""The one validator: every rule on a config is checked here, once per run, before any compile
(the rules of the image tasks -- editing, restoration, super-resolution -- in `validation_tasks`).

`validate(config, mode)` runs the checks that `mode` needs and returns the objects it built on the
way (`factories.Components`): the drivers use exactly those, so nothing is built twice. Each rule
lives in one `check_*` function, whose message names the key and the fix.

Factories check their own arguments as library functions do (an unknown schedule, loss or sampler
raises in `core` / `sampling` with the valid names); the rules here are about configs: which keys
go together, what the devices, the data and other runs on disk allow.
"""

import math

from absl import logging
from etils import epath
import jax
import ml_collections

from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.config import validation_model
from ddpm_jax.config import validation_tasks
from ddpm_jax.core import denoisers
from ddpm_jax.core import diffusion
from ddpm_jax.core import losses
from ddpm_jax.core import schedules
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib

MODES = ("train", "sample", "eval", "edit", "restore", "cascade")
EVAL_METRICS = ("bpd", "fid", "kid", "precision_recall", "digits_score")
INCEPTION_METRICS = ("fid", "kid", "precision_recall")  # on the FID Inception's features
_check = diffusion.check_choice


def validate(config: ml_collections.ConfigDict, *, mode: str, open_data: bool = True,
             workdir: str | None = None) -> factories.Components:
  """Fails fast, with the valid choices or the fix, on any config `mode` could not complete.

  Args:
    config: an experiment config (configs/base.py and a variant).
    mode: 'train', 'sample', 'eval', 'edit', 'restore' or 'cascade' (`--mode`): which data,
      weights and checkpoints the run will need, so only those are checked.
    open_data: False skips the checks that read the dataset, the Inception weights and
      training.init_from's run, for a config checked where it will not run (a sweep planned on a
      laptop for a pod).
    workdir: train: the run's workdir; when it holds a checkpoint the run resumes it, and
      training.init_from is not read (None: a new run).

  Returns:
    The run's tables, model, loss and grid sampler (train), the configured sampler, and the
    classifier-guidance run, if any.
  """
  _check("mode", mode, MODES)
  check_choices(config)
  validation_model.check_model(config)
  check_training(config)
  check_batches(config)
  tables = factories.tables_from_config(config)
  check_schedule_end(config, tables)
  model = factories.create_model(config)
  generative = config.training.objective == "diffusion"
  # Building the loss and the sampler checks their combinations (e.g. mse with a learned
  # variance, more sampler steps than timesteps).
  loss_fn = factories.loss_fn_from_config(config, tables) if mode == "train" else None
  validation_tasks.check_super_resolution(config, mode)
  if mode == "restore":
    validation_tasks.check_restore(config)  # before the sampler: the solvers need their own sampler
  sample_fn = factories.sampler_from_config(config, tables, for_x0_model=mode == "restore") \
      if generative else None
  grid_sample_fn = None
  if mode == "train" and generative:  # the training grids: a few DDIM steps, whatever the sampler
    grid_steps = min(config.training.grid_sampler_steps, config.diffusion.num_timesteps)
    grid_sample_fn = factories.sampler_from_config(config, tables, sampler="ddim",
                                                   num_steps=grid_steps)
  check_guidance(config)
  classifier = check_classifier(config)
  guide = check_guide(config, mode) if generative else None
  metrics = _metrics(config, mode)
  train_source = None
  if open_data and mode == "train":
    train_source = check_data(config)[config.data.train_split]
    check_training_labels(config, train_source)
    check_init_from(config, model, workdir)
  elif open_data and {"bpd", *INCEPTION_METRICS} & set(metrics):
    check_data(config)
  if open_data and set(INCEPTION_METRICS) & set(metrics):
    check_inception_weights(config)  # now, not after hours of training
  if mode == "edit":
    validation_tasks.check_edit(config)
  return factories.Components(tables, model, loss_fn, sample_fn, grid_sample_fn, classifier,
                              train_source, guide)


def _metrics(config, mode: str) -> tuple[str, ...]:
  """The metrics this run computes: eval.metrics, or training's final ones."""
  if mode == "eval":
    return tuple(config.eval.metrics)
  if mode == "train" and config.training.objective == "diffusion":
    return tuple(config.training.final_eval_metrics)
  return ()


def check_choices(config: ml_collections.ConfigDict) -> None:
  """Every name-valued field against its valid names (the dataset first: later checks use it)."""
  d = config.diffusion
  _check("data.dataset", config.data.dataset, input_pipeline.DATASETS)
  _check("diffusion.schedule", d.schedule, schedules.SCHEDULES)
  _check("diffusion.model_output", d.model_output, diffusion.MODEL_OUTPUTS)
  _check("diffusion.model_var", d.model_var, diffusion.MODEL_VARS)
  _check("diffusion.loss", d.loss, losses.LOSSES)
  _check("diffusion.weighting", d.weighting, losses.WEIGHTINGS)
  _check("diffusion.t_sampling", d.t_sampling, losses.T_SAMPLINGS)
  _check("diffusion.parameterization", d.parameterization, denoisers.PARAMETERIZATIONS)
  _check("diffusion.flow_t", d.flow_t, losses.FLOW_T_SAMPLINGS)
  _check("training.objective", config.training.objective, losses.OBJECTIVES)
  _check("model.dtype", config.model.dtype, tuple(models.DTYPES))
  _check("sampling.sampler", config.sampling.sampler, sampling.SAMPLERS)
  _check("sampling.grid", config.sampling.grid, ("default", *sampling.GRIDS))
  sampling.check_edm_options("edm_stochastic", **factories.edm_options(config.sampling))
  eval_metrics = (*config.eval.metrics, *config.training.final_eval_metrics)
  for name in eval_metrics:
    _check("eval metric", name, EVAL_METRICS)
  if "digits_score" in eval_metrics and config.data.dataset != "digits":
    raise ValueError(
        f"Eval metric 'digits_score' scores 8x8 digits only (dataset {config.data.dataset!r}); use "
        "'fid', or drop it from --config.eval.metrics / --config.training.final_eval_metrics.")
  check_eval_options(config, eval_metrics)


def check_eval_options(config: ml_collections.ConfigDict, metrics) -> None:
  """eval.num_seeds, and the options of KID and precision/recall when they are asked for."""
  e, n = config.eval, config.sampling.num_samples
  if e.num_seeds < 1:
    raise ValueError(f"eval.num_seeds must be >= 1 (sample sets, seeds sampling.seed + 0, 1, "
                     f"...), got {e.num_seeds}; EDM's protocol is 3.")
  if "kid" in metrics and (e.kid_num_subsets < 1 or e.kid_subset_size < 2 or n < 2):
    raise ValueError(f"KID needs eval.kid_num_subsets >= 1, eval.kid_subset_size >= 2 and "
                     f"sampling.num_samples >= 2, got {e.kid_num_subsets}, {e.kid_subset_size} "
                     f"and {n}.")
  if "precision_recall" in metrics:
    if e.pr_k < 1:
      raise ValueError(f"eval.pr_k must be >= 1 (3 in Kynkaanniemi et al. 2019), got {e.pr_k}.")
    if min(n, e.pr_num_features or n) <= e.pr_k:
      raise ValueError(f"Precision/recall with eval.pr_k={e.pr_k} needs more than {e.pr_k} "
                       f"features per set: sampling.num_samples={n}, eval.pr_num_features="
                       f"{e.pr_num_features} (0 = all); raise them or lower eval.pr_k.")


def check_training(config: ml_collections.ConfigDict) -> None:
  """Intervals, the objective's needs and the diffusion settings that cannot work together."""
  d = config.diffusion
  if config.training.objective == "classifier" and conditioning.num_classes(config) <= 0:
    raise ValueError("training.objective='classifier' needs model.num_classes > 0 (the "
                     "classifier's logits), e.g. --config.model.num_classes=10 for digits.")
  for key in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints"):
    if config.training[key] <= 0:
      raise ValueError(f"training.{key} must be positive, got {config.training[key]}.")
  if d.num_timesteps < 2:
    raise ValueError(f"diffusion.num_timesteps must be >= 2, got {d.num_timesteps}.")
  check_parameterization(config)
  if d.zero_terminal_snr and d.model_output == "eps" and d.parameterization == "ddpm":
    raise ValueError("diffusion.zero_terminal_snr makes x0 unrecoverable from eps at t = T; use "
                     "--config.diffusion.model_output=v (Lin et al. 2023) or x0.")
  p = config.training.p_uncond
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"training.p_uncond must be in [0, 1], got {p}.")
  check_posthoc_ema(config)


def check_parameterization(config: ml_collections.ConfigDict) -> None:
  """EDM and flow matching: their own options, and none of DDPM's that they would ignore."""
  d, p = config.diffusion, config.diffusion.parameterization
  if p == "ddpm":
    return
  ddpm_only = {"diffusion.loss": (d.loss, "mse"), "diffusion.weighting": (d.weighting, "none"),
               "diffusion.t_sampling": (d.t_sampling, "uniform"),
               "diffusion.zero_terminal_snr": (d.zero_terminal_snr, False),
               "training.objective": (config.training.objective, "diffusion"),
               "sampling.classifier_workdir": (config.sampling.classifier_workdir, "")}
  for key, (value, default) in ddpm_only.items():
    if value != default:
      raise ValueError(f"{key}={value!r} is DDPM's (diffusion.parameterization='ddpm'); "
                       f"diffusion.parameterization={p!r} trains and samples with its own loss "
                       f"and noise levels. Use --config.{key}={default!r}.")
  if d.model_var in diffusion.LEARNED_VARS:
    raise ValueError(f"diffusion.model_var={d.model_var!r} (a learned variance) is DDPM's; "
                     f"diffusion.parameterization={p!r} needs fixed_large or fixed_small.")
  if not 0 < d.sigma_min < d.sigma_max or not math.isfinite(d.sigma_max):
    raise ValueError(f"Need 0 < diffusion.sigma_min < diffusion.sigma_max < inf (the sampling "
                     f"ladder; EDM's 0.002 and 80), got {d.sigma_min} and {d.sigma_max}.")
  if d.sigma_data <= 0 or d.p_std <= 0 or d.flow_t_std <= 0:
    raise ValueError(f"Need diffusion.sigma_data, p_std and flow_t_std > 0, got {d.sigma_data}, "
                     f"{d.p_std} and {d.flow_t_std}.")


def check_schedule_end(config: ml_collections.ConfigDict, tables) -> None:
  d = config.diffusion
  if (float(tables.abar[-1]) == 0.0 and d.model_output == "eps" and not d.clip_x0
      and d.parameterization == "ddpm"):
    raise ValueError(f"Schedule {d.schedule!r} ends at abar_T = 0, where x0 = (x_T - eps) / 0: "
                     "eps prediction needs --config.diffusion.clip_x0=True there, or use "
                     "--config.diffusion.model_output=v.")


def check_batches(config: ml_collections.ConfigDict) -> None:
  """Every global batch splits evenly over all devices of all processes."""
  n_dev = jax.device_count()
  for key, batch in [("training.batch_size", config.training.batch_size),
                     ("sampling.batch_size", config.sampling.batch_size),
                     ("eval.batch_size", config.eval.batch_size)]:
    if batch <= 0 or batch % n_dev:
      fix = max(n_dev, round(batch / n_dev) * n_dev)
      raise ValueError(
          f"Global batch size {key}={batch} is not divisible by the {n_dev} devices "
          f"({jax.process_count()} processes x {jax.local_device_count()} local devices); "
          f"each device needs an equal share. Set --config.{key}={fix} (any multiple of "
          f"{n_dev}).")


def check_data(config: ml_collections.ConfigDict) -> dict:
  """The dataset's channels, and that each split the run reads opens from data.data_dir;
  returns {split: opened source}."""
  data = config.data
  _check("data.dataset", data.dataset, input_pipeline.DATASETS)
  spec = input_pipeline.DATASETS[data.dataset]
  if data.num_channels != spec.num_channels and data.dataset != "folder":
    raise ValueError(f"Dataset {data.dataset!r} has {spec.num_channels} channels but "
                     f"config.data.num_channels={data.num_channels}.")
  splits = [data.train_split, data.eval_split]
  if set(INCEPTION_METRICS) & {*config.eval.metrics, *config.training.final_eval_metrics}:
    splits.append(config.eval.fid_split)
  return input_pipeline.check_splits(config, splits)


def check_training_labels(config: ml_collections.ConfigDict, source=None) -> None:
  """A conditional model needs labels, all of them in [0, num_classes) (`source`: the opened
  train split, if the caller has it)."""
  k = conditioning.num_classes(config)
  if k <= 0:
    return
  have = conditioning.dataset_num_classes(config, source)
  if have == 0:
    raise ValueError(f"model.num_classes={k} needs labels, but dataset {config.data.dataset!r} "
                     "has none (data.label_key). Train it unconditionally with "
                     "--config.model.num_classes=0, or name the label feature in data.label_key.")
  if have is not None and have > k:
    raise ValueError(f"Dataset {config.data.dataset!r} has {have} classes (labels 0..{have - 1})"
                     f" but model.num_classes={k}; set --config.model.num_classes={have}.")


def _as_flag(key: str, value) -> str:
  """`--config.<key>=<value>` as config_flags parses it (a JSON list is a tuple there)."""
  return f"--config.{key}={tuple(value) if isinstance(value, list) else value}"


def check_init_from(config: ml_collections.ConfigDict, model, workdir: str | None = None) -> None:
  """training.init_from: the run or imported model W a new run starts from, checked before any
  compile: W has a checkpoint, its config.json the same architecture, and that checkpoint params
  of this model's shapes (Orbax's metadata only: no array is read). A changed diffusion process
  (schedule, T, output, variance, loss) is fine-tuning, so it is only logged. Nothing is checked
  when `workdir` already holds a checkpoint: that run resumes and init_from is ignored.
  """
  source = str(config.training.init_from)
  if not source or (workdir is not None and checkpointing.latest_step(workdir) is not None):
    return
  make = ("train one (python -m ddpm_jax.main --mode=train --workdir=W) or import a published "
          "model (python -m ddpm_jax.import_checkpoint --src=... --workdir=W)")
  if not epath.Path(source).is_dir():
    raise ValueError(f"training.init_from={source}: no such directory. Name the workdir of a "
                     f"trained run or of an imported model; {make}.")
  step = checkpointing.latest_step(source)
  if step is None:
    raise ValueError(f"training.init_from={source} has no checkpoint in "
                     f"{checkpointing.checkpoint_dir(source)}; {make}.")
  recorded = run_config.segment_config(source, step)
  process = {}
  if recorded is None:
    logging.warning("training.init_from=%s has no config.json: only its parameter shapes are "
                    "checked against this config.", source)
  else:
    diff = run_config.differences(recorded, run_config.flat(config))
    arch = run_config.architecture_fields(diff)
    if arch:
      raise ValueError(
          f"training.init_from={source} holds another model than this config builds:" +
          "".join(f"\n  {k}: {source} has {a!r}, this config {b!r}" for k, (a, b) in arch.items())
          + f"\nUse {source}'s model settings ({source}/config.json): " +
          " ".join(_as_flag(k, a) for k, (a, _) in arch.items() if a is not None) + ".")
    process = {k: v for k, v in diff.items() if k in run_config.PROCESS}
    if process:
      logging.warning("Fine-tuning %s with another diffusion process than it was trained with:%s",
                      source, "".join(f"\n  {k}: {a!r} -> {b!r}" for k, (a, b) in process.items()))
  abstract = train_state_lib.abstract_params(config, model, mesh_lib.make_mesh())
  hint = ", ".join(f"{k}: {source} has {a!r}, this config {b!r}" for k, (a, b) in process.items())
  checkpointing.check_params(source, abstract, use_ema=bool(config.training.init_from_ema),
                             hint=hint, step=step)


def check_guidance(config: ml_collections.ConfigDict) -> None:
  """Classifier-free guidance needs a conditional model, a scale >= 0 and a valid t interval."""
  s = config.sampling
  w = float(s.guidance_scale)
  if not (s.classifier_workdir and conditioning.num_classes(config) == 0):
    # Classifier guidance of an unconditional model checks the label against its classifier.
    conditioning.check_class_label(config, int(s.class_label))
  if w < 0:
    raise ValueError(f"sampling.guidance_scale must be >= 0, got {w}.")
  if w > 0 and conditioning.num_classes(config) == 0:
    raise ValueError(f"sampling.guidance_scale={w} needs a class-conditional model, but "
                     "model.num_classes=0; use --config.sampling.guidance_scale=0.")
  t_max = conditioning.guidance_interval(config)[1]
  if not 0 <= s.guidance_t_min <= t_max:
    raise ValueError(f"sampling.guidance_t_min={s.guidance_t_min} must be in [0, {t_max}] "
                     "(guidance_t_max).")


def check_classifier(config: ml_collections.ConfigDict) -> factories.ClassifierRun | None:
  """Classifier guidance: the run named by sampling.classifier_workdir, checked; None when off."""
  run_dir, s = str(config.sampling.classifier_workdir), config.sampling
  if not run_dir:
    return None
  scale = float(s.classifier_scale)
  if scale < 0:
    raise ValueError(f"sampling.classifier_scale must be >= 0, got {scale}.")
  cconfig = run_config.load(run_dir)
  if cconfig is None:
    raise ValueError(f"sampling.classifier_workdir={run_dir}: no config.json there; train a "
                     "classifier first, e.g. python -m ddpm_jax.main "
                     f"--config=configs/digits_classifier_noisy.py --workdir={run_dir}.")
  if cconfig.training.objective != "classifier":
    raise ValueError(f"sampling.classifier_workdir={run_dir} holds a run with training.objective="
                     f"{cconfig.training.objective!r}, not a classifier "
                     "(configs/digits_classifier_noisy.py).")
  step = checkpointing.latest_step(run_dir)
  if step is None:
    raise ValueError(f"sampling.classifier_workdir={run_dir} has no checkpoint in "
                     f"{checkpointing.checkpoint_dir(run_dir)}; train the classifier first.")
  shape = lambda c: (c.data.image_size, c.data.num_channels)
  if shape(cconfig) != shape(config):
    raise ValueError(f"The classifier in {run_dir} takes {shape(cconfig)} (image_size, "
                     f"num_channels) images, the model makes {shape(config)}.")
  k, k_model = int(cconfig.model.num_classes), conditioning.num_classes(config)
  if k_model and k_model != k:
    raise ValueError(f"The classifier in {run_dir} has {k} classes, the conditional model "
                     f"{k_model}; they must name the same classes.")
  label = int(s.class_label)
  if not -1 <= label < k:
    raise ValueError(f"sampling.class_label={label} is out of range for the classifier in "
                     f"{run_dir}: valid target classes are 0..{k - 1}, or -1 for one of each in "
                     "turn.")
  return factories.ClassifierRun(run_dir, cconfig, step)


def check_guide(config: ml_collections.ConfigDict, mode: str) -> factories.GuideRun | None:
  """Autoguidance: the run named by sampling.guide_workdir at guide_step, checked to read its
  inputs and outputs as this model does; None when off."""
  s = config.sampling
  run_dir, w = str(s.guide_workdir), float(s.autoguidance_scale)
  if w < 0:
    raise ValueError(f"sampling.autoguidance_scale must be >= 0, got {w}.")
  if not run_dir:
    if w > 0:
      raise ValueError(f"sampling.autoguidance_scale={w} needs a guide: --config.sampling."
                       "guide_workdir=<a weaker run of the same data> (e.g. this run at an "
                       "earlier --config.sampling.guide_step).")
    return None
  if mode == "train":
    raise ValueError("sampling.guide_workdir (autoguidance) applies to --mode=sample, eval or "
                     "edit; unset it for training.")
  gconfig = run_config.load(run_dir)
  if gconfig is None:
    raise ValueError(f"sampling.guide_workdir={run_dir}: no config.json there (not a ddpm_jax "
                     "run).")
  if gconfig.training.objective != "diffusion":
    raise ValueError(f"sampling.guide_workdir={run_dir} holds a training.objective="
                     f"{gconfig.training.objective!r} run; the guide must be a denoiser.")
  steps = checkpointing.all_steps(run_dir)
  if not steps:
    raise ValueError(f"sampling.guide_workdir={run_dir} has no checkpoint in "
                     f"{checkpointing.checkpoint_dir(run_dir)}.")
  step = steps[-1] if int(s.guide_step) < 0 else int(s.guide_step)
  if step not in steps:
    raise ValueError(f"sampling.guide_step={step}: {run_dir} has checkpoints at steps {steps}.")
  # The config of the segment that wrote that checkpoint (a resumed guide may have changed).
  mine, theirs = run_config.flat(config), run_config.segment_config(run_dir, step)
  same = dict(_GUIDE_SAME)
  if config.diffusion.parameterization == "ddpm":  # the guide reads t on the same schedule
    same.update(_GUIDE_SAME_DDPM)
  diff = {k: (theirs.get(k), mine.get(k)) for k in same if theirs.get(k) != mine.get(k)}
  diff.update(run_config.meaning_differences(theirs, mine))
  if diff:
    raise ValueError(f"The guide in {run_dir} is not a model of the same process as this one: "
                     + ", ".join(f"{k} guide {a!r} vs {b!r}"
                                 + (f" ({same[k]})" if k in same else "")
                                 for k, (a, b) in diff.items())
                     + ". Autoguidance needs a weaker model of the same data and "
                     "parameterisation (a smaller config, or an earlier checkpoint).")
  k_guide, k_model = int(gconfig.model.num_classes), conditioning.num_classes(config)
  if k_guide and k_guide != k_model:
    raise ValueError(f"The guide in {run_dir} is conditional on {k_guide} classes, this model on "
                     f"{k_model}; use an unconditional guide or one of the same classes.")
  data_keys = ("data.dataset", "data.label_key")  # (data_dir may differ between machines)
  other = {k: (theirs.get(k), mine.get(k)) for k in data_keys if theirs.get(k) != mine.get(k)}
  if k_guide and other:
    raise ValueError(f"The guide in {run_dir} is conditional on the {k_guide} classes of other "
                     "data (" + ", ".join(f"{k} guide {a!r} vs {b!r}" for k, (a, b) in
                                          other.items()) + "): its label i is another class. "
                     "Use an unconditional guide or one trained on this model's data.")
  return factories.GuideRun(run_dir, gconfig, step)


# What a guide shares with the model it guides, so that it reads the same x_t (and t) and its
# output means the same: each key, and what it fixes. (Parameterisation, model_output and
# sigma_data are compared by run_config.meaning_differences.)
_GUIDE_SAME = {
    "data.image_size": "image size",
    "data.num_channels": "image channels",
    "model.sr_factor": "super-resolution conditioning: a stage also reads a low-resolution "
                       "image, which autoguidance does not pass",
    "diffusion.model_var": "output variance, and so the output channels",
}
_GUIDE_SAME_DDPM = {
    "diffusion.schedule": "noise schedule",
    "diffusion.num_timesteps": "timesteps",
    "diffusion.zero_terminal_snr": "schedule end",
}


def check_inception_weights(config: ml_collections.ConfigDict) -> str:
  """The FID weights path, or a FileNotFoundError that says how to make the file."""
  path = config.eval.inception_weights
  if not path or not epath.Path(path).exists():
    raise FileNotFoundError(
        f"FID needs the Inception weights file (--config.eval.inception_weights={path!r} not "
        "found). Make it once on a machine with internet: download pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth, run `python tools/convert_inception_weights.py "
        "--pth pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz`, then pass "
        "--config.eval.inception_weights=inception_fid.npz. Or drop 'fid', 'kid' and "
        "'precision_recall' from --config.eval.metrics.")
  return path


MAX_PHEMA_SIGMA_RELS = 4  # each tracked EMA is one more copy of the params in the train state


def check_posthoc_ema(config: ml_collections.ConfigDict) -> None:
  """training.phema_sigma_rels (post-hoc EMA, EDM2): at most a few distinct widths in range, and
  a snapshot interval >= 0."""
  from ddpm_jax.core import posthoc_ema  # pylint: disable=g-import-not-at-top
  tc = config.training
  sigma_rels = tuple(tc.get("phema_sigma_rels", ()))
  example = "--config.training.phema_sigma_rels='(0.05, 0.10)'"
  if len(sigma_rels) > MAX_PHEMA_SIGMA_RELS:
    raise ValueError(f"training.phema_sigma_rels={sigma_rels} tracks {len(sigma_rels)} EMAs, each "
                     f"a copy of the params; track at most {MAX_PHEMA_SIGMA_RELS} (EDM2 tracks "
                     f"two: {example}).")
  for s in sigma_rels:
    try:
      posthoc_ema.gamma_from_sigma_rel(float(s))
    except (TypeError, ValueError) as error:
      raise ValueError(f"training.phema_sigma_rels={sigma_rels}: {error}. Use widths like "
                       f"{example}, or () to turn post-hoc EMA off.") from None
  if len(set(float(s) for s in sigma_rels)) != len(sigma_rels):
    raise ValueError(f"training.phema_sigma_rels={sigma_rels} repeats a width; list each once, "
                     f"e.g. {example}.")
  every = tc.get("phema_snapshot_every", 0)
  if every < 0:
    raise ValueError(f"training.phema_snapshot_every must be >= 0 (0 = every "
                     f"training.checkpoint_every steps), got {every}.")
