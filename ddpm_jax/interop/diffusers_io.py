"""diffusers model folders on disk: find, read and write them; the Hub only when asked.

A folder is read in either of diffusers' layouts:
  flat      config.json, diffusion_pytorch_model.safetensors (or .bin), scheduler_config.json
            (google/ddpm-cifar10-32 and `UNet2DModel.save_pretrained` + the scheduler's);
  pipeline  model_index.json, unet/{config.json, diffusion_pytorch_model.*},
            scheduler/scheduler_config.json (`DDPMPipeline.save_pretrained`).

Weights are read from safetensors with the `safetensors` package (numpy, no torch). A `.bin`
(a PyTorch pickle) is read only by `torch.load(weights_only=True)`, which refuses anything but
tensors, and only if torch is installed; nothing here ever calls pickle itself.
"""

import dataclasses
import json
import os
import re

import numpy as np

SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# "org/name", as the Hub names repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Folder:
  """Where a model's files are: its config, its weights, and its scheduler config (or None)."""
  root: str
  model_config: str
  weights: str
  scheduler_config: str | None


def is_hub_id(src: str) -> bool:
  """Whether `src` names a Hub repository rather than a local path ('hf://org/name' or a bare
  'org/name' that is no local path)."""
  if src.startswith("hf://"):
    return True
  return bool(_HUB_ID.match(src)) and not os.path.exists(src)


def download(src: str, cache_dir: str | None = None) -> str:
  """Downloads the model and scheduler files of a Hub repository; returns the local folder.

  Only ever called when the user named a Hub repository as --src.
  """
  repo = src.removeprefix("hf://")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(f"--src={src} names a Hugging Face Hub repository; downloading it needs "
                       "huggingface_hub: pip install -e '.[hub]' (or download the folder "
                       "yourself and pass its path).") from e
  patterns = ["*.json", f"*{SAFETENSORS}", f"*{BIN}"]
  return huggingface_hub.snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir)


def find(root: str) -> Folder:
  """The files of the model folder `root`, in either layout.

  Raises:
    FileNotFoundError: naming what is missing and what a diffusers folder holds.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a folder (nor a Hub repository id such as "
                            "google/ddpm-cifar10-32).")
  candidates = [root, os.path.join(root, "unet")]
  model_dir = next((d for d in candidates if os.path.isfile(os.path.join(d, MODEL_CONFIG))), None)
  if model_dir is None:
    raise FileNotFoundError(
        f"{root} holds no {MODEL_CONFIG} (nor unet/{MODEL_CONFIG}): a diffusers UNet2DModel "
        f"folder holds {MODEL_CONFIG} and {SAFETENSORS} (or {BIN}), and usually "
        f"{SCHEDULER_CONFIG}.")
  weights = next((os.path.join(model_dir, n) for n in (SAFETENSORS, BIN)
                  if os.path.isfile(os.path.join(model_dir, n))), None)
  if weights is None:
    present = sorted(os.listdir(model_dir))
    raise FileNotFoundError(f"{model_dir} holds no {SAFETENSORS} or {BIN} (it has {present}).")
  scheduler = next((p for p in (os.path.join(root, SCHEDULER_CONFIG),
                                os.path.join(root, "scheduler", SCHEDULER_CONFIG),
                                os.path.join(model_dir, SCHEDULER_CONFIG)) if os.path.isfile(p)),
                   None)
  return Folder(root, os.path.join(model_dir, MODEL_CONFIG), weights, scheduler)


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object.")
  return data


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A state dict as float32 numpy arrays: safetensors directly, `.bin` through torch.

  Raises:
    RuntimeError: a `.bin` without torch installed (saying how to get torch, or a safetensors
      file instead).
  """
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    try:
      tensors = st_numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        f"{path} is a PyTorch pickle (.bin); ddpm_jax reads it only with "
        "torch.load(weights_only=True), and torch is not installed. Install it "
        "(pip install torch==2.13.0) or convert the file to safetensors "
        f"(the folder's {SAFETENSORS}, which most Hub repositories also have).") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} does not load as a plain tensor state dict "
                     f"(torch.load(weights_only=True) refused it): {e}") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def write(out: str, model_config: dict, state_dict: dict[str, np.ndarray],
          scheduler_config: dict) -> None:
  """Writes a flat diffusers folder (config.json, safetensors, scheduler_config.json) atomically:
  into `<out>.partial`, renamed to `out` when complete."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  tmp = out.rstrip("/") + ".partial"
  if os.path.exists(tmp):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with open(os.path.join(tmp, MODEL_CONFIG), "w", encoding="utf-8") as f:
    json.dump(model_config, f, indent=2, sort_keys=True)
  st_numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
                     os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
  with open(os.path.join(tmp, SCHEDULER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(scheduler_config, f, indent=2, sort_keys=True)
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  os.rename(tmp, out)
