"""End-to-end tests of `--mode=sample` and `--mode=eval` (ddpm_jax.evaluation.drivers and
fid_eval).

A tiny digits model is trained once per module (`trained`) and every test samples from it or
evaluates it. FID runs without the real Inception network: the tests swap in a fixed random
projection of the pixels, which exercises the driver (reference statistics over a whole split,
their cache, grey-to-RGB and uint8 inputs) without a 24M-parameter compile.
"""

import json
import os
import subprocess

from absl import flags
import numpy as np
from PIL import Image
import pytest

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import drivers
from ddpm_jax.evaluation import fid_eval
from ddpm_jax.evaluation import images
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train

from helpers import REPO_ROOT
from helpers import FakeInception
from helpers import main_command
from helpers import subprocess_env
from helpers import tiny_config

# Every setting the tests depend on, spelt out here (and passed on the command line as well).
OVERRIDES = {
    "model.ch": 32,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.dropout": 0.0,
    "diffusion.num_timesteps": 20,
    "training.num_train_steps": 4,
    "training.batch_size": 8,
    "training.checkpoint_every": 2,
    "training.log_every": 2,
    "training.sample_every": 4,
    "training.grid_sampler_steps": 2,
    "training.num_grid_samples": 4,
    "training.final_eval_metrics": (),
    "sampling.sampler": "ddim",
    "sampling.num_samples": 12,
    "sampling.batch_size": 8,  # the last of the 2 batches holds 4 samples
    "sampling.num_steps": 3,
    "sampling.trajectory_every": 1,
    "eval.batch_size": 40,
    "eval.bpd_num_examples": 80,
}
NUM_SAMPLES = 12
STEP = 4
TEST_SPLIT_SIZE = 360  # the last 360 of sklearn's 1,797 digits
# 360 = 7 * 48 + 24: the eval pass must pad (and mask) its last batch.
UNEVEN_EVAL_BATCH = 48
FEATURE_DIM = 8  # below NUM_SAMPLES - 1, so the samples' covariance is not singular


