"""Tests for fine-tuning (`training.init_from`) in ddpm_jax.training.train, on the tiny U-Net.

A new run starts from another workdir's weights: a run of ours, or an imported model written as
the importer writes it (a params-only Orbax checkpoint, config.json and imported.json), made here
with Orbax directly. The run's first train-step input is captured by wrapping the train step.
"""

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm_jax.config import factories
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train
from ddpm_jax.training import train_step as train_step_lib

from helpers import checkpoint_entries
from helpers import read_metrics
from helpers import restore_state
from helpers import tiny_config

IMPORTED_STEP = 700  # any step: the importer keeps the source's
CLASSIFIER = {"training.objective": "classifier", "model.num_classes": 10}


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bitwise_equal(tree, expected, what: str) -> None:
  tree, expected = _leaves(tree), _leaves(expected)
  assert tree.keys() == expected.keys(), what
  for key, value in tree.items():
    same = value.dtype == expected[key].dtype and np.array_equal(value, expected[key])
    assert same, f"{what}{key} differs"


def _write_imported(workdir, config, seed: int = 7) -> dict:
  """A workdir as `ddpm_jax.import_checkpoint` writes it; returns its {params, ema_params}.

  Both are the model's init plus independent noise on every leaf (the output conv starts at zero,
  and a zero output would make every model's loss the same), so raw and EMA differ everywhere.
  """
  model = factories.create_model(config)
  init = jax.device_get(train_state_lib.create_train_state(
      config, model, mesh_lib.make_mesh()).params)
  rng = np.random.default_rng(seed)
  noisy = lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
  stored = {"params": jax.tree.map(noisy, init), "ema_params": jax.tree.map(noisy, init)}
  manager = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir))
  manager.save(IMPORTED_STEP, args=ocp.args.Composite(state=ocp.args.StandardSave(stored)))
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(run_config.config_to_json(config))
  with open(os.path.join(workdir, checkpointing.IMPORTED_FILE), "w", encoding="utf-8") as f:
    json.dump({"source": "tests/finetune_test.py"}, f)
  return stored


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imported"))
  return workdir, _write_imported(workdir, tiny_config())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One of our runs, 3 steps from seed 5 (so its params are not a seed-0 init)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_config(**{"training.num_train_steps": 3, "training.seed": 5,
                          "optim.warmup_steps": 0})
  train.train_and_evaluate(config, workdir)
  return workdir, restore_state(config, workdir)


class _FirstStep:
  """Wraps `train_step.from_config` so that the run's first step records its input state."""

  def __init__(self, monkeypatch):
    self.state = None
    real = train_step_lib.from_config

    def from_config(*args, **kwargs):
      step = real(*args, **kwargs)

      def recording(state, batch):
        if self.state is None:
          self.state = jax.device_get(state)  # before the step donates it
        return step(state, batch)
      return recording
    monkeypatch.setattr(train_step_lib, "from_config", from_config)


def _first_loss(config, params=None) -> float:
  """The loss of the run's first train step on the run's first batch, from the state a new run
  of `config` builds (its seed's rng), with `params` as params and EMA when given."""
  mesh = mesh_lib.make_mesh()
  model = factories.create_model(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  if params is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = state.replace(params=jax.device_put(params, replicated),
                          ema_params=jax.device_put(params, replicated))
  step = train_step_lib.from_config(
      config, model, factories.loss_fn_from_config(config, factories.tables_from_config(config)),
      mesh)
  batch = next(input_pipeline.create_train_iterator(config))
  batch = {"image": batch["image"], "preempt": np.zeros(jax.local_device_count(), np.bool_),
           **({"label": batch["label"]} if config.model.num_classes > 0 else {})}
  _, metrics = step(state, mesh_lib.global_batch(mesh, batch))
  return float(jax.device_get(metrics["loss"]))


def _check_start(first, expected_params, config) -> None:
  """The run's step-0 state: `expected_params` as params and EMA, a fresh optimiser and rng."""
  _assert_bitwise_equal(first.params, expected_params, "params")
  _assert_bitwise_equal(first.ema_params, expected_params, "ema_params")
  assert int(first.step) == 0
  fresh = jax.device_get(train_state_lib.create_train_state(
      config, factories.create_model(config), mesh_lib.make_mesh()))
  _assert_bitwise_equal(first.opt_state, fresh.opt_state, "opt_state")  # count 0, zero moments
  moments = [leaf for leaf in jax.tree.leaves(first.opt_state) if np.ndim(leaf) > 0]
  assert moments and all(not np.any(leaf) for leaf in moments)
  np.testing.assert_array_equal(first.rng, fresh.rng)  # the new run's own seed


@pytest.mark.parametrize("use_ema", [True, False])
def test_run_starts_from_an_imported_model_and_its_first_loss_is_that_models(
    imported, tmp_path, monkeypatch, caplog, use_ema):
  source, stored = imported
  expected = stored["ema_params" if use_ema else "params"]
  overrides = {"training.init_from": source, "training.init_from_ema": use_ema,
               "training.num_train_steps": 1, "training.log_every": 1}
  if not use_ema:  # a changed diffusion process is fine-tuning: allowed, with a warning
    overrides["diffusion.schedule"] = "cosine"
  config = tiny_config(**overrides)
  first = _FirstStep(monkeypatch)
  with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level may be WARNING
    report = train.train_and_evaluate(config, str(tmp_path))
  assert report["step"] == 1
  _check_start(first.state, expected, config)
  if not use_ema:
    assert "another diffusion process" in caplog.text and "diffusion.schedule" in caplog.text
  assert f"step {IMPORTED_STEP} in {source}" in caplog.text

  (line,) = read_metrics(str(tmp_path))
  assert line["loss"] == _first_loss(config, expected)
  # A wrong start would show: the same run from scratch has another first loss.
  scratch = tiny_config(**{**overrides, "training.init_from": ""})
  assert _first_loss(scratch) != line["loss"]
  # The run's record names its source; the source is untouched.
  with open(tmp_path / "config.json", encoding="utf-8") as f:
    assert json.load(f)["training"]["init_from"] == source
  assert checkpoint_entries(source) == [str(IMPORTED_STEP)]


def test_run_starts_from_one_of_our_runs(trained, tmp_path, monkeypatch):
  source, state = trained
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)))
  config = tiny_config(**{"training.init_from": source, "training.num_train_steps": 1})
  first = _FirstStep(monkeypatch)
  train.train_and_evaluate(config, str(tmp_path))
  _check_start(first.state, state.ema_params, config)


