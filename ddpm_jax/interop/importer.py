"""Published DDPM weights into a normal ddpm_jax workdir.

`import_checkpoint(src, workdir, base)` reads
  * a diffusers `UNet2DModel` or pixel-space `DiTTransformer2DModel` folder (either layout, see
    `diffusers_io`; the DiT's mapping is `diffusers_dit_layout`), or a Hub repository
    when `src` names one (downloaded by huggingface_hub; only then is the network used);
  * an original TF1 DDPM checkpoint of Ho et al. (`model.ckpt-<step>` prefix, or a folder
    holding one), its EMA shadows (`ema=True`) or its raw variables;
and writes `workdir/config.json` (the `base` config with the architecture and the process of the
model: from its config.json and scheduler_config.json, or DDPM's published settings for TF1), an
Orbax checkpoint `workdir/checkpoints/<step>/state` holding `params` and `ema_params` (both the
imported weights), and `workdir/imported.json` (the source and what was taken from it). Then
`--mode=sample|eval|edit`, sweeps, guidance and `training.init_from` work on it unchanged.

Everything is read and checked before anything is written: a folder of another architecture, a
missing, extra or misshapen weight, an unknown scheduler or a `.bin` without torch fails naming
the problem, and the workdir is left as it was. The workdir is staged in a folder of our own
beside it (`<name>.ddpm_jax-staging-<random>`, see `runtime.staging`) and renamed when complete;
no other folder is touched. A cloud workdir is written in place, `imported.json` last.
"""

import dataclasses
import datetime
import glob
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import diffusion
from ddpm_jax.interop import diffusers_dit_layout
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import diffusers_layout
from ddpm_jax.interop import diffusers_scheduler
from ddpm_jax.models import unet as unet_lib
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import staging


@dataclasses.dataclass
class Model:
  """What a source yields: the config fields it fixes, its weights, and notes for the user."""
  kind: str                       # "diffusers" | "tf1"
  fields: dict                    # dotted config keys -> values
  params: Any                     # our param tree (numpy), or a callable(shapes) -> tree
  step: int
  notes: list[str]
  source: str


def _is_tf1(src: str) -> bool:
  return (os.path.isfile(src + ".index") or
          (os.path.isdir(src) and bool(glob.glob(os.path.join(src, "*.index")))))


def read_source(src: str, *, image_size: int, ema: bool, hub_cache: str | None = None,
                num_channels: int = 3) -> Model:
  """Reads the source's architecture, process and weights (no config, nothing written).

  Args:
    src: a diffusers folder (`UNet2DModel` or `DiTTransformer2DModel`), a Hub repository id, or
      a TF1 checkpoint prefix or folder.
    image_size: the image side for a TF1 checkpoint (which does not record it).
    num_channels: the config's image channels, which a DiT's input channels must equal (a
      published DiT on 4-channel VAE latents is refused, saying so).
    ema: TF1 only: the EMA shadows (True) or the raw variables.
    hub_cache: huggingface_hub's cache folder (None: its default).
  """
  if _is_tf1(src):
    from ddpm_jax.interop import tf1_layout  # pylint: disable=g-import-not-at-top
    from ddpm_jax.interop import tf_checkpoint  # pylint: disable=g-import-not-at-top
    params, arch = tf1_layout.load(src, ema=ema)
    step = tf_checkpoint.resolve_checkpoint(src)[1] or 0
    fields = {
        "data.image_size": image_size, "data.num_channels": arch["in_channels"],
        "model.ch": arch["ch"], "model.ch_mult": tuple(arch["ch_mult"]),
        "model.num_res_blocks": arch["num_res_blocks"],
        "model.attn_resolutions": tuple(image_size // 2**lv for lv in arch["attn_levels"]),
        "model.resamp_with_conv": arch["resamp_with_conv"], "model.num_classes": 0,
        "model.num_groups": 32,  # DDPM's GroupNorms
        **diffusers_scheduler.ddpm_published(image_size),
    }
    if arch["out_channels"] == 2 * arch["in_channels"]:
      fields["diffusion.model_var"] = "learned"
    notes = [f"TF1 checkpoint: {'EMA' if ema else 'raw'} weights; the process is DDPM's "
             f"published one (linear, T=1000, eps, {fields['diffusion.model_var']})"]
    attn = sorted(set(fields["model.attn_resolutions"]))
    if attn != [16]:
      notes.append(
          f"a TF1 checkpoint does not record its image size: {image_size} was taken from the "
          f"config (data.image_size), which puts attention at {attn} px; DDPM's published "
          "models all have it at 16 px (32 px images for CIFAR-10, 256 px for the others). "
          "Check --config.data.image_size.")
    return Model("tf1", fields, params, step, notes, src)
  hub = diffusers_io.is_hub_id(src)
  folder_src = src
  if hub:  # the configs first: a model that does not fit is refused before its weights move
    logging.info("Downloading the configs of %s from the Hugging Face Hub.", src)
    folder_src = diffusers_io.download(src, "configs", cache_dir=hub_cache)
  model_cfg, scheduler_cfg = diffusers_io.find_configs(folder_src)
  dit = diffusers_dit_layout.is_dit_config(model_cfg)
  if dit:
    arch = diffusers_dit_layout.arch_from_dit_config(model_cfg, num_channels)
  else:
    arch = diffusers_layout.arch_from_unet_config(model_cfg, default_size=image_size)
  out_channels = arch.pop("out_channels")
  size = arch["data.image_size"]
  notes = []
  if not dit and model_cfg.get("sample_size") is None:
    notes.append(f"config.json has no sample_size: {size} taken from the config")
  if scheduler_cfg is not None:
    process, scheduler_notes = diffusers_scheduler.process_from_scheduler(scheduler_cfg, size)
    notes += scheduler_notes
  else:
    process = diffusers_scheduler.ddpm_published(size)
    notes.append(f"no {diffusers_io.SCHEDULER_CONFIG}: using DDPM's published process (linear, "
                 f"T=1000, eps, {process['diffusion.model_var']})")
  learned = process["diffusion.model_var"] in diffusion.LEARNED_VARS
  if learned != (out_channels == 2 * arch["data.num_channels"]):
    raise diffusers_layout.LayoutError(
        f"The model has out_channels={out_channels} for in_channels={arch['data.num_channels']} "
        f"but its scheduler's variance is {process['diffusion.model_var']!r}: a learned variance "
        "needs twice the image channels, a fixed one the same number.")
  if hub:
    logging.info("Downloading the weights of %s.", src)
    folder_src = diffusers_io.download(src, "weights", cache_dir=hub_cache)
  weights = diffusers_io.read_weights(diffusers_io.weights_path(folder_src))  # before any write
  if dit:
    return Model("diffusers", {**arch, **process},
                 lambda shapes: diffusers_dit_layout.params_from_state_dict(weights, shapes),
                 0, notes, src)
  num_levels = len(arch["model.ch_mult"])
  return Model("diffusers", {**arch, **process},
               lambda shapes: diffusers_layout.params_from_state_dict(weights, shapes, num_levels),
               0, notes, src)


def apply_fields(base: ml_collections.ConfigDict, fields: dict) -> tuple[ml_collections.ConfigDict,
                                                                          dict]:
  """`base` with `fields` set; returns it and {key: (base value, model value)} that changed."""
  config = ml_collections.ConfigDict(base.to_dict())
  changed = {}
  for key, value in fields.items():
    section, name = key.split(".")
    old = config[section][name]
    if isinstance(old, tuple):
      value = tuple(value)
    if old != value:
      changed[key] = (old, value)
    config[section][name] = value
  return config, changed


def check_new_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"--workdir={workdir} exists and is not a folder; the importer writes a "
                          "new workdir. Choose a new --workdir.")
  if path.exists() and any(path.iterdir()):
    raise FileExistsError(
        f"{workdir} exists and is not empty; the importer writes a new workdir. Choose a new "
        "--workdir (to fine-tune an imported model, train into a new workdir with "
        f"--config.training.init_from={workdir}).")


