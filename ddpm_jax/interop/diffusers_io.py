"""diffusers model folders on disk: find, read and write them; the Hub only when asked.

A folder is read in either of diffusers' layouts:
  flat      config.json, diffusion_pytorch_model.safetensors (or .bin), scheduler_config.json
            (google/ddpm-cifar10-32 and `UNet2DModel.save_pretrained` + the scheduler's);
  pipeline  model_index.json, unet/ (or transformer/ for a DiT) {config.json,
            diffusion_pytorch_model.*}, scheduler/scheduler_config.json
            (`DDPMPipeline.save_pretrained`).

Weights are read from safetensors with the `safetensors` package (numpy, no torch). A `.bin`
(a PyTorch pickle) is read only by `torch.load(weights_only=True)`, which refuses anything but
tensors, and only if torch is installed; nothing here ever calls pickle itself.
"""

import json
import os
import re
import struct
from typing import BinaryIO

import numpy as np

from ddpm_jax.runtime import staging

SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# "org/name", as the Hub names repositories (a TF1 prefix such as "dir/model.ckpt-790000" is not).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TF1_PREFIX = re.compile(r"\.ckpt(-\d+)?$")


def is_hub_id(src: str) -> bool:
  """Whether `src` names a Hub repository rather than a local path ('hf://org/name' or a bare
  'org/name' that is no local path)."""
  if src.startswith("hf://"):
    return True
  first = src.split("/", 1)[0]
  return (bool(_HUB_ID.match(src)) and not _TF1_PREFIX.search(src) and not os.path.exists(src)
          and not os.path.isdir(first))  # "runs/typo": a local folder's child, not a repository


def _hub():
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("Downloading from the Hugging Face Hub needs huggingface_hub: pip install "
                       "-e '.[hub]' (or download the folder yourself and pass its path).") from e
  return huggingface_hub


def download(src: str, files: str = "configs", cache_dir: str | None = None) -> str:
  """Downloads part of a Hub repository's model; returns the local snapshot folder.

  Only ever called when the user named a Hub repository as --src. `files="configs"` fetches the
  JSON configs (checked before any weights move), `"weights"` then the one weights file the
  importer will read (safetensors if the repository has it, else the .bin).
  """
  repo = src.removeprefix("hf://")
  hub = _hub()
  try:
    if files == "configs":
      patterns = ["*.json"]
    else:
      names = hub.list_repo_files(repo)
      name = SAFETENSORS if any(n.endswith(SAFETENSORS) for n in names) else BIN
      patterns = [f"*{name}"]
    return hub.snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"--src={src} is no local path, and downloading the Hub repository {repo} failed "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). For a local folder "
        "or TF1 checkpoint, check the path; for the Hub, the repository id and the network.") from e


def _model_dir(root: str) -> str:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a folder (nor a Hub repository id such as "
                            "google/ddpm-cifar10-32, nor a TF1 checkpoint prefix).")
  index = os.path.join(root, "model_index.json")
  if os.path.isfile(index):
    components = read_json(index)
    latent = sorted({"vae", "vqvae", "text_encoder"} & set(components))
    if latent:
      what = ("a latent-space DiT pipeline (the published DiT-XL-2 models denoise the "
              "4-channel latents of Stable Diffusion's VAE)" if "transformer" in components
              else "a latent or text-conditioned pipeline")
      raise ValueError(f"{index} names {latent}: {what}; ddpm_jax imports pixel-space models "
                       "(UNet2DModel, DiTTransformer2DModel).")
  model_dir = next((d for d in (root, os.path.join(root, "unet"), os.path.join(root, "transformer"))
                    if os.path.isfile(os.path.join(d, MODEL_CONFIG))), None)
  if model_dir is None:
    raise FileNotFoundError(
        f"{root} holds no {MODEL_CONFIG} (nor unet/ or transformer/{MODEL_CONFIG}): a diffusers "
        f"model folder holds {MODEL_CONFIG} and {SAFETENSORS} (or {BIN}), and usually "
        f"{SCHEDULER_CONFIG}.")
  return model_dir


def _scheduler_path(root: str, model_dir: str) -> str | None:
  return next((p for p in (os.path.join(root, SCHEDULER_CONFIG),
                           os.path.join(root, "scheduler", SCHEDULER_CONFIG),
                           os.path.join(model_dir, SCHEDULER_CONFIG)) if os.path.isfile(p)),
              None)


