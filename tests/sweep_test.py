"""Tests of experiments/sweep.py (points, launch, runner) and experiments/collate.py.

One test trains a 2-point sweep of tiny digits models end to end (two ~15 s subprocesses); the
others check expansion, validation, command lines, resumption and collation without training.
"""

import csv
import json
import os
import shlex
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `experiments` is not an installed package; `pytest` may not add it.
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import collate  # noqa: E402
from experiments import launch as launch_lib  # noqa: E402
from experiments import sweep as sweep_lib  # noqa: E402
from experiments.sweeps import cifar10_schedules  # noqa: E402
from experiments.sweeps import digits_samplers  # noqa: E402

TINY = {
    "model.ch": 32,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "diffusion.num_timesteps": 20,
    "training.num_train_steps": 4,
    "training.batch_size": 8,
    "training.checkpoint_every": 2,
    "training.log_every": 2,
    "training.sample_every": 4,
    "training.grid_sampler_steps": 2,
    "training.num_grid_samples": 4,
    "training.final_eval_metrics": ("digits_score",),
    "sampling.num_samples": 8,
    "sampling.batch_size": 8,
    "sampling.num_steps": 2,
}
NAMES = ["schedule-linear", "schedule-cosine"]


def tiny_sweep(**fields) -> dict:
  return {"name": "tiny", "config": "configs/digits.py", "fixed": TINY,
          "grid": {"diffusion.schedule": ["linear", "cosine"]}, **fields}


def sweep_file(tmp_path, sweep: dict) -> str:
  """A sweep definition file, as the CLI's --sweep takes it."""
  path = tmp_path / "tiny_sweep.py"
  path.write_text(f"def get_sweep():\n  return {sweep!r}\n")
  return str(path)


@pytest.fixture(name="no_launch")
def fixture_no_launch(monkeypatch):
  """Fails the test if the runner starts any subprocess."""
  calls = []
  monkeypatch.setattr(launch_lib, "launch_point",
                      lambda command, workdir, echo=True: calls.append(workdir) or 99)
  return calls


def test_expand_names_labels_and_linked_overrides():
  sweep = {"name": "s", "config": "configs/digits.py", "fixed": {"training.num_train_steps": 5},
           "grid": {"diffusion.schedule": ["linear", "cosine"],
                    "diffusion.loss": ["mse", cifar10_schedules.HYBRID]},
           "points": [{"name": "my point", "model.ch": 16}, {"model.ch_mult": (1, 2)}]}
  points = sweep_lib.expand(sweep)
  assert [p.name for p in points] == [
      "schedule-linear__loss-mse", "schedule-linear__loss-hybrid", "schedule-cosine__loss-mse",
      "schedule-cosine__loss-hybrid", "my_point", "ch_mult-1,2"]
  assert points[1].labels == {"schedule": "linear", "loss": "hybrid"}
  assert points[1].overrides == {"training.num_train_steps": 5, "diffusion.schedule": "linear",
                                 "diffusion.loss": "hybrid",
                                 "diffusion.model_var": "learned_range"}
  assert "diffusion.model_var" not in points[0].overrides
  assert points[4].overrides == {"training.num_train_steps": 5, "model.ch": 16}
  # Keys whose last parts collide keep their whole dotted name.
  clash = sweep_lib.expand({"name": "c", "config": "configs/digits.py",
                            "grid": {"training.batch_size": [8], "sampling.batch_size": [8]}})
  assert clash[0].name == "training.batch_size-8__sampling.batch_size-8"
  with pytest.raises(sweep_lib.SweepError, match="both named"):
    sweep_lib.expand({"name": "d", "config": "configs/digits.py", "grid": {"diffusion.loss": [
        {"label": "x", "diffusion.loss": "mse"}, {"label": "x", "diffusion.loss": "kl"}]}})
  with pytest.raises(sweep_lib.SweepError, match="Bad sweep definition"):
    sweep_lib.expand({"name": "e", "config": "configs/digits.py", "grids": {}})


