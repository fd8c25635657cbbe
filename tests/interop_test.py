"""Published models in and out: diffusers UNet2DModel folders imported, exported and sampled.

The reference is PyTorch diffusers itself (the `[test]` extra installs torch's CPU wheel and
diffusers): randomly weighted `UNet2DModel`s in DDPM's layout (every parameter random, GroupNorm
scales and the zero-initialised output conv included), saved in each layout the importer claims.
"""

import json
import os
import shutil
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import torch

from configs import cifar10
from configs import digits
from configs import workdir as workdir_config
from ddpm_jax import sampling
from ddpm_jax.config import factories
from ddpm_jax.core import schedules
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import diffusers_layout
from ddpm_jax.interop import diffusers_scheduler
from ddpm_jax.interop import exporter
from ddpm_jax.interop import importer
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib
from tests import diffusers_reference
from tests import helpers

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def random_unet(config, seed: int = 0, num_class_embeds=None) -> diffusers.UNet2DModel:
  """diffusers' UNet2DModel in the config's DDPM layout, every parameter random."""
  unet = diffusers_reference.diffusers_unet(config)
  if num_class_embeds:
    kwargs = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    unet = diffusers.UNet2DModel(**{**kwargs, "num_class_embeds": num_class_embeds})
    assert unet.class_embedding is not None
  return diffusers_reference.randomise(unet, seed)


def save(unet, scheduler, path: str, layout: str) -> str:
  """Writes the model in one of the layouts the importer reads."""
  if layout == "pipeline":
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path
  unet.save_pretrained(path)
  scheduler.save_pretrained(path)
  if layout == "legacy_bin":  # a PyTorch pickle with the pre-0.14 attention names
    state = {}
    for key, value in unet.state_dict().items():
      for new, old in LEGACY.items():
        key = key.replace(f".{new}.", f".{old}.")
      state[key] = value
    os.remove(os.path.join(path, diffusers_io.SAFETENSORS))
    torch.save(state, os.path.join(path, diffusers_io.BIN))
  return path


def torch_out(unet, x_nhwc: np.ndarray, t: np.ndarray, labels=None) -> np.ndarray:
  with torch.no_grad():
    y = unet(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
             class_labels=None if labels is None else torch.from_numpy(labels)).sample
  return y.numpy().transpose(0, 2, 3, 1)


def load_workdir(workdir: str, use_ema: bool = True):
  """(config, model, params) of a workdir, as --mode=sample restores them."""
  config = workdir_config.get_config(workdir)
  model = factories.create_model(config)
  abstract = train_state_lib.abstract_params(config, model, mesh_lib.make_mesh())
  params, _ = checkpointing.restore_params(workdir, abstract, use_ema=use_ema)
  return config, model, params


def our_out(model, params, x, t, labels=None) -> np.ndarray:
  y = None if labels is None else jnp.asarray(labels)
  return np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), y,
                                train=False))


def rel_err(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(config, n: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  d = config.data
  x = rng.standard_normal((n, d.image_size, d.image_size, d.num_channels)).astype(np.float32)
  return x, np.array([0, 417, 999][:n], np.int64)


def linear_scheduler(**kw):
  return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                 variance_type="fixed_large", **kw)


@pytest.fixture(scope="module")
def digits_unet():
  return random_unet(digits.get_config())


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory, digits_unet):
  root = tmp_path_factory.mktemp("digits")
  src = save(digits_unet, linear_scheduler(), str(root / "src"), "flat")
  importer.import_checkpoint(src, str(root / "W"), digits.get_config())
  return str(root / "W")


@pytest.mark.parametrize("layout", ["flat", "pipeline", "legacy_bin"])
def test_import_matches_diffusers_at_digits_size(tmp_path, digits_unet, layout):
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), layout)
  record = importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert record["params"] == sum(p.numel() for p in digits_unet.parameters())
  config, model, params = load_workdir(str(tmp_path / "W"))
  x, t = inputs(config)
  assert rel_err(our_out(model, params, x, t), torch_out(digits_unet, x, t)) <= 1e-5
  # Both slots hold the imported weights, so sampling.use_ema either way samples the model.
  _, _, raw = load_workdir(str(tmp_path / "W"), use_ema=False)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(params)))