def test_resuming_a_fine_tuned_run_is_exact_and_ignores_init_from(imported, tmp_path, caplog):
  source, _ = imported
  config = lambda steps: tiny_config(**{"training.init_from": source,
                                        "training.num_train_steps": steps})
  reference, split = str(tmp_path / "reference"), str(tmp_path / "split")
  train.train_and_evaluate(config(4), reference)
  train.train_and_evaluate(config(2), split)
  with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level may be WARNING
    report = train.train_and_evaluate(config(4), split)
  assert report["step"] == 4
  assert f"training.init_from={source} is ignored" in caplog.text
  assert os.path.exists(os.path.join(split, "config_resume_2.json"))  # it resumed at step 2
  _assert_bitwise_equal(restore_state(config(4), split), restore_state(config(4), reference),
                        "state")


def test_classifier_objective_fine_tunes_a_classifier(tmp_path, monkeypatch):
  source = str(tmp_path / "classifier")
  train.train_and_evaluate(tiny_config(**CLASSIFIER, **{"training.num_train_steps": 1,
                                                        "training.seed": 5}), source)
  config = tiny_config(**CLASSIFIER, **{"training.init_from": source,
                                        "training.num_train_steps": 1})
  first = _FirstStep(monkeypatch)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  _check_start(first.state, restore_state(config, source).ema_params, config)


# --- Refused before anything compiles, with nothing written to the new workdir ---


def _no_compiling(*args, **kwargs):
  raise AssertionError("jax.jit was called before the config was rejected")


def _refused(config, workdir, match: str, monkeypatch) -> str:
  monkeypatch.setattr(jax, "jit", _no_compiling)
  with pytest.raises(ValueError, match=match) as error:
    train.train_and_evaluate(config, workdir)
  return str(error.value)


def test_other_architecture_is_named_with_both_values(trained, tmp_path, monkeypatch):
  source, _ = trained
  run = str(tmp_path / "run")
  message = _refused(tiny_config(**{"training.init_from": source, "model.ch": 64,
                                    "model.num_res_blocks": 2}),
                     run, r"model\.ch: .* has 32, this config 64", monkeypatch)
  assert "model.num_res_blocks" in message and "--config.model.ch=32" in message
  assert "--config.model.num_res_blocks=1" in message
  assert not os.path.exists(run)


def test_diffusion_model_cannot_start_a_classifier(imported, tmp_path, monkeypatch):
  source, _ = imported
  run = str(tmp_path / "run")
  _refused(tiny_config(**CLASSIFIER, **{"training.init_from": source}), run,
           r"training\.objective: .* has 'diffusion', this config 'classifier'", monkeypatch)
  assert not os.path.exists(run)


def test_other_param_shapes_are_named_before_loading(imported, tmp_path, monkeypatch):
  # A learned variance doubles the output channels: not an architecture field, but the shapes
  # stored in the checkpoint's metadata differ, and the field is named.
  source, _ = imported
  run = str(tmp_path / "run")
  message = _refused(tiny_config(**{"training.init_from": source,
                                    "diffusion.model_var": "learned_range",
                                    "diffusion.loss": "hybrid"}),
                     run, r"different parameter shapes", monkeypatch)
  assert "conv_out" in message and "diffusion.model_var" in message
  assert not os.path.exists(run)


def test_missing_source_or_source_without_checkpoint_fails(tmp_path, monkeypatch):
  run = str(tmp_path / "run")
  missing = str(tmp_path / "nope")
  message = _refused(tiny_config(**{"training.init_from": missing}), run,
                     r"init_from=.*nope: no such directory", monkeypatch)
  assert "import_checkpoint" in message
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(run_config.config_to_json(tiny_config()))
  _refused(tiny_config(**{"training.init_from": str(empty)}), run,
           r"init_from=.*empty has no checkpoint", monkeypatch)
  assert not os.path.exists(run)


def test_training_on_an_imported_model_says_to_fine_tune_it(imported, monkeypatch):
  source, _ = imported
  message = _refused(tiny_config(), source, "holds an imported model", monkeypatch)
  assert message.endswith(f"--config.training.init_from={source} --workdir=NEW")
  assert checkpoint_entries(source) == [str(IMPORTED_STEP)]  # nothing moved aside