def test_shipped_sweeps_expand_and_validate():
  default = sweep_lib.load_sweep("digits_schedules")
  full = sweep_lib.load_sweep("digits_schedules", "full")
  cifar = sweep_lib.load_sweep("cifar10_schedules")
  default_points, full_points = sweep_lib.expand(default), sweep_lib.expand(full)
  assert len(default_points) == 6 and len(full_points) == 24
  # The default points are the full grid's T=1000/mse points, workdirs and all.
  assert {p.name for p in default_points} == {
      p.name for p in full_points if p.labels["num_timesteps"] == "1000"
      and p.labels["loss"] == "mse"}
  assert [p.labels["schedule"] for p in default_points] == list(cifar10_schedules.SCHEDULES)
  for plan in sweep_lib.plan(default, default_points):
    assert plan.config.training.num_train_steps == 1500
    assert plan.config.training.final_eval_metrics == ("digits_score", "bpd")
    assert plan.config.diffusion.num_timesteps == 1000 and plan.config.diffusion.loss == "mse"
  cifar_plans = sweep_lib.plan(cifar, sweep_lib.expand(cifar))
  assert len(cifar_plans) == 24
  for plan in cifar_plans:
    learned = plan.config.diffusion.model_var == "learned_range"
    assert learned == (plan.config.diffusion.loss == "hybrid")
  with pytest.raises(sweep_lib.SweepError, match="Unknown grid"):
    sweep_lib.load_sweep("digits_schedules", "huge")
  with pytest.raises(sweep_lib.SweepError, match="shipped sweeps"):
    sweep_lib.load_sweep("no_such_sweep")


def test_cli_values_round_trip_through_config_flags():
  overrides = {"training.final_eval_metrics": ("digits_score", "bpd"),
               "model.attn_resolutions": (), "model.ch_mult": [1, 2, 2],
               "diffusion.clip_x0": False, "optim.lr": 3e-4, "optim.warmup_steps": 7,
               "diffusion.schedule": "cosine", "eval.inception_weights": "/tmp/a b.npz"}
  config = sweep_lib._module_from_file(  # pylint: disable=protected-access
      os.path.join(_REPO, "configs/digits.py"), "digits_config").get_config()
  config.lock()
  args = sweep_lib.apply_overrides(config, overrides, "test")
  assert "--config.training.final_eval_metrics=('digits_score', 'bpd')" in args
  assert "--config.model.attn_resolutions=()" in args
  assert "--config.diffusion.clip_x0=false" in args
  parsed = sweep_lib.config_from_args("configs/digits.py", args)
  assert parsed.to_dict() == config.to_dict()
  assert parsed.model.ch_mult == (1, 2, 2) and parsed.eval.inception_weights == "/tmp/a b.npz"
  # What --dry-run prints is what a shell passes on.
  command = ["python", "-m", "ddpm_jax.main", *args]
  assert shlex.split(sweep_lib.shell_join(command)) == command
  assert "--config.training.final_eval_metrics=\"('digits_score', 'bpd')\"" in (
      sweep_lib.shell_join(command))


def test_bad_point_fails_before_any_point_starts(tmp_path, capsys, no_launch):
  root = tmp_path / "runs"
  # Only the second point is bad; the first must not start either.
  points = [{"diffusion.schedule": "linear"},
            {"diffusion.schedule": "cosine", "training.num_train_stepz": 3}]
  bad = tiny_sweep(grid={}, points=points)
  assert sweep_lib.main([f"--sweep={sweep_file(tmp_path, bad)}", f"--root={root}"]) == 2
  err = capsys.readouterr().err
  assert "training.num_train_stepz" in err and "schedule-cosine__num_train_stepz-3" in err
  assert "training.num_train_steps" in err  # the valid keys are listed
  assert not root.exists() and not no_launch
  with pytest.raises(sweep_lib.SweepError, match="point 'schedule-nope'.*valid choices"):
    sweep_lib.run_sweep(tiny_sweep(grid={"diffusion.schedule": ["linear", "nope"]}),
                        root=str(root))
  with pytest.raises(sweep_lib.SweepError, match="cannot set model.ch='wide'"):
    sweep_lib.run_sweep(tiny_sweep(fixed={**TINY, "model.ch": "wide"}), root=str(root))
  assert not root.exists() and not no_launch


