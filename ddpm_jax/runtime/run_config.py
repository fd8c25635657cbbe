"""The record of each run segment's config, and the checks a resume makes against it.

`workdir/config.json` is the config of the first segment and is never overwritten; a run that
resumes from step s writes `workdir/config_resume_<s>.json`. Both are written only after the
checks below pass, so a refused resume leaves the record as it was.

On resume the new config is compared with the config of the segment that wrote the checkpoint:
  * fields that change the params' shapes or the state's structure fail (before any compile);
  * fields that change the diffusion process being learnt (schedule, T, parameterisation,
    variance, loss) fail unless `training.allow_config_change=True`;
  * any other change (lr, batch, steps, intervals, ...) is logged as a diff.
"""

from collections.abc import Mapping
import json
import os
import re

from absl import logging
from etils import epath
import ml_collections

from ddpm_jax.runtime import staging

# Every model field is architecture (it changes the params' shapes, or as model.num_groups the
# function they define) except the dropout rate and the compute dtype.
_NOT_ARCHITECTURE = ("model.dropout", "model.dtype")
_ARCHITECTURE_EXTRA = ("data.image_size", "data.num_channels", "training.objective")
# Fields whose change makes the checkpoint's optimiser or importance state another pytree.
_STRUCTURE = ("diffusion.t_sampling", "training.phema_sigma_rels")
# The diffusion process and what the network is trained to predict of it.
PROCESS = ("diffusion.schedule", "diffusion.num_timesteps", "diffusion.zero_terminal_snr",
           "diffusion.model_output", "diffusion.model_var", "diffusion.loss",
           "diffusion.hybrid_lambda", "diffusion.weighting", "diffusion.p2_k", "diffusion.p2_gamma",
           "diffusion.min_snr_gamma", "diffusion.parameterization", "diffusion.sigma_data",
           "diffusion.p_mean", "diffusion.p_std", "diffusion.flow_t", "diffusion.flow_t_mean",
           "diffusion.flow_t_std")
# What the network's output means: sampling a run with other values would misread it.
MEANING = ("diffusion.parameterization", "diffusion.sigma_data", "diffusion.model_output")


def meaning_differences(run: dict, now: dict) -> dict:
  """{key: (run's, now)} of the `MEANING` fields that differ between two flat configs; an EDM or
  flow run's `model_output` (unused) and a DDPM run's `sigma_data` (unused) do not count."""
  used = {"diffusion.parameterization",
          "diffusion.model_output" if run.get("diffusion.parameterization", "ddpm") == "ddpm"
          else "diffusion.sigma_data"}
  return {k: (run.get(k), now.get(k)) for k in MEANING
          if k in used and k in run and run.get(k) != now.get(k)}
# Fields added after runs were recorded, with the value those runs had.
_ADDED_FIELDS = {"model.num_classes": 0, "training.objective": "diffusion",
                 "training.init_from": "", "training.init_from_ema": True,
                 "diffusion.parameterization": "ddpm", "diffusion.sigma_data": 0.5,
                 "diffusion.p_mean": -1.2, "diffusion.p_std": 1.2, "diffusion.sigma_min": 0.002,
                 "diffusion.sigma_max": 80.0, "diffusion.flow_t": "uniform",
                 "diffusion.flow_t_mean": 0.0, "diffusion.flow_t_std": 1.0,
                 "training.phema_sigma_rels": [], "training.phema_snapshot_every": 0,
                 "sampling.guide_workdir": "", "sampling.guide_step": -1,
                 "sampling.autoguidance_scale": 0.0, "model.sr_factor": 0,
                 "training.cond_aug_max": 0.0, "sampling.low_res_input": "",
                 "sampling.cond_aug": 0.0, "restore.task": "sr2", "restore.method": "ddnm",
                 "restore.sigma_y": 0.0, "restore.input": "", "restore.input_kind": "truth",
                 "restore.mask": "random_half", "restore.sigma_data": 1.0,
                 "restore.num_images": 16, "cascade.base_workdir": "", "model.num_groups": 32,
                 "model.name": "unet", "model.patch_size": 2, "model.hidden_size": 384,
                 "model.depth": 12, "model.num_heads": 6, "model.mlp_ratio": 4.0,
                 "model.norm_eps": 1e-6, "training.shard_state": False}
