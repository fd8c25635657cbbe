"""Post-hoc EMA in training (EDM2, Karras et al. 2024): the power EMAs tracked in the train state,
their snapshots, resume, 1 vs 4 devices, and the reconstruction into a new workdir.

One 40-step run tracking sigma_rel 0.05, 0.08 and 0.10 (snapshots every 2 steps, checkpoints at
20 and 40) is the reference (`reference`); the core maths is tested in posthoc_ema_test.py.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import posthoc_ema
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import posthoc_ema_io
from ddpm_jax.training import train
from ddpm_jax.training import train_step as train_step_lib

import helpers
from helpers import restore_state
from helpers import tiny_config

NUM_DEVICES = 4  # set by conftest.py
SIGMA_RELS = (0.05, 0.08, 0.10)
PHEMA = {"training.phema_sigma_rels": SIGMA_RELS, "training.phema_snapshot_every": 2,
         "training.checkpoint_every": 20, "training.log_every": 10}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 40-step run (snapshots at 2, 4, ..., 40; checkpoints at 20 and 40)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(**PHEMA, **{"training.num_train_steps": 40})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


@pytest.mark.slow
def test_phema_is_the_power_ema_of_each_steps_params_on_one_and_four_devices():
  """After steps 1..3, each tracked EMA is sum_tau w_tau theta_tau with EDM2's weights
  (recomputed in float64 from the params of every step); at step 1 it is the params exactly.
  On 1 and 4 devices the EMAs differ by no more than the params they average do."""
  config = tiny_config(**PHEMA, **{"optim.warmup_steps": 0})  # every step moves the params
  gammas = [posthoc_ema.gamma_from_sigma_rel(s) for s in SIGMA_RELS]
  data = input_pipeline.create_train_iterator(config)
  images = [next(data)["image"] for _ in range(3)]
  model = factories.create_model(config)
  loss_fn = factories.loss_fn_from_config(config, factories.tables_from_config(config))
  weights = {}  # (t, i) -> w_tau for tau = 1..t
  runs = {}
  for num_devices in (1, NUM_DEVICES):
    mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
    state = train_state_lib.create_train_state(config, model, mesh)
    assert state.phema_gammas == pytest.approx(gammas, rel=1e-12)
    # Params, EMA and every tracked EMA are distinct buffers (the step donates them all).
    pointers = [leaf.addressable_data(0).unsafe_buffer_pointer() for leaf in
                jax.tree.leaves((state.params, state.ema_params, state.phema))]
    assert len(set(pointers)) == len(pointers)
    step_fn = train_step_lib.from_config(config, model, loss_fn, mesh)
    thetas, phemas = [], []
    for image in images:
      batch = {"image": image, "preempt": np.zeros(num_devices, np.bool_)}
      state, _ = step_fn(state, mesh_lib.global_batch(mesh, batch))
      host = jax.device_get((state.params, state.phema))  # before the next step donates them
      thetas.append(_flat(host[0]))
      phemas.append([_flat(tree) for tree in host[1]])
    runs[num_devices] = thetas, phemas
    for i in range(len(SIGMA_RELS)):
      np.testing.assert_array_equal(phemas[0][i], thetas[0])  # t = 1: beta = 0
    for t in range(1, len(images) + 1):
      for i, g in enumerate(gammas):
        tau = np.arange(1, t + 1, dtype=np.float64)
        w = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
        weights[t, i] = w
        expected = (w[:, None] * np.stack(thetas[:t])).sum(0)
        np.testing.assert_allclose(phemas[t - 1][i], expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {t}, sigma_rel {SIGMA_RELS[i]}")
  (thetas_1, phemas_1), (thetas_n, phemas_n) = runs[1], runs[NUM_DEVICES]
  assert np.max(np.abs(thetas_n[-1] - thetas_n[0])) > 1e-4  # the params moved
  # The params themselves agree across device counts only up to the gradients' rounding passed
  # through Adam, about sum_t lr_t delta for a relative gradient rounding delta (train_test.py
  # derives and checks it): 6e-7 here at lr 1e-3, the tiny model's GroupNorms having several
  # channels per group (with one per group, a zero gradient's noise became steps of about lr:
  # 2.5e-5). An EMA is a convex combination of the params, so it must add no disagreement of its
  # own: each entry's 1-vs-N difference is at most the w-weighted params' difference, plus the
  # float32 rounding of the EMA's own arithmetic (a few ulp of the params it averages).
  param_diffs = np.abs(np.stack(thetas_n) - np.stack(thetas_1))
  for t in range(1, len(images) + 1):
    for i in range(len(SIGMA_RELS)):
      bound = (weights[t, i][:, None] * param_diffs[:t]).sum(0)
      a, b = phemas_1[t - 1][i], phemas_n[t - 1][i]
      excess = np.abs(b - a) - bound - (1e-6 + 1e-5 * np.abs(a))
      assert np.max(excess) <= 0, (
          f"step {t}, sigma_rel {SIGMA_RELS[i]}: the EMAs differ by "
          f"{np.max(np.abs(b - a)):.3g}, more than their params do, at {np.sum(excess > 0)} "
          "entries")


def test_snapshots_are_written_at_their_steps_and_read_back_as_the_state_held_them(reference):
  config, workdir = reference
  snapshots = posthoc_ema_io.list_snapshots(workdir)
  assert [s.step for s in snapshots] == list(range(2, 41, 2))
  assert sorted(os.listdir(posthoc_ema_io.snapshot_dir(workdir))) == [
      f"phema-{s:08d}.safetensors" for s in range(2, 41, 2)]  # no temporary file left
  gammas = tuple(posthoc_ema.gamma_from_sigma_rel(s) for s in SIGMA_RELS)
  for snap in snapshots:
    assert snap.sigma_rels == SIGMA_RELS and snap.gammas == pytest.approx(gammas, rel=1e-12)
  for step in (20, 40):  # the checkpoints' phema, bitwise
    state = restore_state(config, workdir, step=step)
    snap, trees = posthoc_ema_io.read_snapshot(posthoc_ema_io.snapshot_path(workdir, step))
    assert snap.step == step and len(trees) == len(SIGMA_RELS)
    for stored, held in zip(trees, state.phema):
      expected = _leaves(held)
      got = _leaves(stored)
      assert got.keys() == expected.keys()
      for key, value in got.items():
        assert value.dtype == expected[key].dtype
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


@pytest.mark.slow
def test_resume_with_phema_is_bitwise_identical_to_an_uninterrupted_run(reference, tmp_path):
  config, reference_dir = reference
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(**PHEMA, **{"training.num_train_steps": 20}), workdir)
  assert int(restore_state(config, workdir).step) == 20
  train.train_and_evaluate(config, workdir)
  expected = _leaves(restore_state(config, reference_dir))
  resumed = _leaves(restore_state(config, workdir))
  assert resumed.keys() == expected.keys()
  assert sum(".phema[" in key for key in resumed) == 3 * sum(".ema_params" in k for k in resumed)
  for key, value in resumed.items():
    assert np.array_equal(value, expected[key]), f"{key} differs after resuming"
  names = sorted(os.listdir(posthoc_ema_io.snapshot_dir(workdir)))
  assert names == sorted(os.listdir(posthoc_ema_io.snapshot_dir(reference_dir)))
  for name in names:  # equal contents (the header's JSON order is not fixed, so not bytes)
    snap, trees = posthoc_ema_io.read_snapshot(posthoc_ema_io.snapshot_dir(workdir) / name)
    ref_snap, ref_trees = posthoc_ema_io.read_snapshot(
        posthoc_ema_io.snapshot_dir(reference_dir) / name)
    assert (snap.step, snap.sigma_rels, snap.gammas) == (
        ref_snap.step, ref_snap.sigma_rels, ref_snap.gammas)
    for key, value in _leaves(trees).items():
      assert np.array_equal(value, _leaves(ref_trees)[key]), f"{name}: {key}"


class _PoisonedIterator:
  """The real iterator, with NaN images from batch `first_bad` on."""

  def __init__(self, iterator, first_bad: int):
    self._iterator, self._first_bad, self._count = iterator, first_bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self._count += 1
    if self._count >= self._first_bad:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


def test_a_non_finite_step_is_never_snapshotted(tmp_path, monkeypatch):
  real = input_pipeline.create_train_iterator
  monkeypatch.setattr(input_pipeline, "create_train_iterator",
                      lambda config, **kwargs: _PoisonedIterator(real(config, **kwargs), 3))
  config = tiny_config(**{**PHEMA, "training.phema_snapshot_every": 1,
                          "training.num_train_steps": 6})
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 3\b"):
    train.train_and_evaluate(config, workdir)
  assert [s.step for s in posthoc_ema_io.list_snapshots(workdir)] == [1, 2]
  for snap in posthoc_ema_io.list_snapshots(workdir):
    for tree in posthoc_ema_io.read_snapshot(snap.path)[1]:
      assert np.all(np.isfinite(_flat(tree)))


def test_phema_off_writes_and_restores_the_tree_it_always_did(tmp_path):
  """No `phema` entry in the checkpoint (old checkpoints restore unchanged), none in the state."""
  config = tiny_config()
  state = train_state_lib.create_train_state(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  assert state.phema is None and state.phema_gammas == ()
  manager = checkpointing.create_manager(str(tmp_path), keep=None)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  path = checkpointing.checkpoint_dir(str(tmp_path)) / "0" / "state"
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  assert sorted(tree) == ["ema_params", "importance", "opt_state", "params", "rng", "step"]
  restored = checkpointing.restore(manager, state)
  manager.close()
  assert restored.phema is None
  for key, value in _leaves(restored).items():
    np.testing.assert_array_equal(value, _leaves(state)[key])


def test_reconstruction_from_two_widths_matches_the_directly_tracked_third(reference):
  """sigma_rel 0.08 rebuilt from the 0.05 and 0.10 snapshots (20 files, 40 EMAs) is within 2% of
  the distance between those two of the EMA tracked at 0.08 (measured: 0.5%; their midpoint is
  11% off)."""
  _, workdir = reference
  rec = posthoc_ema_io.reconstruct(workdir, 0.08, use_sigma_rels=(0.05, 0.10))
  assert rec.step == 40 and len(rec.coefficients) == 40
  assert {s for _, s in rec.sources} == {0.05, 0.10}
  _, (a, direct, b) = posthoc_ema_io.read_snapshot(posthoc_ema_io.snapshot_path(workdir, 40))
  scale = np.linalg.norm(_flat(a) - _flat(b))
  error = np.linalg.norm(_flat(rec.params) - _flat(direct)) / scale
  assert error < 0.02, error
  assert np.linalg.norm(0.5 * (_flat(a) + _flat(b)) - _flat(direct)) / scale > 5 * error
  assert rec.coefficients.sum() == pytest.approx(1.0, abs=0.01)
  # With every width, the tracked one is among the sources: nearly exact.
  exact = posthoc_ema_io.reconstruct(workdir, 0.08)
  assert np.linalg.norm(_flat(exact.params) - _flat(direct)) / scale < 1e-3
  # An earlier step uses the snapshots up to it only.
  early = posthoc_ema_io.reconstruct(workdir, 0.08, step=20)
  assert early.step == 20 and max(t for t, _ in early.sources) == 20
  assert len(early.sources) == 10 * 3


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ddpm_jax.posthoc_ema", *args],
                        env=helpers.subprocess_env(1), cwd=helpers.REPO_ROOT, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.mark.slow
def test_entry_point_writes_a_workdir_whose_ema_params_are_the_reconstruction(reference,
                                                                              tmp_path):
  config, workdir = reference
  out = str(tmp_path / "s008")
  result = _cli(f"--workdir={workdir}", "--sigma_rel=0.08", f"--out={out}",
                "--use_sigma_rels=0.05,0.1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "40 coefficients" in result.stdout and "step 40" in result.stdout
  assert out in result.stdout
  expected = posthoc_ema_io.reconstruct(workdir, 0.08, use_sigma_rels=(0.05, 0.10)).params
  abstract = train_state_lib.abstract_params(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  for use_ema in (True, False):
    params, step = checkpointing.restore_params(out, abstract, use_ema=use_ema)
    assert step == 40
    got = _leaves(jax.device_get(params))
    for key, value in _leaves(expected).items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f, \
      open(os.path.join(workdir, "config.json"), encoding="utf-8") as g:
    written, original = json.load(f), json.load(g)
  assert written["model"] == original["model"] and written["diffusion"] == original["diffusion"]
  with open(os.path.join(out, checkpointing.IMPORTED_FILE), encoding="utf-8") as f:
    record = json.load(f)
  assert record["kind"] == "posthoc_ema" and record["sigma_rel"] == 0.08
  # --out already holding a checkpoint is refused, and --list prints the table.
  again = _cli(f"--workdir={workdir}", "--sigma_rel=0.08", f"--out={out}")
  assert again.returncode != 0 and "already holds a checkpoint" in again.stderr
  listed = _cli(f"--workdir={workdir}", "--list")
  assert listed.returncode == 0 and "20 snapshots" in listed.stdout
  assert "0.05, 0.08, 0.1" in listed.stdout


def test_bad_inputs_fail_with_the_fix(reference, tmp_path):
  config, workdir = reference
  with pytest.raises(FileNotFoundError, match=r"No post-hoc EMA snapshots.*phema_sigma_rels"):
    posthoc_ema_io.reconstruct(str(tmp_path), 0.08)
  with pytest.raises(ValueError, match=r"--sigma_rel=0.3 is out of range.*0\.2887"):
    posthoc_ema_io.reconstruct(workdir, 0.3)
  with pytest.raises(ValueError, match=r"--sigma_rel=0.0 is out of range"):
    posthoc_ema_io.reconstruct(workdir, 0.0)
  with pytest.raises(ValueError, match=r"--step=21: .* no snapshot of that step.*40"):
    posthoc_ema_io.reconstruct(workdir, 0.08, step=21)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    posthoc_ema_io.write_reconstruction(workdir, workdir, 0.08)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    posthoc_ema_io.write_reconstruction(workdir, str(tmp_path / "full"), 0.08)
  bad = {(0.05, 0.3): r"phema_sigma_rels=\(0.05, 0.3\): sigma_rel must be in \(0, 0.2887\]",
         (0.05, 0.05): "repeats a width",
         (0.02, 0.04, 0.06, 0.08, 0.1): "track at most 4",
         (0.0,): "sigma_rel must be in"}
  for sigma_rels, message in bad.items():
    with pytest.raises(ValueError, match=message):
      validation.check_training(tiny_config(**{"training.phema_sigma_rels": sigma_rels}))
  with pytest.raises(ValueError, match=r"phema_snapshot_every must be >= 0"):
    validation.check_training(tiny_config(**{"training.phema_snapshot_every": -1}))
  validation.check_training(config)  # the reference's settings pass


def test_resume_sets_aside_snapshots_newer_than_the_restored_step(tmp_path):
  """A run resumed from checkpoint s replays the steps after s on another trajectory: the old
  snapshots of those steps are renamed (never deleted) so no reconstruction mixes the two."""
  workdir = str(tmp_path)
  tree = ({"w": np.ones((2,), np.float32)},)
  for step in (2, 4, 6):
    posthoc_ema_io.write_snapshot(workdir, step, tree, (0.05,), (6.94,))
  moved = posthoc_ema_io.set_aside_after(workdir, 4)
  assert [s.step for s in posthoc_ema_io.list_snapshots(workdir)] == [2, 4]
  assert len(moved) == 1 and re.fullmatch(r"phema-00000006\.safetensors\.abandoned-at-4-.+",
                                          moved[0].name)
  assert moved[0].exists()
