"""Recovery guarantees: restarts after any number of kills, staging folders that are ours alone,
post-hoc EMA widths inside the tracked range, errors that name the file at fault, and the
autoguidance guide check.

Kills are simulated in-process: the trainer is stopped by an exception raised exactly where a
SIGKILL would have left its files (a snapshot half-written under its temporary name, a checkpoint
half-saved in Orbax's temporary folder), and every restart is a new `train_and_evaluate`, as a
rerun of the command is; one slow test sends real SIGKILLs to `python -m ddpm_jax.main`. Runs
without training build their files directly (random params of the tiny model), so most tests
take a second or two.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import posthoc_ema
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import exporter
from ddpm_jax.interop import importer
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import staging
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import posthoc_ema_io
from ddpm_jax.training import train

import helpers
from helpers import checkpoint_entries
from helpers import restore_state
from helpers import tiny_config

SIGMA_RELS = (0.05, 0.10)
# Snapshots every 2 steps, checkpoints every 6: several snapshots between two checkpoints.
PHEMA = {"training.phema_sigma_rels": SIGMA_RELS, "training.phema_snapshot_every": 2,
         "training.checkpoint_every": 6, "training.log_every": 2,
         "training.num_train_steps": 12}


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_leaves(got, expected, what: str) -> None:
  got, expected = _leaves(got), _leaves(expected)
  assert got.keys() == expected.keys(), what
  for key, value in got.items():
    assert np.array_equal(value, expected[key]), f"{what}: {key} differs"


def _random_params(config, seed: int = 0):
  """Random NumPy params of the config's model (no init, no compile)."""
  abstract = train_state_lib.abstract_params(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def _staging_leftovers(parent) -> list[str]:
  return [n for n in os.listdir(parent) if staging.STAGING_MARK in n]


# --- Restarts after kills -------------------------------------------------------------------


class _Killed(BaseException):
  """Stands for SIGKILL: nothing in the trainer catches it, and nothing is cleaned up."""


def _kill_at_snapshot(monkeypatch, step: int) -> None:
  """The run dies while writing snapshot `step`: its temporary file is half-written."""
  real = posthoc_ema_io.write_snapshot

  def write(workdir, at, *args):
    if at == step:
      path = posthoc_ema_io.snapshot_path(workdir, at)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.with_name(path.name + ".tmp").write_bytes(b"\x10\x00\x00\x00half a header")
      raise _Killed(f"killed while writing snapshot {at}")
    return real(workdir, at, *args)
  monkeypatch.setattr(posthoc_ema_io, "write_snapshot", write)


def _kill_at_checkpoint(monkeypatch, step: int) -> None:
  """The run dies while saving checkpoint `step`: Orbax's temporary folder holds part of it."""
  real = checkpointing.save

  def save(manager, state, data_iter=None):
    if int(jax.device_get(state.step)) == step:
      tmp = manager.directory / f"{step}.orbax-checkpoint-tmp" / "state"
      tmp.mkdir(parents=True)
      (tmp / "_METADATA").write_text('{"tree_metadata": {')
      raise _Killed(f"killed while saving checkpoint {step}")
    return real(manager, state, data_iter)
  monkeypatch.setattr(checkpointing, "save", save)


def _abandoned(workdir) -> dict[str, list[str]]:
  """{restart tag: [set-aside snapshot names]} of <workdir>/phema."""
  out = {}
  for name in os.listdir(posthoc_ema_io.snapshot_dir(workdir)):
    match = re.fullmatch(r"(phema-\d+\.safetensors)\.abandoned-at-(\d+)(-.+)?", name)
    if match:
      out.setdefault(f"{match[2]}{match[3] or ''}", []).append(match[1])
  return {tag: sorted(names) for tag, names in out.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run: snapshots at 2, 4, ..., 12; checkpoints at 6 and 12."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(**PHEMA)
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_killed_again_and_again_before_the_same_checkpoint_resumes_bitwise(reference, tmp_path,
                                                                           monkeypatch):
  """Kill 1 comes between checkpoint 6 and its snapshot; kills 2 and 3 both come before
  checkpoint 12 (2 in the middle of saving it). Every restart continues, and the last one ends
  bitwise where the uninterrupted run did: state, checkpoints and snapshots."""
  config, reference_dir = reference
  workdir = str(tmp_path / "run")
  phema_dir = posthoc_ema_io.snapshot_dir(workdir)

  _kill_at_snapshot(monkeypatch, 6)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(phema_dir)) == ["phema-00000002.safetensors",
                                           "phema-00000004.safetensors",
                                           "phema-00000006.safetensors.tmp"]

  monkeypatch.undo()
  _kill_at_checkpoint(monkeypatch, 12)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, workdir)
  # Restart 1 wrote snapshot 6 from checkpoint 6, in place of the half-written one.
  assert not any(n.endswith(".tmp") for n in os.listdir(phema_dir))
  assert posthoc_ema_io.snapshot_path(workdir, 6).exists()
  assert "12.orbax-checkpoint-tmp" in checkpoint_entries(workdir)
  # And older leftovers: a preemption at step 9 whose checkpoint and snapshot a kill cut short.
  # No run writes step 9 again, so only a restart's clean-up can remove them.
  os.makedirs(os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp", "state"))
  (phema_dir / "phema-00000009.safetensors.tmp").write_bytes(b"\x10\x00")

  monkeypatch.undo()
  _kill_at_snapshot(monkeypatch, 10)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, workdir)
  # Restart 2 set snapshots 8 and 10 aside and deleted the temporary file of step 9.
  assert list(_abandoned(workdir).values()) == [["phema-00000008.safetensors",
                                                 "phema-00000010.safetensors"]]
  assert "phema-00000009.safetensors.tmp" not in os.listdir(phema_dir)

  monkeypatch.undo()
  report = train.train_and_evaluate(config, workdir)  # the run died here, every time
  assert report["step"] == 12 and not report["preempted"]

  # Each restart set its snapshots aside under names of its own; nothing was deleted.
  abandoned = _abandoned(workdir)
  assert sorted(abandoned.values()) == [["phema-00000008.safetensors"],
                                        ["phema-00000008.safetensors",
                                         "phema-00000010.safetensors"]]
  assert all(tag.startswith("6-") for tag in abandoned)
  # Bitwise the uninterrupted run: the checkpoints and every snapshot.
  assert checkpoint_entries(workdir) == checkpoint_entries(reference_dir) == ["12", "6"]
  for step in (6, 12):
    _assert_same_leaves(restore_state(config, workdir, step=step),
                        restore_state(config, reference_dir, step=step), f"checkpoint {step}")
  names = sorted(n for n in os.listdir(phema_dir) if n.endswith(".safetensors"))
  assert names == sorted(os.listdir(posthoc_ema_io.snapshot_dir(reference_dir)))
  for name in names:
    snap, trees = posthoc_ema_io.read_snapshot(phema_dir / name)
    ref_snap, ref_trees = posthoc_ema_io.read_snapshot(
        posthoc_ema_io.snapshot_dir(reference_dir) / name)
    assert (snap.step, snap.sigma_rels) == (ref_snap.step, ref_snap.sigma_rels)
    _assert_same_leaves(trees, ref_trees, name)