@pytest.mark.slow
def test_import_matches_diffusers_in_cifar10_layout(tmp_path):
  config = cifar10.get_config()
  unet = random_unet(config, seed=3)
  assert sum(p.numel() for p in unet.parameters()) == 35_746_307
  src = save(unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  importer.import_checkpoint(src, str(tmp_path / "W"), cifar10.get_config())
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert config.model.to_dict() == {**cifar10.get_config().model.to_dict(),
                                    "ch_mult": (1, 2, 2, 2), "attn_resolutions": (16,)}
  x, t = inputs(config, n=2)
  assert rel_err(our_out(model, params, x, t), torch_out(unet, x, t)) <= 1e-5


def test_class_conditional_model_round_trips(tmp_path):
  config = digits.get_config()
  unet = random_unet(config, seed=5, num_class_embeds=11)  # 10 classes + the null class
  src = save(unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  with pytest.raises(ValueError, match="null class"):  # diffusers' rows have no null class
    importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  _edit_json(os.path.join(src, "config.json"), **{diffusers_layout.NULL_CLASS_MARKER: True})
  importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert config.model.num_classes == 10
  x, t = inputs(config)
  labels = np.array([3, 10, 7])
  assert rel_err(our_out(model, params, x, t, labels), torch_out(unet, x, t, labels)) <= 1e-5
  exporter.export_checkpoint(str(tmp_path / "W"), str(tmp_path / "out"))
  back = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "out")).eval()
  assert back.config.num_class_embeds == 11
  importer.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "W2"), digits.get_config())
  assert rel_err(torch_out(back, x, t, labels), torch_out(unet, x, t, labels)) == 0.0


def test_other_group_counts_round_trip(tmp_path):
  """norm_num_groups is model.num_groups both ways; attn_norm_num_groups None (the exporter's)
  gives the middle block's attention the same groups, as ours has."""
  config = digits.get_config()
  config.model.num_groups = 8
  unet = random_unet(config, seed=7)
  src = save(unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())  # base: 32 groups
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert config.model.num_groups == 8
  x, t = inputs(config)
  assert rel_err(our_out(model, params, x, t), torch_out(unet, x, t)) <= 1e-5
  exporter.export_checkpoint(str(tmp_path / "W"), str(tmp_path / "out"))
  back = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "out")).eval()
  assert (back.config.norm_num_groups, back.config.attn_norm_num_groups) == (8, None)
  assert back.mid_block.attentions[0].group_norm.num_groups == 8
  assert rel_err(torch_out(back, x, t), torch_out(unet, x, t)) == 0.0


# Each side on its own network: the forward passes' float32 differences (about 1e-6 relative)
# are amplified by 1 / sqrt(abar_T) in an eps model's first x0 estimate, which is large where
# abar_T is near 0 (`benchmarks/diffusers_parity.py` prints the table).
END_TO_END = [("linear", "eps"), ("quad", "eps"), ("cosine", "v"), ("linear", "x0")]


@pytest.mark.parametrize("schedule,output", diffusers_reference.DDIM_CASES)
def test_ddim_update_matches_diffusers_ddim_scheduler(schedule, output):
  """10 DDIM steps from the same x_T: ours on the 'trailing' grid against DDIMScheduler with
  timestep_spacing='trailing', given each schedule as our exported scheduler config and driven
  by the same network outputs."""
  assert diffusers_reference.ddim_difference(schedule, output, shared_network=True) <= 1e-4


@pytest.mark.parametrize("schedule,output", END_TO_END)
def test_ddim_path_matches_diffusers_end_to_end(schedule, output):
  """The same, each side running its own network (ours imported from diffusers' weights) and
  diffusers its own scheduler, built from our exported config."""
  assert diffusers_reference.ddim_difference(schedule, output, shared_network=False) <= 1e-4


def test_trailing_grid_is_diffusers_trailing_spacing():
  tables = factories.tables_from_config(digits.get_config())
  for n in (1, 10, 50, 1000):
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(n)
    assert list(ddim.timesteps.numpy()) == list(sampling.make_grid("trailing", tables, n))


