"""Recovery tests: corrupt checkpoints, the non-finite guard, resume config checks, params-only
restore for sample/eval, and the preservation of regular checkpoints.

One 15-step run (checkpoints 5, 10, 15) is the reference; each test works on a copy of it.
"""

import json
import logging
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import drivers
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.training import train

from helpers import checkpoint_entries
from helpers import restore_state
from helpers import tiny_config

STEPS = {"training.num_train_steps": 15, "training.checkpoint_every": 5,
         "training.log_every": 5}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(**STEPS)
  train.train_and_evaluate(config, workdir)
  assert checkpoint_entries(workdir) == ["10", "15", "5"]
  return config, workdir


def _copy(reference_dir, tmp_path, drop=("15",)) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  for step in drop:
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  return workdir


def _leaves(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _files(root, pattern):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if re.fullmatch(pattern, f))


def _truncate_data_file(step_dir):
  """Halves every array data file of the OCDBT store (state/ocdbt.process_*/d/*)."""
  paths = [p for p in _files(os.path.join(step_dir, "state"), r"[0-9a-f]{20,}")
           if os.sep + "ocdbt.process_" in p]
  assert paths
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty_manifest(step_dir):
  for path in _files(os.path.join(step_dir, "state"), r"manifest\.ocdbt"):
    open(path, "wb").close()


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_iterator_json(step_dir):
  for path in _files(os.path.join(step_dir, "data"), r".*\.json"):
    os.remove(path)


CORRUPTIONS = {"truncated_data": _truncate_data_file, "empty_manifest": _empty_manifest,
               "no_metadata": _delete_metadata, "no_iterator_state": _delete_iterator_json}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_and_resumes_bitwise(reference, tmp_path, caplog,
                                                                  corruption):
  config, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path)
  CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "10"))
  with caplog.at_level(logging.WARNING):
    report = train.train_and_evaluate(config, workdir)
  assert report["step"] == 15
  lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(lines) == 1 and "checkpoints/10" in lines[0], lines
  assert "Traceback" not in lines[0] and "Event loop" not in caplog.text
  aside = [e for e in checkpoint_entries(workdir) if e.startswith("10.corrupt-")]
  assert len(aside) == 1  # moved, not deleted
  # Training from 5 wrote 10 and 15 again.
  assert set(checkpoint_entries(workdir)) - set(aside) == {"5", "10", "15"}
  expected, resumed = _leaves(restore_state(config, reference_dir)), _leaves(
      restore_state(config, workdir))
  assert resumed.keys() == expected.keys()
  for key, value in resumed.items():
    assert np.array_equal(value, expected[key]), key


def test_no_restorable_checkpoint_lists_them_all(reference, tmp_path):
  config, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path)
  for step in ("5", "10"):
    _delete_metadata(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(checkpointing.NoRestorableCheckpointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "step 10" in message and "step 5" in message and "Traceback" not in message


def test_checkpoint_holds_the_data_iterator_position(reference):
  config, workdir = reference
  assert os.listdir(os.path.join(workdir, "checkpoints", "10", "data"))
  restored = input_pipeline.create_train_iterator(config)
  assert int(restore_state(config, workdir, restored, step=10).step) == 10
  fresh = input_pipeline.create_train_iterator(config)
  for _ in range(10):
    next(fresh)
  np.testing.assert_array_equal(next(restored)["image"], next(fresh)["image"])


def _no_compiling(*args, **kwargs):
  raise AssertionError("jax.jit was called before the config was rejected")


def _record(workdir):
  return {f: open(os.path.join(workdir, f), encoding="utf-8").read()
          for f in os.listdir(workdir) if f.startswith("config")}


@pytest.mark.parametrize("override,field", [({"model.ch": 64}, "model.ch"),
                                            ({"optim.grad_clip": 0.0}, "optim.grad_clip"),
                                            ({"diffusion.t_sampling": "importance"},
                                             "diffusion.t_sampling"),
                                            ({"diffusion.schedule": "cosine"},
                                             "diffusion.schedule"),
                                            ({"training.phema_sigma_rels": (0.05, 0.1)},
                                             "training.phema_sigma_rels"),
                                            ({"diffusion.parameterization": "edm"},
                                             "diffusion.parameterization")])
def test_refused_resume_names_the_field_and_keeps_config_json(reference, tmp_path, monkeypatch,
                                                              override, field):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path)
  before = _record(workdir)
  monkeypatch.setattr(jax, "jit", _no_compiling)
  with pytest.raises(ValueError, match=re.escape(field)) as error:
    train.train_and_evaluate(tiny_config(**{**STEPS, "training.num_train_steps": 20, **override}),
                             workdir)
  assert "strict" not in str(error.value)
  if field in ("diffusion.schedule", "diffusion.parameterization"):
    assert "allow_config_change=True" in str(error.value)
  assert _record(workdir) == before


def test_allowed_process_change_and_other_changes_pass_the_check(reference, tmp_path):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path)
  config = tiny_config(**{**STEPS, "diffusion.schedule": "cosine", "optim.lr": 1e-4,
                          "training.allow_config_change": True})
  diff = run_config.check_resume(config, workdir, 10)
  assert set(diff) == {"diffusion.schedule", "optim.lr", "training.allow_config_change"}