def test_dry_run_lists_status_and_commands(tmp_path, capsys, no_launch):
  root = tmp_path / "runs"
  path = sweep_file(tmp_path, tiny_sweep())
  (root / "tiny" / "schedule-cosine").mkdir(parents=True)
  assert sweep_lib.main([f"--sweep={path}", f"--root={root}", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "[pending] schedule-linear" in out and "[partial] schedule-cosine" in out
  commands = [line.strip() for line in out.splitlines() if "ddpm_jax.main" in line]
  assert len(commands) == 2
  argv = shlex.split(commands[0])
  assert argv[:4] == ["python", "-m", "ddpm_jax.main", "--config=configs/digits.py"]
  assert argv[4] == f"--workdir={root}/tiny/schedule-linear"
  assert "--config.training.final_eval_metrics=('digits_score',)" in argv
  assert "--config.diffusion.schedule=linear" in argv
  assert sweep_lib.main([f"--sweep={path}", f"--root={root}", "--dry-run", "--only=lin"]) == 0
  out = capsys.readouterr().out
  assert "schedule-linear" in out and "schedule-cosine" not in out
  assert not no_launch and not (root / "tiny" / "schedule-linear").exists()


def test_tpu_launch_prints_a_gcloud_command_per_point(tmp_path, capsys, no_launch):
  path = sweep_file(tmp_path, tiny_sweep())
  assert sweep_lib.main([f"--sweep={path}", "--launch=tpu", "--root=gs://bkt/sweeps"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gcloud")]
  assert len(lines) == 2 and not no_launch
  argv = shlex.split(lines[1])
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "$TPU_NAME"]
  assert "--worker=all" in argv and "--zone=$ZONE" in argv
  remote = shlex.split(argv[-1].removeprefix("--command="))
  assert remote[:7] == ["cd", "~/ddpm_jax", "&&", "python", "-m", "ddpm_jax.main",
                        "--config=configs/digits.py"]
  assert remote[7] == "--workdir=gs://bkt/sweeps/tiny/schedule-cosine"
  sweep = sweep_lib.as_sweep(tiny_sweep())
  expected = sweep_lib.plan(sweep, sweep_lib.expand(sweep))[1].config
  assert remote[-1] == "--multihost=on"  # every worker joins jax.distributed
  assert sweep_lib.config_from_args("configs/digits.py", remote[8:-1]).to_dict() == (
      expected.to_dict())


def test_failed_or_stopped_points_are_marked_and_rerun(tmp_path, monkeypatch):
  root, out = tmp_path / "runs", tmp_path / "results"
  launched = []

  def fake_launch(command, workdir, echo=True):
    """Fails linear's first run and stops cosine's first run early, as a SIGTERM does."""
    del echo
    assert command[:3] == [sys.executable, "-m", "ddpm_jax.main"]
    launched.append(os.path.basename(workdir))
    if len(launched) == 1:
      return 1
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    last = 2 if len(launched) == 2 else 4
    _write_jsonl(os.path.join(workdir, "metrics.jsonl"), [{"step": last, "loss": 1.0}])
    if last == 4:
      with open(os.path.join(workdir, "eval", "step_4.json"), "w", encoding="utf-8") as f:
        json.dump({"step": 4, "digits_frechet_distance": 1.0}, f)
    return 0

  monkeypatch.setattr(launch_lib, "launch_point", fake_launch)
  kwargs = dict(root=str(root), out=str(out), echo=False)
  assert sweep_lib.run_sweep(tiny_sweep(), **kwargs) == NAMES
  assert launched == NAMES
  status = lambda name: collate.point_status(str(root / "tiny" / name))
  assert status("schedule-linear") == "failed" and status("schedule-cosine") == "failed"
  marker = json.loads((root / "tiny" / "schedule-cosine" / sweep_lib.FAILED_MARKER).read_text())
  assert marker["returncode"] == 0 and marker["problem"] == "stopped at step 2 of 4"
  assert sweep_lib.run_sweep(tiny_sweep(), **kwargs) == []
  assert launched == NAMES * 2
  assert status("schedule-linear") == "done" and status("schedule-cosine") == "done"
  assert not (root / "tiny" / "schedule-linear" / sweep_lib.FAILED_MARKER).exists()
  assert sweep_lib.run_sweep(tiny_sweep(), **kwargs) == [] and launched == NAMES * 2


def _write_jsonl(path, records):
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_collate_resumed_partial_and_missing_points(tmp_path):
  root, out = tmp_path / "runs", tmp_path / "results"
  resumed = root / "s" / "schedule-linear"
  (resumed / "eval").mkdir(parents=True)
  # Logged to step 6, killed, resumed from the step-4 checkpoint: steps 6 and 8 logged again.
  _write_jsonl(resumed / "metrics.jsonl", [{"step": s, "loss": 100.0} for s in (2, 4, 6)])
  _write_jsonl(resumed / "metrics.jsonl", [{"step": s, "loss": float(s)} for s in (6, 8)])
  for step, fd in ((4, 9.0), (8, 3.5)):
    (resumed / "eval" / f"step_{step}.json").write_text(json.dumps(
        {"step": step, "digits_frechet_distance": fd, "samples_per_sec": 12.0}))
  (resumed / sweep_lib.DONE_MARKER).write_text("{}")
  sweep = sweep_lib.as_sweep(tiny_sweep(name="s"))
  plans = sweep_lib.plan(sweep, sweep_lib.expand(sweep))
  paths = sweep_lib.collate_sweep(sweep, plans, str(root), str(out))
  assert sorted(os.path.basename(p) for p in paths) == sorted(
      ["s.md", "s.csv", "s_log_snr.png", "s_loss_curves.png", "s_metrics.png"])
  with open(out / "s.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == NAMES
  linear, cosine = rows
  assert linear["schedule"] == "linear" and linear["status"] == "done"
  assert linear["steps"] == "8"
  assert float(linear["final_loss"]) == pytest.approx((100 + 100 + 6 + 8) / 4)
  assert float(linear["digits_frechet_distance"]) == 3.5 and linear["bpd_total"] == "-"
  assert cosine["status"] == "pending"
  missing = ("steps", "final_loss", "digits_frechet_distance", "samples_per_sec")
  assert {cosine[k] for k in missing} == {"-"}
  md = (out / "s.md").read_text()
  assert "| linear | done | 8 |" in md and "| cosine | pending | - |" in md


def test_end_to_end_writes_results_and_rerun_skips(tmp_path, monkeypatch, capsys):
  root, out = tmp_path / "runs", tmp_path / "results"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compiles about twice as fast
  args = [f"--sweep={sweep_file(tmp_path, tiny_sweep())}", f"--root={root}", f"--out={out}",
          "--quiet"]
  assert sweep_lib.main(args) == 0, capsys.readouterr()
  for name in NAMES:
    workdir = root / "tiny" / name
    assert (workdir / sweep_lib.DONE_MARKER).exists()
    assert "step 4/4" in (workdir / sweep_lib.LOG_FILE).read_text()
    # The subprocess parsed the tuple overrides from the command line as intended.
    config = json.loads((workdir / "config.json").read_text())
    assert config["training"]["final_eval_metrics"] == ["digits_score"]
    assert config["model"]["ch_mult"] == [1] and config["model"]["attn_resolutions"] == []
    assert config["diffusion"]["schedule"] == name.split("-")[1]
  with open(out / "tiny.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == NAMES
  for row in rows:
    assert row["status"] == "done" and row["steps"] == "4"
    assert float(row["digits_frechet_distance"]) > 0
    assert 1 <= float(row["digits_inception_score"]) <= 10
    assert float(row["samples_per_sec"]) > 0 and float(row["final_loss"]) > 0
  md = (out / "tiny.md").read_text()
  assert "digits FD" in md and "| linear | done | 4 |" in md and "| cosine | done | 4 |" in md
  for kind in ("log_snr", "loss_curves", "metrics"):
    assert (out / f"tiny_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  capsys.readouterr()
  monkeypatch.setattr(launch_lib, "launch_point",
                      lambda *a, **k: pytest.fail("a finished point was run again"))
  assert sweep_lib.main(args) == 0
  assert capsys.readouterr().out.count("done, skipped") == 2


def test_sampler_sweep_covers_every_sampler_with_honest_nfe():
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  sweep = sweep_lib.load_sweep("digits_samplers")
  assert sweep.checkpoint == "runs/digits" and sweep.plot["x"] == "sampler_nfe"
  plans = sweep_lib.plan(sweep, sweep_lib.expand(sweep))
  assert len(plans) == len(digits_samplers.FEW_STEP_SAMPLERS) * len(digits_samplers.NFES) + 1
  calls = {}
  for p in plans:
    s = p.config.sampling
    assert p.config.eval.metrics == ("digits_score",) and s.num_samples == 500
    # What the eval report will print as sampler_nfe: the model calls the sampler makes.
    calls.setdefault(s.sampler, []).append(factories.sampler_nfe(p.config))
  assert set(calls) == set(sampling.SAMPLERS)  # a new sampler must join the sweep
  assert calls["ancestral"] == [1000]
  for name in digits_samplers.FEW_STEP_SAMPLERS:
    if name in ("heun", "edm_stochastic"):  # the most calls within each budget: at 100, 51
      assert calls[name] == [4, 10, 20, 50, 99]  # points make 99 (two steps start above 80)
    else:
      assert calls[name] == list(digits_samplers.NFES)


@pytest.mark.parametrize("objective", ["eps", "v", "edm", "flow"])
def test_objectives_sweep_scores_each_model_as_it_was_trained_within_each_budget(objective):
  """Each objective's eval points read the run as its parameterisation (a mismatch would be
  refused at load) and make the most model calls within each budget, never more."""
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  from experiments.sweeps import digits_objectives  # pylint: disable=g-import-not-at-top
  train_sweep = sweep_lib.load_sweep("digits_objectives")
  train = sweep_lib.plan(train_sweep, sweep_lib.expand(train_sweep))
  trained = {p.point.name: p.config.diffusion for p in train}
  sweep = sweep_lib.load_sweep("digits_objectives", objective)
  assert sweep.checkpoint == f"{digits_objectives.ROOT}/{objective}"
  plans = sweep_lib.plan(sweep, sweep_lib.expand(sweep))
  assert len(plans) == len(digits_objectives.NFES) * len(digits_objectives.SAMPLERS)
  for p in plans:
    d, s = p.config.diffusion, p.config.sampling
    assert (d.parameterization, d.model_output) == (trained[objective].parameterization,
                                                     trained[objective].model_output)
    budget = int(p.point.name.rsplit("nfe", 1)[1])
    calls = factories.sampler_nfe(p.config)
    assert calls <= budget
    more = sampling.nfe(s.sampler, s.num_steps + 1, factories.tables_from_config(p.config),
                        s.grid)
    assert more > budget, (p.point.name, calls, more)


def _sample_only_sweep(run, **fields) -> dict:
  return {"name": "so", "config": "configs/digits.py",
          "fixed": {**TINY, "eval.metrics": ("digits_score",)},
          "points": [{"name": "ddim-2", "sampling.sampler": "ddim", "sampling.num_steps": 2},
                     {"name": "heun-2", "sampling.sampler": "heun", "sampling.num_steps": 2}],
          "checkpoint": str(run),
          "plot": {"x": "sampler_nfe", "y": "digits_frechet_distance", "series": "sampler",
                   "floor": "digits_frechet_distance_floor"}, **fields}


def test_sample_only_sweep_evaluates_the_shared_checkpoint(tmp_path, monkeypatch, capsys):
  run, root, out = tmp_path / "trained", tmp_path / "runs", tmp_path / "results"
  sweep = _sample_only_sweep(run)
  with pytest.raises(sweep_lib.SweepError, match="no checkpoints; train it first"):
    sweep_lib.run_sweep(sweep, root=str(root), out=str(out), echo=False)
  with pytest.raises(sweep_lib.SweepError, match="--launch=local"):
    sweep_lib.run_sweep(sweep, root=str(root), launch="tpu")
  (run / "checkpoints" / "7").mkdir(parents=True)
  launched = []

  def fake_eval(command, workdir, echo=True):
    del echo
    launched.append(command)
    # The shared run's checkpoints are read through the point's own workdir.
    assert os.path.realpath(os.path.join(workdir, "checkpoints")) == str(
        (run / "checkpoints").resolve())
    nfe = 3 if "heun" in workdir else 2
    os.makedirs(os.path.join(workdir, "eval"))
    with open(os.path.join(workdir, "eval", "step_7.json"), "w", encoding="utf-8") as f:
      json.dump({"step": 7, "sampler_nfe": nfe, "digits_frechet_distance": 10.0 * nfe,
                 "digits_frechet_distance_floor": 5.0}, f)
    return 0

  monkeypatch.setattr(launch_lib, "launch_point", fake_eval)
  assert sweep_lib.run_sweep(sweep, root=str(root), out=str(out), echo=False) == []
  assert len(launched) == 2
  for command in launched:
    assert command[3] == "--mode=eval" and command.count("--mode=eval") == 1
  assert sorted(os.listdir(run)) == ["checkpoints"]  # nothing written into the shared run
  assert sweep_lib.run_sweep(sweep, root=str(root), out=str(out), echo=False) == []
  assert len(launched) == 2  # done points are skipped
  with open(out / "so.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["sampler"], r["sampler_nfe"], r["digits_frechet_distance_floor"]) for r in rows] == [
      ("ddim", "2", "5"), ("heun", "3", "5")]
  assert "steps" not in rows[0] and "final_loss" not in rows[0]
  assert (out / "so_lines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (out / "so_loss_curves.png").exists()
  capsys.readouterr()
  # --checkpoint swaps the run; a training sweep refuses it.
  assert sweep_lib.main([f"--sweep={sweep_file(tmp_path, tiny_sweep())}", "--dry-run",
                         f"--checkpoint={run}"]) == 2
  assert "only a sample-only sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_only_sweep_end_to_end(tmp_path, monkeypatch):
  """Trains one tiny point, then samples it twice with --mode=eval and no training."""
  root, out = tmp_path / "runs", tmp_path / "results"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  trained = tiny_sweep(grid={}, points=[{"name": "base"}])
  assert sweep_lib.run_sweep(trained, root=str(root), out=str(out), echo=False) == []
  run = root / "tiny" / "base"
  checkpoints = sorted(os.listdir(run / "checkpoints"))
  assert sweep_lib.run_sweep(_sample_only_sweep(run), root=str(root), out=str(out),
                             echo=False) == []
  assert sorted(os.listdir(run / "checkpoints")) == checkpoints
  with open(out / "so.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["sampler"], r["status"], r["sampler_nfe"]) for r in rows] == [
      ("ddim", "done", "2"), ("heun", "done", "3")]
  for r in rows:
    assert 0 < float(r["digits_frechet_distance_floor"]) < float(r["digits_frechet_distance"])
  for point in ("ddim-2", "heun-2"):
    report = json.loads((root / "so" / point / "eval" / "step_4.json").read_text())
    assert report["num_samples"] == 8 and report["digits_fd_num_images"] == 8


def test_log_snr_plot_draws_log_abar_over_one_minus_abar(tmp_path, monkeypatch):
  """What the schedule sweep's log-SNR figure plots, intercepted at `Axes.plot`: for each
  schedule, x = t/T for t = 1..T and y = log(abar_t / (1 - abar_t)) (-inf at a zero terminal
  SNR), not some multiple of it."""
  import types  # pylint: disable=g-import-not-at-top

  from matplotlib.axes import Axes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax.core import schedules  # pylint: disable=g-import-not-at-top
  drawn = []
  real_plot = Axes.plot
  monkeypatch.setattr(Axes, "plot", lambda ax, x, y, **kw: (drawn.append((kw["label"], x, y)),
                                                             real_plot(ax, x, y, **kw))[1])
  entry = lambda name, zero: types.SimpleNamespace(config=types.SimpleNamespace(
      diffusion=types.SimpleNamespace(schedule=name, num_timesteps=100, zero_terminal_snr=zero)))
  collate.plot_log_snr([entry("linear", False), entry("cosine", False), entry("cosine", True)],
                       str(tmp_path / "p.png"))
  assert [label for label, _, _ in drawn] == ["linear", "cosine", "cosine (zero SNR)"]
  for (_, x, y), (name, zero) in zip(drawn, [("linear", False), ("cosine", False),
                                             ("cosine", True)]):
    abar = np.cumprod(1.0 - schedules.get_beta_schedule(name, 100, zero))
    with np.errstate(divide="ignore"):
      expected = np.log(abar) - np.log1p(-abar)
    np.testing.assert_allclose(x, np.arange(1, 101) / 100)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)
  # An EDM point (its schedule unused) is drawn as the ladder it samples on: -2 log sigma.
  from ddpm_jax.core import denoisers  # pylint: disable=g-import-not-at-top
  drawn.clear()
  edm = types.SimpleNamespace(config=types.SimpleNamespace(diffusion=types.SimpleNamespace(
      schedule="linear", num_timesteps=100, zero_terminal_snr=False, parameterization="edm",
      sigma_min=0.002, sigma_max=80.0)))
  collate.plot_log_snr([edm], str(tmp_path / "q.png"))
  ((label, _, y),) = drawn
  assert label == "EDM ladder"
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             -2 * np.log(denoisers.edm_sigmas(100)), rtol=1e-4, atol=1e-4)
  assert (tmp_path / "p.png").exists()


def test_objectives_table_takes_the_lowest_fd_sampler_of_each_budget(tmp_path):
  from experiments import objectives  # pylint: disable=g-import-not-at-top
  rows = {"edm": [
      {"point": "heun-nfe10", "sampler": "heun", "sampler_nfe": "9", "status": "done",
       "digits_frechet_distance": "80.5"},
      {"point": "dpm_solver_pp-nfe10", "sampler": "dpm_solver_pp", "sampler_nfe": "10",
       "status": "done", "digits_frechet_distance": "70.25"},
      {"point": "dpm_solver_pp-nfe50", "sampler": "dpm_solver_pp", "sampler_nfe": "50",
       "status": "done", "digits_frechet_distance": "-"},
      {"point": "heun-nfe50", "sampler": "heun", "sampler_nfe": "49", "status": "done",
       "digits_frechet_distance": "60.0"}]}
  best = objectives.best_rows(rows)
  assert [(r["budget"], r["sampler"], r["digits_frechet_distance"]) for r in best] == [
      (10, "dpm_solver_pp", "70.25"), (50, "heun", "60.0")]
  for objective, mine in rows.items():
    with open(tmp_path / f"digits_objectives_{objective}.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(mine[0]))
      writer.writeheader()
      writer.writerows(mine)
  assert objectives.main([f"--out={tmp_path}"]) == 0
  table = (tmp_path / "digits_objectives_best.md").read_text()
  assert "| EDM (Karras et al. 2022) | 10 | dpm_solver_pp | 10 | 70.2 |" in table
  assert (tmp_path / "digits_objectives_best.png").stat().st_size > 0


def test_schedule_ablation_scores_each_checkpoint_with_ddim_and_heun(tmp_path):
  """The heun-<schedule> sweeps sample the trained point of that schedule with the most Heun
  points within 50 calls; the two-sampler table joins both scores per schedule."""
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  from experiments import schedules  # pylint: disable=g-import-not-at-top
  from experiments.sweeps import digits_schedules  # pylint: disable=g-import-not-at-top
  trained = sweep_lib.load_sweep("digits_schedules")
  names = {p.name for p in sweep_lib.expand(trained)}
  for schedule in ("linear", "cosine"):
    sweep = sweep_lib.load_sweep("digits_schedules", f"heun-{schedule}")
    assert sweep.checkpoint.rsplit("/", 1)[1] in names
    (plan,) = sweep_lib.plan(sweep, sweep_lib.expand(sweep))
    s, tables = plan.config.sampling, factories.tables_from_config(plan.config)
    assert plan.config.diffusion.schedule == schedule and s.sampler == "heun"
    assert sampling.nfe("heun", s.num_steps, tables, s.grid) <= 50
    assert sampling.nfe("heun", s.num_steps + 1, tables, s.grid) > 50
  assert trained.fixed["sampling.sampler"] == "ddim" and trained.fixed["sampling.num_steps"] == 50
  with open(tmp_path / "digits_schedules.csv", "w", newline="") as f:
    f.write("point,schedule,status,bpd_total,sampler_nfe,digits_frechet_distance,"
            "digits_frechet_distance_floor,digits_mean_confidence\n"
            f"{digits_schedules.point_name('cosine')},cosine,done,4.5,50,30.0,20.0,0.9\n")
  with open(tmp_path / "digits_schedules_heun_cosine.csv", "w", newline="") as f:
    f.write("point,status,sampler_nfe,digits_frechet_distance,digits_mean_confidence\n"
            "heun,done,50,25.5,0.95\n")
  assert schedules.main([f"--out={tmp_path}"]) == 0
  table = (tmp_path / "digits_schedules_samplers.md").read_text()
  assert "| cosine | 4.500 | 50 | 30.0 | 0.900 | 50 | 25.5 | 0.950 | 20.0 |" in table