def test_export_loads_in_diffusers_and_reimports_bitwise(tmp_path, digits_workdir, digits_unet):
  out = str(tmp_path / "out")
  summary = exporter.export_checkpoint(digits_workdir, out)
  assert sorted(os.listdir(out)) == ["config.json", diffusers_io.SAFETENSORS,
                                     diffusers_io.SCHEDULER_CONFIG]
  back = diffusers.UNet2DModel.from_pretrained(out).eval()
  assert summary["params"] == sum(p.numel() for p in back.parameters())
  config, model, params = load_workdir(digits_workdir)
  x, t = inputs(config)
  assert rel_err(torch_out(back, x, t), our_out(model, params, x, t)) <= 1e-5
  assert rel_err(torch_out(back, x, t), torch_out(digits_unet, x, t)) == 0.0
  scheduler = diffusers.DDPMScheduler.from_pretrained(out)
  assert scheduler.config.variance_type == "fixed_large"
  np.testing.assert_allclose(scheduler.betas.numpy(),
                             np.asarray(factories.tables_from_config(config).betas), rtol=1e-6)
  # import(export(W)) restores W bitwise.
  importer.import_checkpoint(out, str(tmp_path / "W2"), digits.get_config())
  _, _, again = load_workdir(str(tmp_path / "W2"))
  assert jax.tree.structure(again) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))
  assert run_config.load(str(tmp_path / "W2")).to_dict() == run_config.load(
      digits_workdir).to_dict()


@pytest.mark.parametrize("schedule", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("output,var", [("eps", "fixed_large"), ("v", "fixed_small"),
                                        ("x0", "learned_range")])
def test_scheduler_config_round_trips_every_schedule(schedule, output, var):
  diff = {"schedule": schedule, "num_timesteps": 1000, "model_output": output, "model_var": var,
          "clip_x0": schedule != "quad", "zero_terminal_snr": schedule == "linear"}
  cfg = diffusers_scheduler.scheduler_config(diff)
  ours = schedules.make_tables(schedules.get_beta_schedule(schedule, 1000,
                                                            diff["zero_terminal_snr"]))
  theirs = diffusers.DDPMScheduler.from_config(cfg)
  # diffusers computes in float32 (torch), we in float64: the same process to float32 rounding.
  np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), np.asarray(ours.abar), rtol=1e-4,
                             atol=1e-7)
  back, _ = diffusers_scheduler.process_from_scheduler(cfg, 32)
  # A DDPMScheduler's model is a DDPM one, whatever the base config of the import says.
  assert back == {**{f"diffusion.{k}": v for k, v in diff.items()},
                  "diffusion.parameterization": "ddpm"}


def test_export_refuses_a_cloud_folder(tmp_path, digits_workdir):
  with pytest.raises(ValueError, match="writes a local folder"):
    exporter.export_checkpoint(digits_workdir, "gs://bucket/out")
  assert not os.path.exists("gs:")


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
  cases = {
      "diffusion.model_var": ("learned", "log-variance"),
      "model.resamp_with_conv": (False, "resamp_with_conv"),
      "training.objective": ("classifier", "noisy classifier"),
  }
  for key, (value, words) in cases.items():
    config = helpers.tiny_config("digits", **{key: value})
    with pytest.raises(diffusers_layout.LayoutError, match=words):
      exporter.diffusers_configs(config)
    workdir = tmp_path / key
    workdir.mkdir()
    (workdir / "config.json").write_text(run_config.config_to_json(config))
    with pytest.raises(diffusers_layout.LayoutError, match=words):
      exporter.export_checkpoint(str(workdir), str(tmp_path / f"out_{key}"))
    assert not (tmp_path / f"out_{key}").exists()


def _edit_weights(src: str, fn) -> None:
  path = os.path.join(src, diffusers_io.SAFETENSORS)
  state = st_numpy.load_file(path)
  fn(state)
  st_numpy.save_file(state, path, metadata={"format": "pt"})


def _edit_json(path: str, **updates) -> None:
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  data.update(updates)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def _drop_json_keys(path: str, *keys) -> None:
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  for key in keys:
    data.pop(key)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def _conditional_unet_folder(path: str) -> None:
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
      cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
  unet.save_pretrained(path)