def _check_tree(params, shapes) -> None:
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
  got = {jax.tree_util.keystr(p): tuple(np.shape(v))
         for p, v in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f"{k}: weights {got.get(k, 'absent')} vs model {want.get(k, 'absent')}"
              for k in sorted(want.keys() | got.keys()) if got.get(k) != want.get(k)]
  if problems:
    raise diffusers_layout.LayoutError(diffusers_layout.problems_text(
        "The weights do not fit the network", problems))


def write_workdir(workdir: str, config, params, step: int, record: dict,
                  what: str = "--workdir") -> None:
  """Writes config.json, the params-only Orbax checkpoint and imported.json (see module doc).

  `params` (a param tree, arrays or NumPy) is stored as both `params` and `ema_params` of step
  `step`; `record` is imported.json's content. Also used by post-hoc EMA reconstruction
  (`training.posthoc_ema_io`), whose output is a params-only workdir too. A local workdir is
  staged in a folder of our own beside it and renamed when complete (`runtime.staging`); `what`
  names the flag that chose `workdir`, for the messages.
  """
  if staging.is_remote(workdir):  # no rename on a bucket: imported.json, written last, marks it
    _write_contents(workdir, config, params, step, record)
    return
  with staging.staged(workdir, what) as staging_dir:
    _write_contents(staging_dir, config, params, step, record)


def _write_contents(target: str, config, params, step: int, record: dict) -> None:
  epath.Path(target).mkdir(parents=True, exist_ok=True)
  run_config.record(config, target, None)
  tree = jax.tree.map(np.asarray, params)
  manager = checkpointing.create_manager(target, keep=None)
  with checkpointing._Quiet():  # pylint: disable=protected-access
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": tree, "ema_params": tree})), force=True)
    manager.wait_until_finished()
    manager.close()
  (epath.Path(target) / checkpointing.IMPORTED_FILE).write_text(
      json.dumps(record, indent=2, default=str))


def import_checkpoint(src: str, workdir: str, base: ml_collections.ConfigDict, *, ema: bool = True,
                      hub_cache: str | None = None) -> dict:
  """Reads `src`, checks it against the config it implies, and writes the workdir.

  Returns:
    The imported.json record: source, kind, step, the config fields the model fixed (with the
    base config's values where they differ), notes, and the parameter count.
  """
  check_new_workdir(workdir)
  model = read_source(src, image_size=int(base.data.image_size), ema=ema, hub_cache=hub_cache,
                      num_channels=int(base.data.num_channels))
  config, changed = apply_fields(base, model.fields)
  config.sampling.use_ema = True
  validation.validate(config, mode="sample", open_data=False)
  shapes = unet_lib.param_shapes(factories.create_model(config), config.data.image_size,
                                 config.data.num_channels)
  params = model.params(shapes) if callable(model.params) else model.params
  _check_tree(params, shapes)
  count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
  record = {
      "source": src, "kind": model.kind, "step": model.step,
      "weights": ("ema" if ema else "raw") if model.kind == "tf1" else "as published",
      "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "params": count,
      "fields_from_model": {k: v for k, v in model.fields.items()},
      "changed_from_base_config": {k: list(v) for k, v in changed.items()},
      "notes": model.notes,
  }
  write_workdir(workdir, config, params, model.step, record)
  return record
