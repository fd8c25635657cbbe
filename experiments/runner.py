"""Running a sweep: each point in turn, its done/failed marker, then the results table.

A point whose subprocess exits 0 and leaves its final evaluation gets a `sweep_done.json` marker
and is skipped from then on; any other point is simply run again, and `train_and_evaluate`
resumes it from its newest checkpoint. A sample-only sweep (`Sweep.checkpoint`) trains nothing:
each point links the shared run's checkpoints into its own workdir and runs `--mode=eval` there,
so its report lands in its own eval/ and the shared run is only read. The results table and
plots (`experiments.collate`) are written at the end.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import json
import os
import sys
import time
from typing import Any

from etils import epath
import ml_collections

from experiments import collate
from experiments import launch as launch_lib
from experiments.points import Plan
from experiments.points import Sweep
from experiments.points import SweepError
from experiments.points import as_sweep
from experiments.points import expand
from experiments.points import plan

DEFAULT_ROOT = "runs/sweeps"
DEFAULT_OUT = "experiments/results"
DONE_MARKER = collate.DONE_MARKER
FAILED_MARKER = collate.FAILED_MARKER


def unfinished(workdir: str, config: ml_collections.ConfigDict,
               sample_only: bool = False) -> str | None:
  """Why a run is not finished, or None. (On SIGTERM train.py saves and exits 0 early.)"""
  if sample_only:  # `--mode=eval` writes eval/step_<N>.json of the shared checkpoint's step
    return None if collate.latest_eval(workdir) else "no evaluation written"
  records = collate.read_metrics(workdir)
  step, target = (records[-1]["step"] if records else 0), config.training.num_train_steps
  if step < target:
    return f"stopped at step {step} of {target}"
  if (config.training.final_eval_metrics
      and not (epath.Path(workdir) / "eval" / f"step_{target}.json").exists()):
    return "no final evaluation"
  return None


def _run_point(sweep: Sweep, command: list[str], workdir: str, plan_: Plan,
               echo: bool) -> str | None:
  """Runs a point and marks its workdir; returns why it did not finish, or None."""
  start = time.time()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if sweep.checkpoint:
    launch_lib.link_checkpoint(sweep.checkpoint, workdir)
  rc = launch_lib.launch_point(command, workdir, echo=echo)
  problem = (f"exit status {rc}" if rc
             else unfinished(workdir, plan_.config, sample_only=bool(sweep.checkpoint)))
  record = {"returncode": rc, "problem": problem, "seconds": round(time.time() - start, 1),
            "finished": time.time(), "command": command, "overrides": dict(plan_.point.overrides)}
  done, failed = epath.Path(workdir) / DONE_MARKER, epath.Path(workdir) / FAILED_MARKER
  (failed if problem else done).write_text(json.dumps(record, indent=2, default=str))
  if not problem and failed.exists():
    failed.unlink()
  return problem


def collate_sweep(sweep: Sweep, plans: Sequence[Plan], root: str, out: str) -> list[str]:
  entries = []
  for p in plans:
    workdir = launch_lib.point_workdir(root, sweep, p.point)
    entries.append(collate.Entry(p.point.name, p.point.labels, workdir, p.config))
  paths = collate.collate(sweep.name, sweep.config, sweep.fixed, entries, out,
                          sample_only=bool(sweep.checkpoint), plot=sweep.plot)
  print(f"Results: {', '.join(paths)}")
  return paths


def run_sweep(sweep: Sweep | Mapping[str, Any], *, root: str = DEFAULT_ROOT,
              out: str = DEFAULT_OUT, only: Sequence[str] = (), dry_run: bool = False,
              launch: str = "local", collate_only: bool = False, tpu_name: str = "$TPU_NAME",
              zone: str = "$ZONE", echo: bool = True) -> list[str]:
  """Validates every point, then lists, prints, runs and/or collates them.

  Returns:
    The names of the points run in this call that did not finish.
  """
  sweep = as_sweep(sweep)
  plans = plan(sweep, expand(sweep))
  if collate_only:
    collate_sweep(sweep, plans, root, out)
    return []
  selected = [p for p in plans if not only or any(s in p.point.name for s in only)]
  if not selected:
    raise SweepError(f"--only={list(only)} matches none of {[p.point.name for p in plans]}.")
  if launch == "tpu":
    if sweep.checkpoint:
      raise SweepError(f"Sweep {sweep.name!r} evaluates the local checkpoint "
                       f"{sweep.checkpoint}; run it with --launch=local.")
    if "://" not in root:
      print(f"# Warning: --root={root} is not a bucket; multi-host checkpoints need a workdir "
            "every worker shares, e.g. --root=gs://BUCKET/sweeps.", file=sys.stderr)
    for p in selected:
      command = launch_lib.point_command(
          sweep, p, launch_lib.point_workdir(root, sweep, p.point, local=False))
      print(f"# {p.point.name}\n{launch_lib.tpu_command(command, tpu_name, zone)}")
    return []
  if launch != "local":
    raise SweepError(f"Unknown --launch={launch!r}; valid: ['local', 'tpu'].")
  if sweep.checkpoint and "://" in root:
    raise SweepError(f"A sample-only sweep links {sweep.checkpoint} into each point's workdir; "
                     f"give it a local --root, not {root}.")
  if (sweep.checkpoint and not dry_run
      and not os.path.isdir(launch_lib.checkpoint_dir(sweep.checkpoint))):
    raise SweepError(f"Sweep {sweep.name!r} evaluates the run in {sweep.checkpoint}, which has "
                     "no checkpoints; train it first: python -m ddpm_jax.main "
                     f"--config={sweep.config} --workdir={sweep.checkpoint}")
  kind = f"sample-only on {sweep.checkpoint}" if sweep.checkpoint else f"base {sweep.config}"
  print(f"Sweep {sweep.name}: {len(selected)} of {len(plans)} points, {kind}; "
        f"commands run from {launch_lib.REPO_ROOT}.")
  failed = []
  for i, p in enumerate(selected):
    workdir = launch_lib.point_workdir(root, sweep, p.point)
    status = collate.point_status(workdir)
    command = launch_lib.point_command(sweep, p, workdir)
    if dry_run:
      print(f"[{status}] {p.point.name}\n  {launch_lib.shell_join(command)}")
      continue
    if status == "done":
      print(f"[{i + 1}/{len(selected)}] {p.point.name}: done, skipped.")
      continue
    log = os.path.join(workdir, launch_lib.LOG_FILE)
    print(f"[{i + 1}/{len(selected)}] {p.point.name} ({status}); log: {log}", flush=True)
    problem = _run_point(sweep, [sys.executable, *command[1:]], workdir, p, echo)
    if problem:
      failed.append(p.point.name)
      print(f"[{i + 1}/{len(selected)}] {p.point.name} FAILED ({problem}); see {log}",
            flush=True)
  if not dry_run:
    collate_sweep(sweep, plans, root, out)
    if failed:
      print(f"{len(failed)} point(s) failed: {failed}", file=sys.stderr)
  return failed