BAD_INPUTS = {
    "other architecture": (lambda src: (shutil.rmtree(src), _conditional_unet_folder(src)),
                           r"UNet2DConditionModel, not a UNet2DModel"),
    "missing key": (lambda src: _edit_weights(
        src, lambda s: s.pop("mid_block.attentions.0.to_q.weight")),
                    r"missing mid_block\.attentions\.0\.to_q\.weight"),
    "extra key": (lambda src: _edit_weights(
        src, lambda s: s.update({"extra_head.weight": np.zeros((3, 3), np.float32)})),
                  r"unexpected extra_head\.weight \(3, 3\)"),
    "shape mismatch": (lambda src: _edit_weights(
        src, lambda s: s.update({"conv_in.weight": np.zeros((32, 3, 3, 3), np.float32)})),
                       r"conv_in\.weight: file \(32, 3, 3, 3\) .* vs model \(3, 3, 1, 32\)"),
    "unknown scheduler": (lambda src: _edit_json(
        os.path.join(src, diffusers_io.SCHEDULER_CONFIG), _class_name="LCMScheduler"),
                          r"scheduler 'LCMScheduler'.*DDPMScheduler"),
    "learned variance (diffusers' meaning)": (lambda src: _edit_json(
        os.path.join(src, diffusers_io.SCHEDULER_CONFIG), variance_type="learned"),
                                              r"variance_type='learned'.*log-variance"),
    "unknown betas": (lambda src: _edit_json(
        os.path.join(src, diffusers_io.SCHEDULER_CONFIG), beta_end=0.012),
                      r"equal none of ddpm_jax's schedules"),
    "another embedding": (lambda src: _edit_json(
        os.path.join(src, "config.json"), flip_sin_to_cos=True),
                          r"flip_sin_to_cos=True: needs False"),
    # No attention on the way down or up, so only the middle block's attention has heads.
    "several heads in the middle block": (lambda src: _edit_json(
        os.path.join(src, "config.json"), attention_head_dim=8,
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"]),
                                          r"attention_head_dim=8: attention heads of 8 channels "
                                          r"at 64 channels"),
    "absent attention_head_dim (diffusers builds 8-channel heads)": (
        lambda src: _drop_json_keys(os.path.join(src, "config.json"), "attention_head_dim"),
        r"attention_head_dim=8 \(absent: diffusers' default\).*\"attention_head_dim\": null"),
    "groups that do not divide the channels": (lambda src: _edit_json(
        os.path.join(src, "config.json"), norm_num_groups=48),
                                               r"norm_num_groups=48: needs a positive int that "
                                               r"divides every block_out_channels \[32, 64\]"),
    "other attention groups": (lambda src: _edit_json(
        os.path.join(src, "config.json"), attn_norm_num_groups=16),
                               r"attn_norm_num_groups=16: needs None or 32"),
    "unknown field": (lambda src: _edit_json(
        os.path.join(src, "config.json"), resnet_skip_time_act=True),
                      r"resnet_skip_time_act=True: a field ddpm_jax does not know"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, digits_unet, case):
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  spoil, message = BAD_INPUTS[case]
  spoil(src)
  with pytest.raises(ValueError, match=message):
    importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert not (tmp_path / "W").exists() and not (tmp_path / "W.partial").exists()


def test_bin_without_torch_fails_clearly(tmp_path, digits_unet, monkeypatch):
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "legacy_bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(RuntimeError, match=r"torch\.load\(weights_only=True\).*not installed"):
    importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert not (tmp_path / "W").exists() and not (tmp_path / "W.partial").exists()


def test_refuses_a_workdir_that_holds_something(tmp_path, digits_unet):
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  (tmp_path / "W").mkdir()
  (tmp_path / "W" / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not empty"):
    importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert os.listdir(tmp_path / "W") == ["config.json"]


def test_hub_repository_is_downloaded_only_when_named(tmp_path, digits_unet, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  local = save(digits_unet, linear_scheduler(), str(tmp_path / "snapshot"), "flat")
  calls = []

  def fake_download(repo_id, allow_patterns=None, cache_dir=None):
    calls.append((repo_id, tuple(allow_patterns)))
    return local

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  monkeypatch.setattr(huggingface_hub, "list_repo_files",
                      lambda repo: ["config.json", diffusers_io.SAFETENSORS, diffusers_io.BIN])
  importer.import_checkpoint(local, str(tmp_path / "W1"), digits.get_config())
  assert not calls  # a local folder never touches the Hub
  monkeypatch.chdir(tmp_path)  # "google/ddpm-x" is no local path here
  importer.import_checkpoint("google/ddpm-x", str(tmp_path / "W2"), digits.get_config())
  # The configs first (checked before any weights move), then the safetensors file only.
  assert calls == [("google/ddpm-x", ("*.json",)),
                   ("google/ddpm-x", (f"*{diffusers_io.SAFETENSORS}",))]
  importer.import_checkpoint("hf://google/ddpm-y", str(tmp_path / "W3"), digits.get_config())
  assert calls[-1][0] == "google/ddpm-y"
  assert json.loads((tmp_path / "W2" / "imported.json").read_text())["source"] == "google/ddpm-x"
  # A mistyped path under an existing folder, or a TF1 prefix, is never taken for a repository.
  (tmp_path / "runs").mkdir()
  assert not diffusers_io.is_hub_id("runs/typo")
  assert not diffusers_io.is_hub_id("ckpts/model.ckpt-790000")
  n = len(calls)
  with pytest.raises(FileNotFoundError, match="runs/typo is not a folder"):
    importer.import_checkpoint("runs/typo", str(tmp_path / "W4"), digits.get_config())
  assert len(calls) == n
  # A repository whose config does not fit is refused before its weights are downloaded.
  _edit_json(os.path.join(local, "config.json"), flip_sin_to_cos=True)
  with pytest.raises(ValueError, match="flip_sin_to_cos"):
    importer.import_checkpoint("google/ddpm-z", str(tmp_path / "W5"), digits.get_config())
  assert calls[n:] == [("google/ddpm-z", ("*.json",))]


def test_hub_download_failure_names_both_readings(monkeypatch, tmp_path):
  huggingface_hub = pytest.importorskip("huggingface_hub")

  def offline(*args, **kwargs):
    raise OSError("offline")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no local path, and downloading the Hub "
                                              r"repository org/model failed \(OSError: offline\)"):
    importer.import_checkpoint("org/model", str(tmp_path / "W"), digits.get_config())
  assert not (tmp_path / "W").exists()


def test_defaults_are_diffusers_defaults():
  """A field config.json omits is read as diffusers reads it: UNet2DModel's own default."""
  import inspect  # pylint: disable=g-import-not-at-top
  signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
  theirs = {k: p.default for k, p in signature.items() if k != "self"}
  assert diffusers_layout.DIFFUSERS_DEFAULTS == theirs


# The fields of the published google/ddpm-* configs (written by diffusers 0.0.4, e.g.
# google/ddpm-cat-256); every other field takes diffusers' default.
PUBLISHED_FIELDS = ("_class_name", "_diffusers_version", "act_fn", "attention_head_dim",
                    "block_out_channels", "center_input_sample", "down_block_types",
                    "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels",
                    "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups",
                    "out_channels", "sample_size", "time_embedding_type", "up_block_types")
# Their scheduler config (diffusers 0.1.1).
PUBLISHED_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1",
                       "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                       "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                       "variance_type": "fixed_small"}


def test_published_config_style_imports_as_diffusers_reads_it(tmp_path, digits_unet):
  """A folder laid out as the published google/ddpm-* ones (old config fields, legacy attention
  names in a .bin): imported, it gives what diffusers' own from_pretrained of it gives."""
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "legacy_bin")
  path = os.path.join(src, "config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({k: cfg[k] for k in PUBLISHED_FIELDS if k in cfg} | {"_diffusers_version": "0.0.4"},
              f)
  with open(os.path.join(src, diffusers_io.SCHEDULER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(PUBLISHED_SCHEDULER, f)
  record = importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert record["fields_from_model"]["diffusion.model_var"] == "fixed_small"
  theirs = diffusers.UNet2DModel.from_pretrained(src).eval()
  config, model, params = load_workdir(str(tmp_path / "W"))
  x, t = inputs(config)
  assert rel_err(our_out(model, params, x, t), torch_out(theirs, x, t)) <= 1e-5


@pytest.mark.parametrize("name,extra,variance", [
    ("DDIMScheduler", {"set_alpha_to_one": True}, "fixed_large"),  # DDPM's setting at 32 px
    ("PNDMScheduler", {"skip_prk_steps": True}, "fixed_large"),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, "fixed_small"),
])
def test_other_scheduler_configs(name, extra, variance):
  cfg = {"_class_name": name, "num_train_timesteps": 1000, "beta_schedule": "linear",
         "beta_start": 1e-4, "beta_end": 0.02, **extra}
  process, notes = diffusers_scheduler.process_from_scheduler(cfg, 32)
  assert process["diffusion.model_var"] == variance
  assert process["diffusion.schedule"] == "linear"
  assert any("published" in n for n in notes) == (name != "DDPMScheduler")


def test_float32_betas_match_our_schedule():
  """trained_betas written from a float32 tensor are still our schedule."""
  betas = schedules.SCHEDULES["cosine"](1000).astype(np.float32).tolist()
  process, _ = diffusers_scheduler.process_from_scheduler(
      {"_class_name": "DDPMScheduler", "trained_betas": betas}, 32)
  assert process["diffusion.schedule"] == "cosine"


def test_workdir_config_restores_tuples_and_names_a_missing_record(tmp_path, digits_workdir):
  config = workdir_config.get_config(digits_workdir)
  assert config.model.ch_mult == (1, 2) and config.eval.metrics == ("digits_score", "bpd")
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    workdir_config.get_config(str(tmp_path))


@pytest.mark.slow
def test_command_line_import_then_sample(tmp_path, digits_unet):
  """docs/published_models.md's commands: import a folder, then --mode=sample on its config."""
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  workdir = str(tmp_path / "W")
  # The two programs in-process (helpers.run_main): their flags and `main`, no start-up.
  configs = os.path.join(helpers.REPO_ROOT, "configs")
  out = helpers.run_main([f"--src={src}", f"--workdir={workdir}", f"--config={configs}/digits.py"],
                         module="ddpm_jax.import_checkpoint")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Imported 701,345 parameters" in out.stdout
  sampled = helpers.run_main([f"--config={configs}/workdir.py:{workdir}", f"--workdir={workdir}",
                              "--mode=sample", "--config.sampling.num_samples=8",
                              "--config.sampling.batch_size=8", "--config.sampling.num_steps=4",
                              "--config.sampling.trajectory_every=0"])
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  with np.load(os.path.join(workdir, "samples", "dpm_solver_pp_sde_4_step0.npz")) as f:
    assert f["samples"].shape == (8, 8, 8, 1) and f["samples"].dtype == np.uint8


TF1_FIXTURE = os.path.join(helpers.REPO_ROOT, "tests", "fixtures", "tf1_tiny")


@pytest.mark.parametrize("ema", [True, False])
def test_tf1_checkpoint_imports_the_weights_asked_for(tmp_path, ema):
  """The TF1 fixture (written by TensorFlow, with its own forward pass of the raw and the EMA
  variables in reference.npz) through the importer: the workdir's model is TF's."""
  base = digits.get_config()
  with base.unlocked():
    base.data.update(image_size=8, num_channels=3)
  record = importer.import_checkpoint(TF1_FIXTURE, str(tmp_path / "W"), base, ema=ema)
  assert (record["kind"], record["weights"], record["step"]) == ("tf1", "ema" if ema else "raw",
                                                                1000)
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert (config.diffusion.model_var, config.model.ch, tuple(config.model.ch_mult)) == (
      "fixed_large", 32, (1, 1))
  with np.load(os.path.join(TF1_FIXTURE, "reference.npz")) as ref:
    x, t, want, other = ref["x"], ref["t"], ref[f"out_{'ema' if ema else 'raw'}"], ref[
        f"out_{'raw' if ema else 'ema'}"]
  got = our_out(model, params, x, t)
  assert rel_err(got, want) <= 1e-5
  assert rel_err(got, other) > 1e-2  # the other set of weights is really another model


def test_notes_of_the_config_and_the_scheduler_are_both_kept(tmp_path, digits_unet):
  """A config.json without sample_size (taken from --config) and a scheduler with a sampling-only
  field: the record keeps the note of each."""
  src = save(digits_unet, linear_scheduler(), str(tmp_path / "src"), "flat")
  _drop_json_keys(os.path.join(src, "config.json"), "sample_size")
  record = importer.import_checkpoint(src, str(tmp_path / "W"), digits.get_config())
  assert record["fields_from_model"]["data.image_size"] == 8
  assert any("no sample_size" in n for n in record["notes"]), record["notes"]
  assert any("timestep_spacing" in n for n in record["notes"]), record["notes"]
