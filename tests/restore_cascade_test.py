"""End-to-end `--mode=restore`, the super-resolution stage and `--mode=cascade` on tiny models.

Three tiny digits runs are trained once per module: an unconditional 8x8 model (restored with),
a 4x4 base and an 8x8 super-resolution stage (sr_factor 2). The in-process runs use this test
process's 4 simulated devices; the same commands on 1 device (a child process) must give the same
images. Bad input fails with a clear error before anything compiles.
"""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import degradations
from ddpm_jax.evaluation import drivers
from ddpm_jax.training import train

import helpers

STEPS = 4
N = 6  # not a multiple of 4: the driver pads the batch over the devices
COMMON = {"training.num_train_steps": STEPS, "training.checkpoint_every": STEPS,
          "sampling.sampler": "ddim", "sampling.num_steps": 4, "sampling.batch_size": 8,
          "sampling.num_samples": N, "restore.num_images": N}
BASE4 = {**COMMON, "data.image_size": 4}
# A few large steps, so that the stage's output reads its low-resolution input at uint8 precision
# (4 small warmup steps leave the near-zero output conv deaf to it).
SR = {**COMMON, "model.sr_factor": 2, "training.cond_aug_max": 0.2, "sampling.cond_aug": 0.05,
      "optim.warmup_steps": 0, "optim.lr": 2e-2}


def _config(**overrides):
  return helpers.tiny_config("digits", **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("restore_runs")
  out = {}
  for name, overrides in (("plain", COMMON), ("base4", BASE4), ("sr", SR)):
    workdir = str(root / name)
    report = train.train_and_evaluate(_config(**overrides), workdir)
    assert report["step"] == STEPS
    out[name] = workdir
  truth = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 1), dtype=np.uint8)
  np.savez(root / "truth.npz", images=truth)
  out["truth"] = str(root / "truth.npz")
  return out


def _restore(runs, task, method="ddnm", sigma_y=0.0, **extra):
  config = _config(**COMMON, **{"restore.task": task, "restore.method": method,
                                "restore.sigma_y": sigma_y, "restore.input": runs["truth"]},
                   **extra)
  report = drivers.restore(config, runs["plain"])
  name = f"{task}_{method}_sy{sigma_y:g}_ddim_4_step{STEPS}"
  folder = os.path.join(runs["plain"], "restorations")
  assert report["npz"] == os.path.join(folder, name + ".npz")
  return config, report, np.load(report["npz"]), folder, name


@pytest.mark.parametrize("task", ["sr2", "blur_gauss", "inpaint", "denoise"])
def test_noiseless_ddnm_restore_writes_outputs_that_meet_the_measurement(runs, task):
  config, report, out, folder, name = _restore(runs, task)
  assert os.path.exists(os.path.join(folder, name + ".png"))
  with open(os.path.join(folder, name + ".json")) as f:
    assert json.load(f)["psnr"] == pytest.approx(report["psnr"])
  assert out["output"].shape == out["truth"].shape == (N, 8, 8, 1)
  assert out["output"].dtype == np.uint8
  # An untrained network: only the solver's range-space correction makes A x^ = y.
  op = drivers.restore_operator(config)
  y = out["measurement"]
  resid = np.linalg.norm((np.asarray(op.A(out["output_float"])) - y).reshape(N, -1), axis=1)
  assert resid.max() <= 1e-5 * np.linalg.norm(y.reshape(N, -1), axis=1).max(), resid
  assert set(report) >= {"psnr", "ssim", "consistency", "psnr_per_image"}
  assert len(report["ssim_per_image"]) == N