def find_configs(root: str) -> tuple[dict, dict | None]:
  """(the model's config.json, its scheduler config or None), in either layout."""
  model_dir = _model_dir(root)
  scheduler = _scheduler_path(root, model_dir)
  return (read_json(os.path.join(model_dir, MODEL_CONFIG)),
          None if scheduler is None else read_json(scheduler))


def weights_path(root: str) -> str:
  """The model's weights file (safetensors preferred, else .bin), in either layout.

  Raises:
    FileNotFoundError: naming what is missing and what a diffusers folder holds.
  """
  model_dir = _model_dir(root)
  weights = next((os.path.join(model_dir, n) for n in (SAFETENSORS, BIN)
                  if os.path.isfile(os.path.join(model_dir, n))), None)
  if weights is None:
    present = sorted(os.listdir(model_dir))
    raise FileNotFoundError(f"{model_dir} holds no {SAFETENSORS} or {BIN} (it has {present}).")
  return weights


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object.")
  return data


def safetensors_problem(f: BinaryIO, size: int) -> str | None:
  """What is wrong with a safetensors file, in words, or None when its header and size agree.

  A safetensors file is an 8-byte little-endian header length, a JSON header giving each
  tensor's byte range, then the tensors; the safetensors package itself reports a short file
  only as "incomplete metadata, file not fully covered".

  Args:
    f: the file, opened for binary reading at its start.
    size: its length in bytes.
  """
  head = f.read(8)
  if len(head) < 8:
    return (f"it is {size} bytes long, too short to be a safetensors file (truncated, e.g. by a "
            "crash or a full disk)")
  (length,) = struct.unpack("<Q", head)
  if length > size - 8:
    return (f"its first 8 bytes announce a {length}-byte header but the file is {size} bytes "
            "long (truncated, e.g. by a crash or a full disk, or not a safetensors file)")
  try:
    header = json.loads(f.read(length))
  except (ValueError, UnicodeDecodeError) as e:
    return f"its header is not valid JSON ({e}): damaged, or not a safetensors file"
  if not isinstance(header, dict):
    return "its header is not a JSON object: damaged, or not a safetensors file"
  ends = [max(entry["data_offsets"]) for key, entry in header.items()
          if key != "__metadata__" and isinstance(entry, dict) and entry.get("data_offsets")]
  need = 8 + length + max(ends, default=0)
  if size < need:
    return (f"it is {size} bytes long but its header describes {need} bytes of tensors "
            "(truncated, e.g. by a crash or a full disk)")
  return None


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A state dict as float32 numpy arrays: safetensors directly, `.bin` through torch.

  Raises:
    RuntimeError: a `.bin` without torch installed (saying how to get torch, or a safetensors
      file instead).
  """
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    with open(path, "rb") as f:
      problem = safetensors_problem(f, os.path.getsize(path))
    if problem:
      raise ValueError(f"{path} is not a complete safetensors file: {problem}.")
    try:
      tensors = st_numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      hint = (" It holds bfloat16 tensors, which numpy cannot read: convert it to float32 "
              "(e.g. in PyTorch)." if "bf16" in str(e).lower() or "bfloat16" in str(e).lower()
              else "")
      raise ValueError(f"{path} is not a readable safetensors file: {e}.{hint}") from e
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        f"{path} is a PyTorch pickle (.bin); ddpm_jax reads it only with "
        "torch.load(weights_only=True), and torch is not installed. Install it "
        "(pip install -e '.[torch]') or convert the file to safetensors "
        f"(the folder's {SAFETENSORS}, which most Hub repositories also have).") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} does not load as a plain tensor state dict "
                     f"(torch.load(weights_only=True) refused it): {e}") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
  not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise ValueError(f"{path} is not a plain state dict: {not_tensors[:5]} are not tensors.")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def write(out: str, model_config: dict, state_dict: dict[str, np.ndarray],
          scheduler_config: dict) -> None:
  """Writes a flat diffusers folder (config.json, safetensors, scheduler_config.json) atomically:
  into a staging folder of our own beside `out`, renamed to `out` when complete
  (`runtime.staging`; `out` must be absent or an empty folder)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  with staging.staged(out, "--out") as tmp:
    with open(os.path.join(tmp, MODEL_CONFIG), "w", encoding="utf-8") as f:
      json.dump(model_config, f, indent=2, sort_keys=True)
    st_numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
                       os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(tmp, SCHEDULER_CONFIG), "w", encoding="utf-8") as f:
      json.dump(scheduler_config, f, indent=2, sort_keys=True)
