"""A ddpm_jax workdir out as a diffusers `UNet2DModel` (or, for a DiT, `DiTTransformer2DModel`)
folder with a matching `DDPMScheduler`.

`export_checkpoint(workdir, out)` reads the run's config.json and its newest checkpoint's (EMA)
params and writes `out/{config.json, diffusion_pytorch_model.safetensors,
scheduler_config.json}`, which `UNet2DModel.from_pretrained(out)` and
`DDPMScheduler.from_pretrained(out)` load. A model diffusers cannot express exactly (average-pool
resampling, our log-variance `learned` output) is refused, naming each field, before anything is
written. A class-conditional model is written with `num_class_embeds = K + 1`: diffusers adds
that embedding to the timestep embedding exactly as ddpm_jax does; row K is classifier-free
guidance's null class, which diffusers' pipelines do not know about.
"""

from absl import logging
import jax
import numpy as np

from ddpm_jax.config import factories
from ddpm_jax.core import diffusion
from ddpm_jax.interop import diffusers_dit_layout
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import diffusers_layout
from ddpm_jax.interop import diffusers_scheduler
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import staging
from ddpm_jax.runtime import train_state as train_state_lib


def _is_dit(config) -> bool:
  return config.model.get("name", "unet") == "dit"


def fields(config) -> dict:
  """The architecture fields of a run's config that the diffusers layout maps, and its
  "out_channels" (twice the image channels for a learned variance)."""
  d, m = config.data, config.model
  channels = d.num_channels * (2 if config.diffusion.model_var in diffusion.LEARNED_VARS else 1)
  names = (("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "norm_eps")
           if _is_dit(config) else
           ("ch", "num_res_blocks", "resamp_with_conv", "num_groups", "dropout"))
  out = {"data.image_size": d.image_size, "data.num_channels": d.num_channels,
         "model.num_classes": int(m.num_classes), "out_channels": channels,
         **{f"model.{k}": m[k] for k in names}}
  if not _is_dit(config):
    out.update({"model.ch_mult": tuple(m.ch_mult),
                "model.attn_resolutions": tuple(m.attn_resolutions)})
  return out


def diffusers_configs(config) -> tuple[dict, dict]:
  """(UNet2DModel or DiTTransformer2DModel config, DDPMScheduler config) of a run's config;
  refuses what diffusers cannot express, listing every such field."""
  if config.training.get("objective", "diffusion") != "diffusion":
    raise diffusers_layout.LayoutError(
        f"training.objective={config.training.objective!r}: a noisy classifier, not a "
        "diffusion U-Net; diffusers has no UNet2DModel for it.")
  parameterization = config.diffusion.get("parameterization", "ddpm")
  if parameterization != "ddpm":
    raise diffusers_layout.LayoutError(
        f"diffusion.parameterization={parameterization!r}: the network is preconditioned (EDM) "
        "or a velocity field (flow matching), which DDPMPipeline would read as a DDPM eps model; "
        "only parameterization 'ddpm' models export.")
  problems = []
  unet_cfg = sched_cfg = None
  try:
    to_config = (diffusers_dit_layout.dit_config_from_arch if _is_dit(config)
                 else diffusers_layout.unet_config_from_arch)
    unet_cfg = to_config(fields(config))
  except diffusers_layout.LayoutError as e:
    problems.append(str(e))
  try:
    sched_cfg = diffusers_scheduler.scheduler_config(config.diffusion.to_dict())
  except diffusers_layout.LayoutError as e:
    problems.append(str(e))
  if problems:
    raise diffusers_layout.LayoutError("Cannot export to diffusers:\n" + "\n".join(problems))
  return unet_cfg, sched_cfg


def export_checkpoint(workdir: str, out: str, *, use_ema: bool = True,
                      step: int | None = None) -> dict:
  """Writes the diffusers folder `out`; returns a summary (step, params, paths)."""
  config = run_config.load(workdir)
  if config is None:
    raise FileNotFoundError(f"{workdir} has no config.json: not a ddpm_jax workdir.")
  unet_cfg, sched_cfg = diffusers_configs(config)
  if "://" in out:
    raise ValueError(f"--out={out}: the exporter writes a local folder; export there, then copy "
                     "it (e.g. gcloud storage cp -r).")
  staging.check_new_target(out, "--out")  # before any weight is read
  model = factories.create_model(config)
  mesh = mesh_lib.make_mesh()
  abstract = train_state_lib.abstract_params(config, model, mesh)
  params, step = checkpointing.restore_params(workdir, abstract, use_ema=use_ema, step=step)
  host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
  if _is_dit(config):
    m = config.model
    state_dict = diffusers_dit_layout.state_dict_from_params(host, m.depth, m.patch_size,
                                                             m.hidden_size)
  else:
    state_dict = diffusers_layout.state_dict_from_params(host, len(config.model.ch_mult))
  if config.model.num_classes > 0 and not _is_dit(config):
    logging.warning("Class-conditional model: written with num_class_embeds=%d; row %d is the "
                    "null class of classifier-free guidance (pass class_labels to the UNet).",
                    config.model.num_classes + 1, config.model.num_classes)
  if jax.process_index() == 0:
    diffusers_io.write(out, unet_cfg, state_dict, sched_cfg)
  return {"step": step, "weights": "ema" if use_ema else "raw",
          "params": sum(int(v.size) for v in state_dict.values()), "out": out}