_RESUME_NAME = re.compile(r"config_resume_(\d+)\.json$")


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{'a.b': leaf} for a nested mapping (a config's `to_dict()`, or its JSON record)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_diff(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> dict:
  """{key: (base value, value)} for every leaf where `config` differs from `base`."""
  new, old = flatten(config.to_dict()), flatten(base.to_dict())
  return {k: (old.get(k), v) for k, v in sorted(new.items()) if old.get(k) != v}


def flat(config) -> dict:
  """A config (or its JSON record) as the flat dict its record holds."""
  return flatten(config if isinstance(config, dict) else json.loads(config_to_json(config)))


def load(workdir: str) -> ml_collections.ConfigDict | None:
  """The config a run was started with (its config.json), None if it has none; fields added
  since it was written get the value those runs had (`_ADDED_FIELDS`)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  for key, value in _ADDED_FIELDS.items():
    section, name = key.split(".")
    if section not in config:
      config[section] = ml_collections.ConfigDict()
    if name not in config[section]:
      config[section][name] = value
  return config


def record_dir(workdir: str) -> str | None:
  """Where a run's config record is: `workdir` itself, or, for a sample-only sweep point whose
  `checkpoints` links to another run's (`experiments.launch.link_checkpoint`), that run; None if
  neither has a config.json."""
  if (epath.Path(workdir) / "config.json").exists():
    return workdir
  link = os.path.join(workdir, "checkpoints")
  if not staging.is_remote(workdir) and os.path.islink(link):
    source = os.path.dirname(os.path.realpath(link))
    if os.path.exists(os.path.join(source, "config.json")):
      return source
  return None


def segment_config(workdir: str, step: int) -> dict | None:
  """The flat config of the segment that wrote checkpoint `step` (None if none is recorded)."""
  root = epath.Path(workdir)
  best, best_start = None, -2
  if (root / "config.json").exists():
    best, best_start = root / "config.json", -1
  for path in root.glob("config_resume_*.json"):
    start = int(_RESUME_NAME.search(path.name).group(1))
    if best_start < start <= step:
      best, best_start = path, start
  if best is None:
    return None
  # Runs recorded before a field existed ran with its neutral value.
  return {**_ADDED_FIELDS, **flat(json.loads(best.read_text()))}


def differences(old: dict, new: dict) -> dict:
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def _format(diff: dict) -> str:
  return "".join(f"\n  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def architecture_fields(diff: dict) -> dict:
  return {k: v for k, v in diff.items()
          if (k.startswith("model.") and k not in _NOT_ARCHITECTURE) or k in _ARCHITECTURE_EXTRA}


def check_resume(config: ml_collections.ConfigDict, workdir: str, step: int) -> dict:
  """Compares `config` with the config that wrote checkpoint `step`; returns the diff.

  Raises:
    ValueError: on an architecture or state-structure change, or a diffusion-process change
      without `training.allow_config_change`.
  """
  old = segment_config(workdir, step)
  if old is None:
    logging.warning("No config.json in %s: cannot check the resume config against the run's.",
                    workdir)
    return {}
  diff = differences(old, flat(config))
  arch = architecture_fields(diff)
  structure = {k: v for k, v in diff.items() if k in _STRUCTURE}
  old_clip, new_clip = diff.get("optim.grad_clip", (None, None))
  if old_clip is not None and new_clip is not None and (old_clip > 0) != (new_clip > 0):
    structure["optim.grad_clip"] = (old_clip, new_clip)
  if arch or structure:
    raise ValueError(
        f"Cannot resume {workdir} at step {step}: these fields differ from the run's config and "
        f"change the shape of its params or of its optimiser state:{_format({**arch, **structure})}"
        f"\nResume with the run's values (see {workdir}/config.json), or start a new workdir.")
  process = {k: v for k, v in diff.items() if k in PROCESS}
  if process and not config.training.allow_config_change:
    raise ValueError(
        f"Resuming {workdir} at step {step} would change the diffusion process the model has "
        f"been learning:{_format(process)}\nResume with the run's values, or pass "
        "--config.training.allow_config_change=True if this is intended (e.g. fine-tuning).")
  if diff:
    logging.warning("Resuming at step %d with a config that differs from the run's in %d keys:%s",
                    step, len(diff), _format(diff))
  return diff


def record(config: ml_collections.ConfigDict, workdir: str, resume_step: int | None) -> None:
  """Writes config.json (first segment, never overwritten) or config_resume_<step>.json."""
  root = epath.Path(workdir)
  if (root / "config.json").exists():
    name = f"config_resume_{resume_step or 0}.json"
  else:
    name = "config.json"
  # Whole or absent, never cut short by a kill: config.json is never rewritten, and every later
  # start reads it.
  staging.write_whole(root / name, config_to_json(config))