@pytest.mark.slow
def test_real_sigkills_before_the_first_checkpoint_then_a_run_like_the_reference(reference,
                                                                               tmp_path):
  """The issue's run, with real SIGKILLs of `python -m ddpm_jax.main`: killed twice after some
  snapshots and before its first checkpoint (so both restarts set snapshots aside "at 0"), then
  run to the end, bitwise the reference."""
  config, reference_dir = reference
  workdir = str(tmp_path / "run")
  phema_dir = posthoc_ema_io.snapshot_dir(workdir)
  env = helpers.subprocess_env(4)
  long_run = {**PHEMA, "training.num_train_steps": 100_000, "training.checkpoint_every": 50_000}
  snapshots = lambda: {n for n in os.listdir(phema_dir) if n.endswith(".safetensors")} \
      if phema_dir.exists() else set()
  for attempt in range(2):
    set_aside = sum(len(v) for v in _abandoned(workdir).values()) if phema_dir.exists() else 0
    with helpers.spawned([helpers.main_command(workdir, **long_run)], env,
                         tmp_path / f"logs{attempt}") as (proc,):
      deadline = time.monotonic() + 300
      # This attempt's own snapshots: the earlier ones are set aside before its first step.
      while not ("phema-00000010.safetensors" in snapshots() and (
          attempt == 0 or sum(len(v) for v in _abandoned(workdir).values()) > set_aside)):
        assert proc.poll() is None, helpers.read_log(tmp_path / f"logs{attempt}")[-3000:]
        assert time.monotonic() < deadline, "no snapshot within 300 s"
        time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    assert checkpoint_entries(workdir) == []  # killed before its first checkpoint
  result = subprocess.run(helpers.main_command(workdir, **PHEMA), env=env, cwd=helpers.REPO_ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  abandoned = _abandoned(workdir)
  assert len(abandoned) == 2 and all(tag.startswith("0-") for tag in abandoned)
  assert not any(n.endswith(".tmp") for n in os.listdir(phema_dir))
  assert snapshots() == set(os.listdir(posthoc_ema_io.snapshot_dir(reference_dir)))
  _assert_same_leaves(restore_state(config, workdir), restore_state(config, reference_dir),
                      "checkpoint 12")
  for name in snapshots():
    _assert_same_leaves(posthoc_ema_io.read_snapshot(phema_dir / name)[1],
                        posthoc_ema_io.read_snapshot(
                            posthoc_ema_io.snapshot_dir(reference_dir) / name)[1], name)


def test_set_aside_names_never_collide_and_a_truncated_snapshot_is_set_aside_too(tmp_path):
  """The issue's FileExistsError: three restarts at step 0, each after snapshots 2 and 4 were
  written again; the newest one truncated (its header cut) by the last kill."""
  workdir = str(tmp_path)
  tree = ({"w": np.ones((2,), np.float32)},)
  moved = []
  for _ in range(3):
    for step in (2, 4):
      posthoc_ema_io.write_snapshot(workdir, step, tree, (0.05,), (6.94,))
    moved += posthoc_ema_io.set_aside_after(workdir, 0)
  path = posthoc_ema_io.snapshot_path(workdir, 4)
  posthoc_ema_io.write_snapshot(workdir, 4, tree, (0.05,), (6.94,))
  path.write_bytes(path.read_bytes()[:5])
  moved += posthoc_ema_io.set_aside_after(workdir, 0)
  assert len(moved) == len({p.name for p in moved}) == 7 and all(p.exists() for p in moved)
  assert posthoc_ema_io.list_snapshots(workdir) == []


def test_a_kill_while_the_config_is_recorded_leaves_no_partial_record(tmp_path, monkeypatch):
  """config.json is read by every later start and never rewritten: a kill while it is written
  must leave it whole or absent (here: killed just before the rename)."""
  config = tiny_config()

  def killed(*args):
    raise _Killed("killed while recording the config")
  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(_Killed):
    run_config.record(config, str(tmp_path), None)
  monkeypatch.undo()
  assert run_config.load(str(tmp_path)) is None  # absent: the next start writes it again
  run_config.record(config, str(tmp_path), None)
  assert run_config.flat(run_config.load(str(tmp_path))) == run_config.flat(config)
  assert os.listdir(tmp_path) == ["config.json"]


# A failed Orbax restore can leave an asyncio callback that fires after its loop closed (what
# checkpointing._Quiet keeps out of the log); it is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("phema", [False, True])
def test_a_checkpoint_broken_twice_is_set_aside_twice_with_the_reason_in_words(tmp_path, caplog,
                                                                               phema):
  """Step 2 is written, breaks, is restored from step 1 and written again, three times (its
  _METADATA deleted, its array index emptied, its _METADATA deleted again): three set-aside
  folders, two for the same reason, each logged with the file at fault, and step 1 restored
  each time."""
  config = tiny_config(**(PHEMA if phema else {}))
  state = train_state_lib.create_train_state(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  workdir = str(tmp_path)
  manager = checkpointing.create_manager(workdir, keep=None)
  saved = {}
  for step in (1, 2):
    saved[step] = state.replace(step=jax.numpy.asarray(step, state.step.dtype))
    checkpointing.save(manager, saved[step])
  manager.wait_until_finished()
  step_dir = os.path.join(workdir, "checkpoints", "2", "state")
  no_metadata = (lambda: os.remove(os.path.join(step_dir, "_METADATA")),
                 r"checkpoints/2/state/_METADATA \(the item's tree structure\) is missing")
  empty_index = (lambda: [open(os.path.join(d, "manifest.ocdbt"), "wb").close()
                          for d, _, files in os.walk(step_dir) if "manifest.ocdbt" in files],
                 r"checkpoints/2/state/manifest.ocdbt, .* \(the indexes of the array store\) "
                 r"are empty")
  breaks = [no_metadata, empty_index, no_metadata]
  for spoil, reason in breaks:
    spoil()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      restored, step = checkpointing.restore_newest_good(manager, state)
    assert step == 1
    _assert_same_leaves(jax.device_get(restored), jax.device_get(saved[1]), "step 1")
    (line,) = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert re.search(reason, line), line
    assert "NoneType" not in line and "Event loop" not in caplog.text
    checkpointing.save(manager, saved[2])  # the rerun trains to step 2 again
    manager.wait_until_finished()
  manager.close()
  aside = [e for e in checkpoint_entries(workdir) if e.startswith("2.corrupt-")]
  assert sorted(e.split("-")[1] for e in aside) == ["missing", "missing", "unreadable"]
  assert sorted(set(checkpoint_entries(workdir)) - set(aside)) == ["1", "2"]


# --- Post-hoc EMA files: a run built without training ---------------------------------------


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
  """config.json and snapshots (sigma_rel 0.05 and 0.10 at steps 2, 4, ..., 40) of the tiny
  model, with random EMAs."""
  run = str(tmp_path_factory.mktemp("phema_run"))
  config = tiny_config(**{"training.phema_sigma_rels": SIGMA_RELS})
  run_config.record(config, run, None)
  gammas = [posthoc_ema.gamma_from_sigma_rel(s) for s in SIGMA_RELS]
  for step in range(2, 41, 2):
    trees = (_random_params(config, step), _random_params(config, 1000 + step))
    posthoc_ema_io.write_snapshot(run, step, trees, SIGMA_RELS, gammas)
  return config, run


@pytest.mark.parametrize("sigma_rel", [0.01, 0.04, 0.11, 0.25])
def test_a_width_outside_the_tracked_range_is_refused_stating_the_range(phema_run, sigma_rel):
  _, run = phema_run
  with pytest.raises(ValueError, match=(
      rf"--sigma_rel={sigma_rel:g} is outside the widths .* \(0.05 to 0.1\): it can only be "
      r"extrapolated, with coefficients from [-+]\d.* Pass a --sigma_rel in \[0.05, 0.1\], or "
      r"pass --allow_extrapolation")):
    posthoc_ema_io.reconstruct(run, sigma_rel)
  # use_sigma_rels narrows the range to what is combined.
  with pytest.raises(ValueError, match=r"\(only 0.05\).*\[0.05, 0.05\]"):
    posthoc_ema_io.reconstruct(run, 0.08, use_sigma_rels=(0.05,))


def test_an_extrapolation_asked_for_warns_with_its_coefficients(phema_run, tmp_path, caplog):
  _, run = phema_run
  with caplog.at_level(logging.WARNING):
    rec = posthoc_ema_io.reconstruct(run, 0.01, allow_extrapolation=True)
  assert rec.extrapolated and np.max(np.abs(rec.coefficients)) > 2  # amplified, both signs
  (line,) = [r.getMessage() for r in caplog.records if "extrapolated" in r.getMessage()]
  largest = int(np.argmax(np.abs(rec.coefficients)))
  assert f"{rec.coefficients[largest]:+.3f} (step {rec.sources[largest][0]}" in line
  assert "(0.05 to 0.1)" in line
  for inside in (0.05, 0.08, 0.10):  # the edges are inside
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert not posthoc_ema_io.reconstruct(run, inside).extrapolated
    assert "extrapolated" not in caplog.text
  record = posthoc_ema_io.write_reconstruction(run, str(tmp_path / "out"), 0.25,
                                               allow_extrapolation=True)
  assert record["extrapolated"] is True
  with open(tmp_path / "out" / checkpointing.IMPORTED_FILE, encoding="utf-8") as f:
    assert json.load(f)["extrapolated"] is True


@pytest.mark.parametrize("cut", ["body", "header", "length"])
def test_a_truncated_snapshot_is_named_with_what_is_wrong(phema_run, tmp_path, cut):
  _, run = phema_run
  copy = str(tmp_path / "run")
  shutil.copytree(run, copy)
  path = posthoc_ema_io.snapshot_path(copy, 40)
  data = path.read_bytes()
  path.write_bytes(data[:{"body": len(data) // 2, "header": 40, "length": 5}[cut]])
  where = re.escape(str(path))
  message = {"body": rf"{where} is unreadable: it is \d+ bytes long but its header describes "
                     r"\d+ bytes of tensors \(truncated",
             "header": rf"{where} is unreadable: its \d+-byte header is cut short at 32 bytes "
                       r"\(truncated",
             "length": rf"{where} is unreadable: it is 5 bytes long, too short to be a "
                       r"safetensors file \(truncated"}[cut]
  with pytest.raises(ValueError, match=message + r".*Move it out of"):
    if cut == "body":
      posthoc_ema_io.read_snapshot(path)
    else:
      posthoc_ema_io.list_snapshots(copy)
  with pytest.raises(ValueError, match=where):
    posthoc_ema_io.reconstruct(copy, 0.08)


# --- Staging folders -------------------------------------------------------------------------


def _user_folder(path) -> None:
  """A folder of the user's, with a name the old code staged into and removed."""
  os.makedirs(path)
  with open(os.path.join(path, "mine.txt"), "w", encoding="utf-8") as f:
    f.write("keep me")


def _intact(path) -> bool:
  with open(os.path.join(path, "mine.txt"), encoding="utf-8") as f:
    return os.listdir(path) == ["mine.txt"] and f.read() == "keep me"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(config, workdir, diffusers folder): a params-only workdir of the tiny model, exported."""
  root = tmp_path_factory.mktemp("exported")
  config = tiny_config()
  workdir, out = str(root / "W"), str(root / "diffusers")
  importer.write_workdir(workdir, config, _random_params(config), 7, {"kind": "test"})
  exporter.export_checkpoint(workdir, out)
  return config, workdir, out


def _restored_params(config, workdir):
  abstract = train_state_lib.abstract_params(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  return jax.device_get(checkpointing.restore_params(workdir, abstract)[0])


def test_import_leaves_a_folder_named_like_its_old_staging_folder_alone(exported, tmp_path):
  config, workdir, src = exported
  target = str(tmp_path / "W")
  _user_folder(target + ".partial")
  importer.import_checkpoint(src, target, config)
  assert _intact(target + ".partial")
  assert _staging_leftovers(tmp_path) == []
  _assert_same_leaves(_restored_params(config, target), _restored_params(config, workdir),
                      "imported")


def test_export_leaves_a_folder_named_like_its_old_staging_folder_alone(exported, tmp_path):
  _, workdir, src = exported
  out = str(tmp_path / "out")
  _user_folder(out + ".partial")
  exporter.export_checkpoint(workdir, out)
  assert _intact(out + ".partial") and _staging_leftovers(tmp_path) == []
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name


def test_reconstruction_leaves_a_folder_named_like_its_old_staging_folder_alone(phema_run,
                                                                               tmp_path):
  _, run = phema_run
  out = str(tmp_path / "s008")
  _user_folder(out + ".partial")
  posthoc_ema_io.write_reconstruction(run, out, 0.08)
  assert _intact(out + ".partial") and _staging_leftovers(tmp_path) == []
  assert checkpointing.latest_step(out) == 40


def test_a_failed_write_removes_only_its_own_staging_folder(exported, phema_run, tmp_path,
                                                            monkeypatch):
  """A disk that fills up mid-write: the target stays absent, the staging folder is gone, and
  the user's folders beside it are untouched; for import, export and reconstruction alike."""
  config, workdir, src = exported
  _, run = phema_run

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(run_config, "record", full_disk)  # inside the import's staged block
  monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)  # inside the export's
  writes = {"W": lambda t: importer.import_checkpoint(src, t, config),
            "out": lambda t: exporter.export_checkpoint(workdir, t),
            "s008": lambda t: posthoc_ema_io.write_reconstruction(run, t, 0.08)}
  for name, write in writes.items():
    target = str(tmp_path / name)
    _user_folder(target + ".partial")
    with pytest.raises(OSError, match="No space left"):
      write(target)
    assert not os.path.exists(target) and _intact(target + ".partial")
  assert _staging_leftovers(tmp_path) == []


def test_a_target_that_is_not_ours_is_refused_and_kept(exported, phema_run, tmp_path,
                                                       monkeypatch):
  config, workdir, src = exported
  _, run = phema_run
  writes = {"--workdir": lambda t: importer.import_checkpoint(src, t, config),
            "--out": lambda t: exporter.export_checkpoint(workdir, t)}
  for flag, write in writes.items():
    target = str(tmp_path / flag.strip("-"))
    with open(target, "w", encoding="utf-8") as f:
      f.write("a file of the user's")
    with pytest.raises(FileExistsError, match=rf"{flag}={re.escape(target)} exists and is not a "
                                              "folder"):
      write(target)
    with open(target, encoding="utf-8") as f:
      assert f.read() == "a file of the user's"
  file_out = str(tmp_path / "file_out")
  with open(file_out, "w", encoding="utf-8") as f:
    f.write("a file of the user's")
  with pytest.raises(FileExistsError, match="--out=.* exists and is not a folder"):
    posthoc_ema_io.write_reconstruction(run, file_out, 0.08)
  # A folder that appears while the import writes is refused, not replaced.
  target = str(tmp_path / "W_race")
  real = run_config.record

  def record_then_race(*args, **kwargs):
    real(*args, **kwargs)
    _user_folder(target)
  monkeypatch.setattr(run_config, "record", record_then_race)
  with pytest.raises(FileExistsError, match=rf"--workdir={re.escape(target)} exists and is not "
                                            "empty; nothing was changed"):
    importer.import_checkpoint(src, target, config)
  assert _intact(target) and _staging_leftovers(tmp_path) == []


def test_staging_folders_are_new_and_ours(tmp_path):
  """Created exclusively with a random name beside the target, never an existing path."""
  target = str(tmp_path / "T")
  with staging.staged(target) as first, staging.staged(str(tmp_path / "U")) as second:
    assert os.path.dirname(first) == str(tmp_path) and os.listdir(first) == []
    assert re.fullmatch(r"T\.ddpm_jax-staging-[0-9a-f]{12}", os.path.basename(first))
    assert first != second
    with open(os.path.join(first, "x"), "w", encoding="utf-8") as f:
      f.write("x")
  assert os.listdir(target) == ["x"] and _staging_leftovers(tmp_path) == []


# --- Errors that name the file ---------------------------------------------------------------


def test_truncated_imported_weights_are_named_with_what_is_wrong(exported, tmp_path):
  config, _, src = exported
  copy = str(tmp_path / "src")
  shutil.copytree(src, copy)
  weights = os.path.join(copy, diffusers_io.SAFETENSORS)
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(ValueError, match=(
      rf"{re.escape(weights)} is not a complete safetensors file: it is \d+ bytes long but its "
      r"header describes \d+ bytes of tensors \(truncated")):
    importer.import_checkpoint(copy, str(tmp_path / "W"), config)
  assert not os.path.exists(tmp_path / "W") and _staging_leftovers(tmp_path) == []


@pytest.mark.parametrize("spoil", ["no_metadata", "truncated_data"])
def test_params_of_a_damaged_checkpoint_fail_naming_the_file(exported, tmp_path, spoil):
  """--mode=sample/eval, export and training.init_from read the params only."""
  config, workdir, _ = exported
  copy = str(tmp_path / "W")
  shutil.copytree(workdir, copy)
  state_dir = os.path.join(copy, "checkpoints", "7", "state")
  if spoil == "no_metadata":
    os.remove(os.path.join(state_dir, "_METADATA"))
    message = rf"{re.escape(state_dir)}/_METADATA \(the item's tree structure\) is missing"
  else:
    # Every data file keeps only its first 16 bytes: halving them read fine whenever the
    # ema_params chunks happened to lie in the first halves (the layout follows the values).
    for d, _, files in os.walk(os.path.join(state_dir, "ocdbt.process_0", "d")):
      for name in files:
        with open(os.path.join(d, name), "r+b") as f:
          f.truncate(16)
    message = (rf"The ema_params of checkpoint step 7 do not restore: {re.escape(state_dir)}: an "
               r"array cannot be read, a data file of the array store is truncated or damaged")
  with pytest.raises(checkpointing.CheckpointReadError, match=message):
    _restored_params(config, copy)


# --- The autoguidance guide ------------------------------------------------------------------


def _guide(root, **overrides) -> str:
  """A guide run: its config.json (the tiny config with `overrides`) and a checkpoint."""
  guide_dir = os.path.join(root, "guide")
  config = tiny_config(**overrides)
  importer.write_workdir(guide_dir, config, {"w": np.zeros((1,), np.float32)}, 3, {})
  return guide_dir


GUIDE_DIFFERENCES = {
    "super-resolution stage": ({"model.sr_factor": 2},
                               r"model.sr_factor guide 2 vs 0 \(super-resolution conditioning"),
    "image size": ({"data.image_size": 16}, r"data.image_size guide 16 vs 8"),
    "channels": ({"data.num_channels": 3}, r"data.num_channels guide 3 vs 1"),
    "variance": ({"diffusion.model_var": "learned_range"},
                 r"diffusion.model_var guide 'learned_range' vs 'fixed_large'"),
    "schedule": ({"diffusion.schedule": "cosine"}, r"diffusion.schedule guide 'cosine'"),
    "timesteps": ({"diffusion.num_timesteps": 40}, r"diffusion.num_timesteps guide 40 vs 20"),
    "schedule end": ({"diffusion.zero_terminal_snr": True},
                     r"diffusion.zero_terminal_snr guide True vs False"),
    "parameterisation": ({"diffusion.parameterization": "edm"},
                         r"diffusion.parameterization guide 'edm' vs 'ddpm'"),
    "prediction": ({"diffusion.model_output": "v"}, r"diffusion.model_output guide 'v' vs 'eps'"),
    "classes": ({"model.num_classes": 10}, r"conditional on 10 classes, this model on 0"),
    "classes of other data": ({"model.num_classes": 10, "data.dataset": "folder"},
                              r"the 10 classes of other data \(data.dataset guide 'folder' vs "
                              r"'digits'\)"),
}


@pytest.mark.parametrize("case", sorted(GUIDE_DIFFERENCES))
def test_a_guide_that_differs_from_the_model_is_refused_before_any_compile(tmp_path, case):
  overrides, message = GUIDE_DIFFERENCES[case]
  model = {"model.num_classes": 10} if "data.dataset" in overrides else {}
  guide_dir = _guide(str(tmp_path), **overrides)
  config = tiny_config(**model, **{"sampling.guide_workdir": guide_dir,
                                   "sampling.autoguidance_scale": 1.0})
  with pytest.raises(ValueError, match=message):
    validation.validate(config, mode="sample", open_data=False)


def test_a_guide_like_the_model_passes(tmp_path):
  guide_dir = _guide(str(tmp_path), **{"model.ch": 16})  # smaller: the usual weaker guide
  config = tiny_config(**{"sampling.guide_workdir": guide_dir,
                          "sampling.autoguidance_scale": 1.0})
  run = validation.check_guide(config, "sample")
  assert run.workdir == guide_dir and run.step == 3