def test_restore_from_a_measurement_input(runs, tmp_path):
  """input_kind=measurement: y is read as given (here sr2's noisy 4x4 measurement, which leaves
  [-1, 1]), and restored as from the truth."""
  _, _, out, _, _ = _restore(runs, "sr2", sigma_y=0.5)
  assert np.abs(out["measurement"]).max() > 1.0
  np.savez(tmp_path / "y.npz", images=out["measurement"])
  config = _config(**COMMON, **{"restore.task": "sr2", "restore.input": str(tmp_path / "y.npz"),
                                "restore.input_kind": "measurement", "restore.sigma_y": 0.5})
  report = drivers.restore(config, runs["plain"])
  assert "psnr" not in report and "consistency" in report
  again = np.load(os.path.join(runs["plain"], "restorations",
                               f"sr2_ddnm_sy0.5_ddim_4_step{STEPS}.npz"))
  assert "truth" not in again
  np.testing.assert_allclose(again["output_float"], out["output_float"], atol=1e-6)


@pytest.mark.slow
def test_restore_and_super_resolution_agree_on_1_and_4_devices(runs, tmp_path):
  _, _, four, _, name = _restore(runs, "sr2", "pigdm", 0.05)
  env = helpers.subprocess_env(1)
  workdir = str(tmp_path / "copy")
  subprocess.run(["cp", "-r", runs["plain"], workdir], check=True)
  overrides = {**COMMON, "restore.task": "sr2", "restore.method": "pigdm",
               "restore.sigma_y": 0.05, "restore.input": runs["truth"]}
  proc = subprocess.run(helpers.main_command(workdir, "--mode=restore", **overrides), env=env,
                        cwd=helpers.REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = np.load(os.path.join(workdir, "restorations", name + ".npz"))
  np.testing.assert_array_equal(one["measurement"], four["measurement"])
  np.testing.assert_allclose(one["output_float"], four["output_float"], atol=1e-5)
  # The super-resolution stage on a low-resolution input, 4 devices here and 1 there.
  low = np.random.default_rng(1).uniform(-1, 1, (N, 4, 4, 1)).astype(np.float32)
  np.savez(tmp_path / "low.npz", images=low)
  flags = {**SR, "sampling.low_res_input": str(tmp_path / "low.npz")}
  path4 = drivers.sample(_config(**flags), runs["sr"])
  sr_copy = str(tmp_path / "sr_copy")
  subprocess.run(["cp", "-r", runs["sr"], sr_copy], check=True)
  proc = subprocess.run(helpers.main_command(sr_copy, "--mode=sample", **flags), env=env,
                        cwd=helpers.REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path1 = os.path.join(sr_copy, "samples", os.path.basename(path4))
  a, b = np.load(path4)["samples"], np.load(path1)["samples"]
  assert a.shape == (N, 8, 8, 1)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 rounding of equal floats


def test_super_resolution_sampling_is_deterministic_in_its_input(runs, tmp_path):
  low = np.random.default_rng(2).uniform(-1, 1, (N, 4, 4, 1)).astype(np.float32)
  np.savez(tmp_path / "low.npz", images=low)
  config = _config(**SR, **{"sampling.low_res_input": str(tmp_path / "low.npz")})
  first = np.load(drivers.sample(config, runs["sr"]))["samples"].copy()
  np.testing.assert_array_equal(first, np.load(drivers.sample(config, runs["sr"]))["samples"])


def _sr_unet():
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  return models.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                     resamp_with_conv=True, out_channels=1, num_groups=4, cond_channels=1)


def test_super_resolution_unet_reads_its_condition_and_level():
  net = _sr_unet()
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.array([3, 7])
  params = net.init(jax.random.key(0), x, t, train=False)["params"]
  # The output conv starts near zero; give it weight so the output shows what the net read.
  params = jax.tree.map(lambda p: p, params)  # a mutable copy
  params["conv_out"]["kernel"] = jax.random.normal(jax.random.key(1),
                                                   params["conv_out"]["kernel"].shape)
  cond = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  apply = lambda c, lv: net.apply({"params": params}, x, t, train=False, cond=c, cond_level=lv)
  base = apply(cond, 0.1)
  assert params["conv_in"]["kernel"].shape[2] == 2  # x_t and the condition
  assert float(jnp.abs(apply(-cond, 0.1) - base).max()) > 1e-3
  np.testing.assert_array_equal(apply(cond, 0.1), base)  # deterministic: any change is read
  assert float(jnp.abs(apply(cond, 0.2) - base).max()) > 1e-5
  with pytest.raises(ValueError, match="needs its low-resolution input"):
    net.apply({"params": params}, x, t, train=False)


def test_training_condition_is_the_pooled_image_plus_bounded_noise():
  from ddpm_jax.training import train_step  # pylint: disable=g-import-not-at-top
  x0 = jax.random.uniform(jax.random.key(0), (512, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.key(1), 512)
  pooled = degradations.super_resolution(2).A(x0)
  clean = train_step.sr_condition(x0, keys, 2, 0.0)
  np.testing.assert_allclose(clean["cond"], degradations.upsample_bilinear(pooled, 2), atol=1e-6)
  np.testing.assert_array_equal(clean["cond_level"], 0.0)
  aug = train_step.sr_condition(x0, keys, 2, 0.3)
  level = np.asarray(aug["cond_level"])
  assert level.min() >= 0 and level.max() <= 0.3 and abs(level.mean() - 0.15) < 0.02
  # Bilinear upsampling is linear: cond - upsample(pooled) = upsample(level n), n ~ N(0, I), so
  # each example's difference has a std proportional to its level.
  diff = np.asarray(aug["cond"] - clean["cond"]).reshape(512, -1)
  assert np.corrcoef(level, diff.std(axis=1))[0, 1] > 0.8  # 16 noise values per example
  ratio = diff.std(axis=1) / np.maximum(level, 1e-6)
  keep = level > 0.05
  assert 0.3 < np.median(ratio[keep]) < 1.0  # bilinear smoothing shrinks unit noise


def test_cascade_upsamples_the_base_runs_samples(runs, tmp_path):
  config = _config(**SR, **{"cascade.base_workdir": runs["base4"]})
  path = drivers.cascade(config, runs["sr"])
  out = {k: v.copy() for k, v in np.load(path).items()}
  assert out["base"].shape == (N, 4, 4, 1) and out["samples"].shape == (N, 8, 8, 1)
  assert os.path.exists(path[:-len(".npz")] + ".png")
  # The base samples are those --mode=sample of the base run draws with the same seed, and the
  # upsampled ones those --mode=sample of the stage draws from them, seed for seed.
  base_path = drivers.sample(_config(**BASE4), runs["base4"])
  np.testing.assert_array_equal(np.load(base_path)["samples"], out["base"])
  np.savez(tmp_path / "base.npz", images=out["base"])
  stage_path = drivers.sample(_config(**SR, **{"sampling.low_res_input":
                                                  str(tmp_path / "base.npz")}), runs["sr"])
  np.testing.assert_array_equal(np.load(stage_path)["samples"], out["samples"])
  # ... and the stage reads that input: the negated base gives other samples.
  np.savez(tmp_path / "negated.npz", images=255 - out["base"])
  negated = drivers.sample(_config(**SR, **{"sampling.low_res_input":
                                               str(tmp_path / "negated.npz")}), runs["sr"])
  assert np.mean(np.load(negated)["samples"] != out["samples"]) > 0.05


def _no_compiling(*args, **kwargs):
  raise AssertionError("compiled before the config was checked")


_WRONG_SIZE = "<an .npz of 8x8 images>"  # sr2's measurements and the SR stage's input are 4x4

# case -> (driver, the run it reads, its flags, what the message says). The restore rows on the
# plain run start from COMMON with runs["truth"] as restore.input; "<name>" stands for runs[name].
_BAD_INPUTS = {
    "restore: sr4 of 6x6": ("restore", "plain", {"data.image_size": 6, "restore.task": "sr4"},
                            "divisible by 4"),
    "restore: colourise grey": ("restore", "plain", {"restore.task": "colourise"}, "one channel"),
    "restore: negative sigma_y": ("restore", "plain", {"restore.sigma_y": -0.1}, ">= 0"),
    "restore: unknown method": ("restore", "plain", {"restore.method": "dps"}, "valid choices"),
    "restore: unknown task": ("restore", "plain", {"restore.task": "blur_box"}, "valid choices"),
    "restore: unknown mask": ("restore", "plain", {"restore.task": "inpaint",
                                                   "restore.mask": "diagonal"}, "one of"),
    "restore: unknown input_kind": ("restore", "plain", {"restore.input_kind": "noisy"},
                                    "valid choices"),
    "restore: no input": ("restore", "plain", {"restore.input": ""},
                          "needs --config.restore.input"),
    "restore: measurement of the wrong size": (
        "restore", "plain", {"restore.input": _WRONG_SIZE, "restore.input_kind": "measurement"},
        r"\(4, 4, 1\) are needed"),
    "restore: an SR stage": ("restore", "sr", {**SR, "restore.input": "<truth>"},
                             "takes an unconditional"),
    "sample SR: no low-res input": ("sample", "sr", SR, "needs its low-resolution input"),
    "sample SR: low-res input of the wrong size": (
        "sample", "sr", {**SR, "sampling.low_res_input": _WRONG_SIZE}, r"\(4, 4, 1\) are needed"),
    "sample SR: factor 3 of 8": ("sample", "sr", {**SR, "model.sr_factor": 3},
                                 "divides data.image_size"),
    "cascade: no base": ("cascade", "sr", SR, "needs --config.cascade.base_workdir"),
    "cascade: not an SR stage": ("cascade", "plain", {**COMMON, "cascade.base_workdir": "<base4>"},
                                 "super-resolution stage"),
    # A base whose images are not the stage's input size (the 8x8 plain run, not the 4x4 base).
    "cascade: base of the wrong size": ("cascade", "sr", {**SR, "cascade.base_workdir": "<plain>"},
                                        "takes 4x4x1"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_restore_and_super_resolution_input_fails_before_compiling(runs, monkeypatch,
                                                                       tmp_path, case):
  driver, run, flags, match = _BAD_INPUTS[case]
  monkeypatch.setattr(jax, "jit", _no_compiling)
  wrong_size = str(tmp_path / "wrong_size.npz")
  np.savez(wrong_size, images=np.zeros((2, 8, 8, 1), np.uint8))
  names = {_WRONG_SIZE: wrong_size, **{f"<{name}>": path for name, path in runs.items()}}
  if driver == "restore" and run == "plain":
    flags = {**COMMON, "restore.input": runs["truth"], **flags}
  flags = {k: names.get(v, v) if isinstance(v, str) else v for k, v in flags.items()}
  with pytest.raises(ValueError, match=match):
    getattr(drivers, driver)(_config(**flags), runs[run])


def test_upsample_bilinear_is_exact_on_ramps_away_from_the_edges():
  """Half-pixel centres: output pixel p sits at input coordinate (p + 0.5) / f - 0.5, where
  bilinear interpolation of a linear ramp is exact (edges are clamped, so only the interior)."""
  i, j = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
  y = (0.3 * i - 0.2 * j + 0.1)[None, :, :, None].astype(np.float32)
  up = np.asarray(degradations.upsample_bilinear(y, 2))[0, :, :, 0]
  p = (np.arange(8) + 0.5) / 2 - 0.5
  want = 0.3 * p[:, None] - 0.2 * p[None, :] + 0.1
  np.testing.assert_allclose(up[1:7, 1:7], want[1:7, 1:7], atol=1e-6)
  np.testing.assert_allclose(degradations.upsample_bilinear(np.full((1, 4, 4, 2), 0.3), 2), 0.3,
                             atol=1e-6)