def test_checkpoint_past_num_train_steps_says_so_and_exits(reference, tmp_path, monkeypatch,
                                                           caplog):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path, drop=())
  monkeypatch.setattr(jax, "jit", _no_compiling)
  with caplog.at_level(logging.WARNING):
    report = train.train_and_evaluate(tiny_config(**{**STEPS, "training.num_train_steps": 12}),
                                      workdir)
  assert report["step"] == 15 and report["already_done"]
  assert "already at or past num_train_steps=12" in caplog.text


def test_resume_records_each_segment_config(reference, tmp_path):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path)
  first = _record(workdir)["config.json"]
  train.train_and_evaluate(tiny_config(**{**STEPS, "optim.lr": 1e-4}), workdir)
  record = _record(workdir)
  assert record["config.json"] == first  # the first segment's record is never overwritten
  assert json.loads(record["config_resume_10.json"])["optim"]["lr"] == 1e-4


def test_huge_lr_leaves_no_non_finite_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(**{"training.num_train_steps": 4, "training.checkpoint_every": 1,
                          "optim.lr": 1e39, "optim.warmup_steps": 0})
  with pytest.raises(train.NonFiniteLossError, match=r"at step 1\b") as error:
    train.train_and_evaluate(config, workdir)
  assert "no checkpoint has been saved" in str(error.value)
  assert checkpoint_entries(workdir) == []


@pytest.mark.parametrize("override", [{"optim.grad_clip": 0.0},
                                      {"diffusion.t_sampling": "importance"}])
def test_sample_and_eval_restore_params_only(reference, tmp_path, override):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path, drop=())
  config = tiny_config(**{**override, "sampling.num_samples": 8, "sampling.sampler": "ddim",
                          "sampling.num_steps": 2, "sampling.trajectory_every": 0,
                          "eval.metrics": ("bpd",), "eval.bpd_num_examples": 8})
  path = drivers.sample(config, workdir)
  with np.load(path) as f:
    assert f["samples"].shape == (8, 8, 8, 1)
  report = drivers.evaluate(config, workdir)
  assert report["step"] == 15 and np.isfinite(report["bpd_total"])


def test_sample_with_other_param_shapes_names_the_field(reference, tmp_path):
  _, reference_dir = reference
  workdir = _copy(reference_dir, tmp_path, drop=())
  with pytest.raises(ValueError, match=r"model\.ch") as error:
    drivers.sample(tiny_config(**{"model.ch": 64}), workdir)
  assert "strict" not in str(error.value)


def test_preemption_checkpoint_never_pushes_out_a_regular_one():
  policy = checkpointing.KeepRegular(2, every=5)
  infos = lambda steps: [types.SimpleNamespace(step=s) for s in steps]
  keep = lambda steps: [s for s, k in zip(steps, policy.should_preserve(infos(steps), context=None))
                        if k]
  assert keep([5, 10, 13]) == [5, 10, 13]  # the preemption save is the newest: kept
  assert keep([5, 10, 13, 15]) == [10, 15]  # then the two newest regular ones only
  assert keep([5, 10, 15, 17]) == [10, 15, 17]


def test_old_per_process_data_item_restores_at_the_global_position(tmp_path, caplog):
  """A checkpoint from before the global data order (grain's process_<i>-of-<n>.json files)
  restores: the state as saved, the data stream at global batch `step`, with a warning."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  from ddpm_jax.runtime import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  state = train_state_lib.create_train_state(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  state = state.replace(step=state.step + 7)
  manager = checkpointing.create_manager(str(tmp_path), keep=None)
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  data_dir = checkpointing.checkpoint_dir(str(tmp_path)) / "7" / "data"
  data_dir.mkdir()
  for index in range(2):  # as two processes of the old pipeline wrote it
    (data_dir / f"process_{index}-of-2.json").write_text(json.dumps(
        {"last_seen_indices": {"0": 12 + index}, "last_worker_index": -1}))
  data_iter = input_pipeline.create_train_iterator(config)
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore(manager, state, data_iter, step=7)
  manager.close()
  assert int(jax.device_get(restored.step)) == 7
  assert data_iter.get_state()["position"] == 7
  assert "before the topology-free data order" in caplog.text
  assert "start a fresh workdir" in caplog.text
  fresh = input_pipeline.create_train_iterator(config)
  for _ in range(7):
    next(fresh)
  np.testing.assert_array_equal(next(data_iter)["image"], next(fresh)["image"])