def _config(**overrides):
  return tiny_config(**{**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The workdir of the tiny model, trained for 4 steps (checkpoints at steps 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  report = train.train_and_evaluate(_config(), workdir)
  assert report["step"] == STEP
  return workdir


@pytest.fixture(scope="module")
def ddim_samples(trained):
  """(path, samples) of `drivers.sample` with the default (DDIM) sampler."""
  path = drivers.sample(_config(), trained)
  with np.load(path) as data:
    return path, data["samples"]


def _load_npz(path) -> dict:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _check_sample_outputs(workdir, path, name, num_samples):
  assert path == os.path.join(workdir, "samples", f"{name}_step{STEP}.npz")
  data = _load_npz(path)
  assert list(data) == ["samples"]
  samples = data["samples"]
  assert samples.dtype == np.uint8
  assert samples.shape == (num_samples, 8, 8, 1)
  # One noise draw per sample: no two samples (in or across batches) are the same image.
  assert len({s.tobytes() for s in samples}) == num_samples
  # The PNG is the grid of exactly these samples, each pixel upscaled 16x (128 // 8).
  with Image.open(path.replace(".npz", ".png")) as png:
    png = np.asarray(png)
  grid = images.make_grid(samples)[..., 0]
  assert png.shape == (grid.shape[0] * 16, grid.shape[1] * 16)
  np.testing.assert_array_equal(png[::16, ::16], grid)
  with Image.open(path.replace(".npz", "_trajectory.png")) as trajectory:
    assert np.asarray(trajectory).std() > 0  # a drawn figure, not a blank canvas


def test_ddim_sample_writes_uint8_npz_grid_and_trajectory(trained, ddim_samples):
  path, _ = ddim_samples
  _check_sample_outputs(trained, path, "ddim_3", NUM_SAMPLES)


@pytest.mark.parametrize("sampler, name", [("ancestral", "ancestral_20"),
                                           ("dpm_solver_pp", "dpm_solver_pp_3")])
def test_other_samplers_write_the_same_outputs(trained, sampler, name):
  # One batch of 4 compiles once; the 2-batch path is covered by the DDIM test.
  config = _config(**{"sampling.sampler": sampler, "sampling.num_samples": 4})
  path = drivers.sample(config, trained)
  _check_sample_outputs(trained, path, name, 4)


def test_same_seed_gives_identical_samples(trained, ddim_samples):
  _, first = ddim_samples
  path = drivers.sample(_config(), trained)
  np.testing.assert_array_equal(_load_npz(path)["samples"], first)


def test_raw_params_sample_differently_from_ema(trained, ddim_samples):
  _, ema = ddim_samples
  path = drivers.sample(_config(**{"sampling.use_ema": False}), trained)
  raw = _load_npz(path)["samples"]
  assert raw.shape == ema.shape
  assert np.any(raw != ema)


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
  """Keeps the digits classifier that digits_score trains out of ~/.cache."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DDPM_JAX_CACHE", str(tmp_path_factory.mktemp("classifier_cache")))
    yield


@pytest.fixture(scope="module")
def eval_run(trained, classifier_cache):
  """(returned report, eval/step_4.json as written) of `--mode=eval` with bpd and digits_score."""
  del classifier_cache
  config = _config(**{"eval.metrics": ("bpd", "digits_score")})
  report = drivers.evaluate(config, trained)
  # Read now: later evaluations of the same step overwrite the file.
  with open(os.path.join(trained, "eval", f"step_{STEP}.json"), encoding="utf-8") as f:
    return report, json.load(f)


@pytest.fixture(scope="module")
def eval_report(eval_run):
  return eval_run[0]


def test_eval_bpd_components_sum_to_the_total(eval_report):
  parts = [eval_report[f"bpd_{k}"] for k in ("prior", "terms", "decoder")]
  total = eval_report["bpd_total"]
  for value in (*parts, total):
    assert isinstance(value, float)
    assert np.isfinite(value) and value > 0
  assert total == pytest.approx(sum(parts), rel=1e-6)
  # The first 2 batches of 40 reach the limit of 80 examples.
  assert eval_report["bpd_num_examples"] == 80


def test_eval_digits_score_covers_every_sample(eval_report):
  assert eval_report["step"] == STEP
  assert eval_report["num_samples"] == NUM_SAMPLES
  assert eval_report["sampler"] == "ddim_3"
  histogram = eval_report["digits_class_histogram"]
  assert len(histogram) == 10
  assert sum(histogram) == NUM_SAMPLES
  for key in ("frechet_distance", "frechet_distance_floor", "frechet_distance_train_real",
              "inception_score", "mean_confidence", "classifier_test_accuracy"):
    assert np.isfinite(eval_report[f"digits_{key}"]), key
  assert 1.0 <= eval_report["digits_inception_score"] <= 10.0
  # Samples and floor are both scored at min(num_samples, 180) images, against the same reference.
  assert eval_report["digits_fd_num_images"] == min(NUM_SAMPLES, TEST_SPLIT_SIZE // 2)
  assert 0 < eval_report["digits_frechet_distance_floor"] < eval_report["digits_frechet_distance"]


def test_eval_report_is_written_as_json(eval_run):
  eval_report, written = eval_run
  assert written.keys() == eval_report.keys()
  for key, value in eval_report.items():
    # Numbers must stay numbers (json's default=str would quietly turn a NumPy scalar into text).
    assert type(written[key]) is type(value), key  # pylint: disable=unidiomatic-typecheck
    if isinstance(value, float):
      assert written[key] == pytest.approx(value, rel=1e-12), key
    else:
      assert written[key] == value, key


def test_bpd_over_the_whole_split_drops_no_example(trained):
  config = _config(**{"eval.metrics": ("bpd",), "eval.bpd_num_examples": 0,
                      "eval.batch_size": UNEVEN_EVAL_BATCH})
  report = drivers.evaluate(config, trained)
  assert report["bpd_num_examples"] == TEST_SPLIT_SIZE
  assert len(input_pipeline.load_digits_arrays("test")[0]) == TEST_SPLIT_SIZE
  parts = sum(report[f"bpd_{k}"] for k in ("prior", "terms", "decoder"))
  assert report["bpd_total"] == pytest.approx(parts, rel=1e-6)
  assert np.isfinite(report["bpd_total"]) and report["bpd_total"] > 0


@pytest.mark.parametrize("weights", ["", "missing_inception.npz"])
def test_fid_without_inception_weights_fails_before_loading_anything(tmp_path, monkeypatch,
                                                                    weights):
  def fail(*args, **kwargs):
    raise AssertionError("the model was built before the weights check")

  monkeypatch.setattr(train_state_lib, "create_train_state", fail)
  monkeypatch.setattr(train_state_lib, "abstract_params", fail)  # what drivers.load builds
  config = _config(**{"eval.metrics": ("fid",),
                      "eval.inception_weights": str(tmp_path / weights) if weights else ""})
  # An empty workdir: loading params first would fail with "No checkpoint" instead.
  workdir = tmp_path / "empty"
  with pytest.raises(FileNotFoundError, match="convert_inception_weights"):
    drivers.evaluate(config, str(workdir))
  assert not os.path.exists(workdir)


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
  """(config, fake feature fn): FID against the test split, with Inception swapped out."""
  weights = tmp_path / "inception_fid.npz"
  np.savez(weights, dummy=np.zeros(1))
  feature_fn = FakeInception(FEATURE_DIM)
  dummy_variables = {"params": {}}

  def load(path):
    assert path == str(weights)
    return dummy_variables

  def make_fn(variables):
    assert variables is dummy_variables
    return feature_fn

  monkeypatch.setattr(inception, "load_inception_params", load)
  monkeypatch.setattr(inception, "make_inception_fn", make_fn)
  config = _config(**{"eval.metrics": ("fid",), "eval.fid_split": "test",
                      "eval.inception_weights": str(weights),
                      "eval.fid_stats_dir": str(tmp_path / "fid_stats"),
                      "eval.batch_size": UNEVEN_EVAL_BATCH})
  return config, feature_fn


def test_fid_reference_stats_cover_the_split_and_are_cached(tmp_path, fake_inception):
  config, feature_fn = fake_inception
  real = input_pipeline.load_digits_arrays("test")[0]
  result = fid_eval.fid_and_is(config, str(tmp_path), real)
  # 8 reference batches of 48 (the last one padded), then 2 sample batches of 200.
  assert feature_fn.calls == 8 + 2
  assert result["fid_reference_examples"] == TEST_SPLIT_SIZE
  assert result["fid_num_samples"] == TEST_SPLIT_SIZE
  assert result["fid_reference_split"] == "test"

  key = fid_eval.stats_cache_key(config)
  assert key.startswith("digits_test_8_cropnone_")  # dataset, split, size, crop, weights hash
  cached = fid.FeatureStats.load(tmp_path / "fid_stats" / f"{key}.npz")
  assert cached.n == TEST_SPLIT_SIZE
  expected = fid.FeatureStats.from_features(feature_fn(np.repeat(real, 3, axis=-1))["pool3"])
  np.testing.assert_allclose(cached.mu, expected.mu, rtol=1e-10)
  np.testing.assert_allclose(cached.sigma, expected.sigma, rtol=1e-8, atol=1e-12)

  # The same split against itself: FID is zero up to round-off.
  scale = np.trace(cached.sigma)
  assert abs(result["fid"]) < 1e-6 * scale
  assert 1.0 <= result["inception_score"] <= 10.0

  # Later evaluations embed only the samples.
  calls = feature_fn.calls
  noise = np.random.default_rng(1).integers(0, 256, real.shape, dtype=np.uint8)
  noisy = fid_eval.fid_and_is(config, str(tmp_path), noise)
  assert feature_fn.calls == calls + 2
  assert noisy["fid_reference_examples"] == TEST_SPLIT_SIZE
  assert noisy["fid"] > 0.1 * scale


def test_eval_fid_embeds_rgb_samples_against_the_whole_split(trained, fake_inception):
  config, feature_fn = fake_inception
  report = drivers.evaluate(config, trained)
  assert report["fid_reference_examples"] == TEST_SPLIT_SIZE
  assert report["fid_num_samples"] == NUM_SAMPLES
  assert np.isfinite(report["fid"]) and report["fid"] > 0
  assert np.isfinite(report["inception_score"])
  # 8 reference batches, then the 12 samples in one padded batch.
  assert feature_fn.calls == 8 + 1
  assert os.path.exists(os.path.join(config.eval.fid_stats_dir,
                                     f"{fid_eval.stats_cache_key(config)}.npz"))


def test_cli_sample_mode_writes_the_same_samples(trained, ddim_samples):
  path, expected = ddim_samples
  os.remove(path)
  result = subprocess.run(main_command(trained, "--mode=sample", **OVERRIDES),
                          env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  # Same seed, same 4 devices: the command line draws exactly the in-process samples.
  np.testing.assert_array_equal(_load_npz(path)["samples"], expected)


def test_cli_eval_on_an_empty_workdir_says_to_train_first(tmp_path):
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "empty"
  # The flags and dispatch of main.py, in-process (a second subprocess would cost ~10 s), on a
  # FlagValues of its own, as a notebook would call it.
  argv = ["ddpm_jax.main", *main_command(workdir, "--mode=eval", **OVERRIDES)[3:]]
  flag_values = flags.FlagValues()
  args = main.define_flags(flag_values, sys_argv=argv)
  argv = flag_values(argv)
  assert args.config.value.sampling.num_samples == NUM_SAMPLES  # the overrides applied
  with pytest.raises(FileNotFoundError, match=r"No checkpoint.*train first"):
    main.main(argv, args)
  assert not workdir.exists()  # a mistyped workdir is not created
