"""Orbax checkpoints of the train state together with the data iterator, and preemption.

A checkpoint is one step directory holding two items: `state` (the TrainState, written by
every process for its shards) and `data` (each process's grain iterator position). Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the newest complete one; `latest_step()` never returns a partial save.
"""

import signal
import threading

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.train_state import TrainState


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints; a cloud path (gs://...) stays one, so every host sees one directory."""
  path = epath.Path(workdir)
  return (path if "://" in str(workdir) else path.resolve()) / "checkpoints"


def create_manager(workdir: str, *, max_to_keep: int | None = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter=None) -> None:
  step = int(jax.device_get(state.step))
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, target: TrainState, data_iter=None,
            step: int | None = None) -> TrainState:
  """Restores the newest (or given) step into `target`'s structure and shardings.

  `data_iter`, when given, is moved in place to the position it had at that step.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  items = {"state": ocp.args.StandardRestore(abstract)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def restore_params(workdir: str, target: TrainState, use_ema: bool = True):
  """Params (EMA by default) of the newest checkpoint, for sampling and evaluation."""
  manager = create_manager(workdir, max_to_keep=None, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {checkpoint_dir(workdir)}; train first with --mode=train "
        f"--workdir={workdir}.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  state = state["state"]
  manager.close()
  return (state.ema_params if use_ema else state.params), step


class PreemptionGuard:
  """Turns SIGTERM into a flag that the train loop polls; restores the old handler on exit.

  Every process must stop at the same step to save together, so the loop agrees on the flag
  through the train step's collectives (see `train.py`), not through this local flag alone.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def local_flags(self, num_local_devices: int) -> np.ndarray:
    return np.full((num_local_devices,), self.requested, np.bool_)
