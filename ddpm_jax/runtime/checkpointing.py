"""Orbax checkpoints of the train state together with the data iterator, and preemption.

A checkpoint is one step directory holding two items: `state` (the TrainState, written by
every process for its shards) and `data` (the global data-iterator position, one JSON file
written by process 0), so any number of processes can restore it. Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the newest complete one; `latest_step()` never returns a partial save.

This module also owns what happens when a checkpoint does not restore (it is moved aside to
`<step>.corrupt-<reason>-<tag>`, a name of its own, never deleted, and the next newest is
tried), the params-only restore of sample/eval, and the preemption guard (JAX's preemption sync
point, or SIGTERM).
"""

import dataclasses
import logging as py_logging
import secrets
import signal
import threading
import time

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib

from ddpm_jax.runtime.train_state import TrainState

# Exit status of a run stopped by SIGTERM after saving: EX_TEMPFAIL from <sysexits.h>, "try
# again later". A job wrapper restarts on 75 and stops on 0 (finished) or anything else (failed).
EXIT_PREEMPTED = 75


# The data item's one file: input_pipeline.TrainIterator.get_state() as JSON.
DATA_FILE = "iterator.json"

# Marks a workdir written by `python -m ddpm_jax.import_checkpoint` (params and EMA params only, no
# optimiser state): one samples it, or fine-tunes it with training.init_from, but never resumes it.
IMPORTED_FILE = "imported.json"


class NoRestorableCheckpointError(RuntimeError):
  pass


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints; a cloud path (gs://...) stays one, so every host sees one directory."""
  path = epath.Path(workdir)
  return (path if "://" in str(workdir) else path.resolve()) / "checkpoints"


class KeepRegular(preservation_lib.PreservationPolicy):
  """Keeps the newest `n` checkpoints at multiples of `every`, plus the newest of all.

  An off-schedule (preemption or final) checkpoint is kept while it is the newest, and never
  counts against `n`, so it cannot push a regular checkpoint out.
  """

  def __init__(self, n: int, every: int):
    self.n, self.every = n, every

  def should_preserve(self, checkpoints, *, context):
    regular = [i for i, c in enumerate(checkpoints) if c.step % self.every == 0]
    keep = set(regular[-self.n:]) | ({len(checkpoints) - 1} if checkpoints else set())
    return [i in keep for i in range(len(checkpoints))]


def create_manager(workdir: str, *, keep: int | None = 3, every: int = 1,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping `keep` regular checkpoints (multiples of `every`); None keeps all."""
  policy = (preservation_lib.LatestN(n=None) if keep is None else KeepRegular(keep, every))
  # A kill mid-save leaves `<step>.orbax-checkpoint-tmp`: Orbax deletes such folders when a
  # writing manager opens (before its first save). On a bucket a partial step is a folder without
  # commit_success.txt, which a later save of that step replaces; it is left alone there, so
  # that nothing can race with moving a broken checkpoint aside.
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only, preservation_policy=policy,
      cleanup_tmp_directories=not read_only and "://" not in str(workdir))
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
  registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  # One JSON file, written by process 0: the iterator state is global (input_pipeline).
  data_handler = ocp.handlers.JsonCheckpointHandler(DATA_FILE)
  registry.add("data", ocp.args.JsonSave, data_handler)
  registry.add("data", ocp.args.JsonRestore, data_handler)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, handler_registry=registry)


def _state_item(state: TrainState, keep_none_phema: bool = False) -> dict:
  """The state's pytree fields as the `state` item stores them, {field: subtree}.

  `phema` is left out when post-hoc EMA is off (None), so such a run writes, and restores, the
  very tree it wrote before the field existed: old checkpoints restore unchanged.
  `keep_none_phema` keeps it as None: the target of a TrainState that Orbax stored whole.
  """
  item = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get("pytree_node", True)}
  if item["phema"] is None and not keep_none_phema:
    del item["phema"]
  return item


class CheckpointReadError(ValueError):
  """A checkpoint's files are missing or damaged; the message names them and says what is wrong."""


def _state_problem(path: epath.Path) -> str:
  """Why the `state` item at `path` has no readable tree metadata, in words."""
  if not path.exists():
    return f"{path} is missing"
  if not (path / "_METADATA").exists():
    return f"{path / '_METADATA'} (the item's tree structure) is missing"
  # The OCDBT array store's indexes: the item's own, and one per writing process. (A bucket
  # path takes no recursive glob.)
  manifests = [p for p in (path / "manifest.ocdbt", *(d / "manifest.ocdbt" for d in
                                                     path.glob("ocdbt.process_*")))
               if p.exists()]
  if not manifests:
    return f"{path} holds no manifest.ocdbt (the index of its array store)"
  empty = [str(p) for p in manifests if not p.read_bytes()]  # an index is a few KB
  if len(empty) == 1:
    return f"{empty[0]} (the index of the array store) is empty"
  if empty:
    return f"{', '.join(empty)} (the indexes of the array store) are empty"
  return f"the tree metadata in {path / '_METADATA'} is unreadable or damaged"


def tree_metadata(path: epath.Path) -> dict:
  """The tree of a `state` item's metadata ({field: subtree}), from Orbax's metadata only.

  Raises:
    CheckpointReadError: naming the file that is missing or damaged.
  """
  path = epath.Path(path)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
  except FileNotFoundError as error:
    raise CheckpointReadError(f"{path}: a file is missing ({_reason(error)})") from None
  finally:
    checkpointer.close()
  item = getattr(metadata, "item_metadata", None)
  tree = getattr(item, "tree", None)
  if tree is None:
    raise CheckpointReadError(_state_problem(path))
  return tree


def _stores_phema(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step`'s state tree has a `phema` entry (Orbax's metadata only)."""
  path = epath.Path(manager.directory) / str(step) / "state"
  return "phema" in tree_metadata(path)


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter=None) -> None:
  step = int(jax.device_get(state.step))
  items = {"state": ocp.args.StandardSave(_state_item(state))}
  if data_iter is not None:
    items["data"] = ocp.args.JsonSave(data_iter.get_state())
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(manager: ocp.CheckpointManager, target: TrainState, data_iter=None,
            step: int | None = None) -> TrainState:
  """Restores the newest (or given) step into `target`'s structure and shardings.

  `data_iter`, when given, is moved in place to the position it had at that step.
  """
  step = manager.latest_step() if step is None else step
  # Post-hoc EMA off: a checkpoint may hold no `phema` (as `save` writes) or a None one (a
  # TrainState stored whole); with it on, check_resume has made sure the checkpoint tracks it.
  keep_none = target.phema is None and _stores_phema(manager, step)
  items = {"state": ocp.args.StandardRestore(_abstract(_state_item(target, keep_none)))}
  legacy = data_iter is not None and _per_process_data(manager, step)
  if data_iter is not None and not legacy:
    items["data"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if legacy:
    # Written before the global data order (one grain iterator per process): the positions
    # cannot be mapped onto the new order, so the stream goes on at the global batch this
    # step would have drawn in it, which any process count can do.
    logging.warning("Checkpoint step %d stores one data-iterator state per process (written "
                    "before the topology-free data order); resuming the data stream at global "
                    "batch %d of the new order. The batches from here on differ from those the "
                    "old run would have drawn; start a fresh workdir to avoid mixing orders.",
                    step, step)
    data_iter.set_state({**data_iter.get_state(), "position": step})
  elif data_iter is not None:
    data_iter.set_state(restored["data"])
  fields = dict(restored["state"])
  if fields.get("phema") is not None:
    fields["phema"] = tuple(fields["phema"])
  return target.replace(**fields)


def _per_process_data(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether the step's data item is the old per-process grain format (process_i-of-n.json)."""
  data_dir = epath.Path(manager.directory) / str(step) / "data"
  return data_dir.exists() and any(p.name.startswith("process_") for p in data_dir.iterdir())


def _reason(error: BaseException) -> str:
  """A one-line, library-free summary of why a restore failed."""
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  text = text.split(" See full TensorStore details")[0]
  return text[:200]


def _describe_failure(step_dir: epath.Path, error: BaseException) -> str:
  """Why checkpoint `step_dir` did not restore, in words, naming the file at fault if known."""
  if isinstance(error, CheckpointReadError):
    return str(error)
  if isinstance(error, FloatingPointError):
    return f"{step_dir}: the restored state is not finite ({_reason(error)})"
  try:  # the tree metadata first: without it Orbax fails with a structure error
    tree_metadata(step_dir / "state")
  except CheckpointReadError as problem:
    return str(problem)
  except Exception:  # pylint: disable=broad-except
    pass
  text = _reason(error)
  if isinstance(error, FileNotFoundError):
    return text if str(step_dir) in text else f"{step_dir}: a file is missing ({text})"
  if "reading array" in text:
    return (f"{step_dir / 'state'}: an array cannot be read, a data file of the array store is "
            f"truncated or damaged ({text})")
  return f"{step_dir}: {text}"


def _slug(error: BaseException, reason: str = "") -> str:
  """The `<reason>` of `<step>.corrupt-<reason>-<tag>`."""
  if isinstance(error, FileNotFoundError) or " is missing" in reason:
    return "missing-file"
  if isinstance(error, FloatingPointError):
    return "nonfinite"
  return "unreadable"


def _aside_path(path: epath.Path, step: int, slug: str) -> epath.Path:
  """`<step>.corrupt-<reason>-<tag>`: the tag (UTC time, random part) is new at every call, so a
  step that breaks again after being rewritten is moved aside beside the first, not onto it.

  Every process must agree on the name (process 0 renames, the others wait): the tag comes from
  a broadcast when there are several.
  """
  tag = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    codes = np.frombuffer(tag.encode("ascii"), np.uint8)
    tag = bytes(multihost_utils.broadcast_one_to_all(codes)).decode("ascii")
  return path.parent / f"{step}.corrupt-{slug}-{tag}"


class _Quiet:
  """Silences asyncio's "Event loop is closed" and Orbax's error logs while a restore is tried."""

  _NAMES = ("asyncio", "absl", "orbax")

  def __enter__(self):
    self._saved = [(py_logging.getLogger(n), py_logging.getLogger(n).level) for n in self._NAMES]
    for logger, _ in self._saved:
      logger.setLevel(py_logging.CRITICAL)
    return self

  def __exit__(self, *exc):
    for logger, level in self._saved:
      logger.setLevel(level)
    return False


def restore_newest_good(manager: ocp.CheckpointManager, target: TrainState, data_iter=None,
                        check=None):
  """Restores the newest checkpoint that restores; moves each broken newer one aside.

  A checkpoint that fails to restore (a truncated or missing file, a missing iterator state)
  is logged in one line (the file that is missing or damaged, in words) and renamed to
  `<step>.corrupt-<reason>-<tag>`, outside Orbax's step names, so the next newest becomes the
  newest; the tag makes each such name new, however often the same step breaks.
  `check(state)` may reject a restored state too.

  Returns:
    (state, step), or (None, None) when the directory holds no checkpoint at all.
  Raises:
    NoRestorableCheckpointError: listing every checkpoint tried and why it failed.
  """
  failures = []
  while (step := manager.latest_step()) is not None:
    try:
      with _Quiet():
        state = restore(manager, target, data_iter, step=step)
      if check is not None:
        check(state)
      return state, step
    except Exception as error:  # pylint: disable=broad-except
      path = epath.Path(manager.directory) / str(step)
      with _Quiet():
        reason = _describe_failure(path, error)
      aside = _aside_path(path, step, _slug(error, reason))
      failures.append(f"step {step}: {reason} (moved to {aside})")
      logging.warning("Checkpoint %s does not restore (%s); moving it to %s and trying the next "
                      "newest.", path, reason, aside)
      if jax.process_index() == 0:
        path.rename(aside)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"corrupt_checkpoint_{step}")
      manager.reload()
  if failures:
    raise NoRestorableCheckpointError(
        f"No checkpoint in {manager.directory} restores; each was moved aside:\n  " +
        "\n  ".join(failures) + "\nDelete the workdir's checkpoints to start over, or restore a "
        "backup.")
  return None, None


def _shape_mismatches(stored, expected) -> list[str]:
  """'path: stored (..) vs config (..)' for every param leaf whose shape or presence differs."""
  flat_stored = {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ()))
                 for p, v in jax.tree_util.tree_leaves_with_path(stored)}
  flat_expected = {jax.tree_util.keystr(p): tuple(v.shape)
                   for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  out = []
  for key in sorted(flat_stored.keys() | flat_expected.keys()):
    a, b = flat_stored.get(key, "absent"), flat_expected.get(key, "absent")
    if a != b:
      out.append(f"{key}: checkpoint {a} vs config {b}")
  return out


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step in `workdir`, None if it has none (reads, never creates)."""
  with _Quiet():  # Orbax warns that a read-only manager is read-only
    manager = create_manager(workdir, keep=None, read_only=True)
    step = manager.latest_step()
    manager.close()
  return step


def all_steps(workdir: str) -> list[int]:
  """Every checkpoint step in `workdir`, oldest first (reads, never creates)."""
  with _Quiet():
    manager = create_manager(workdir, keep=None, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
  return steps


def check_params(workdir: str, abstract_params, use_ema: bool = True, hint: str = "",
                 step: int | None = None) -> int:
  """Checks, from Orbax's metadata alone (no array is read), that checkpoint `step` (default: the
  newest) of `workdir` holds `ema_params` (or `params`) of `abstract_params`'s shapes; returns
  the step.

  Raises:
    FileNotFoundError: when `workdir` has no checkpoint.
    ValueError: naming the leaves whose shapes differ, and `hint` (the config fields that
      differ from the run's config.json).
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {checkpoint_dir(workdir)}; train first with --mode=train "
        f"--workdir={workdir}.")
  name = "ema_params" if use_ema else "params"
  path = checkpoint_dir(workdir) / str(step) / "state"
  with _Quiet():  # checkpoints written before Orbax's metadata file was added warn
    tree = tree_metadata(path)
  if name not in tree:
    raise ValueError(f"The checkpoint at step {step} in {checkpoint_dir(workdir)} holds no "
                     f"{name!r} (it has {sorted(tree)}).")
  stored = tree[name]
  mismatches = _shape_mismatches(stored, abstract_params)
  if mismatches:
    raise ValueError(
        f"The checkpoint at step {step} in {checkpoint_dir(workdir)} was trained with different "
        "parameter shapes than this config builds" + (f" ({hint})" if hint else "") + ":\n  " +
        "\n  ".join(mismatches[:10]) + "\nUse the run's own model settings (its config.json).")
  return step


def restore_params(workdir: str, abstract_params, use_ema: bool = True, hint: str = "",
                   step: int | None = None):
  """Params (EMA by default) of checkpoint `step` (default: the newest), for sampling and
  evaluation; returns (params, step).

  Only the params are read, against `abstract_params` (`jax.eval_shape` of the model's init,
  with shardings): the optimiser state and importance history are never built, so any config
  change that leaves the params' shapes alone works. A shape change fails naming the leaves
  and `hint` (the config fields that differ from the run's config.json).
  """
  step = check_params(workdir, abstract_params, use_ema=use_ema, hint=hint, step=step)
  name = "ema_params" if use_ema else "params"
  path = checkpoint_dir(workdir) / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract_params)
  try:
    with _Quiet():
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item={name: abstract_params}, restore_args={name: restore_args},
          partial_restore=True))
  except Exception as error:  # pylint: disable=broad-except
    with _Quiet():
      reason = _describe_failure(path.parent, error)
    raise CheckpointReadError(f"The {name} of checkpoint step {step} do not restore: "
                              f"{reason}") from error
  return restored[name], step


class PreemptionGuard:
  """Tells the train loop when to save and stop because of a preemption notice (SIGTERM).

  Under `jax.distributed` (several processes) the notice is JAX's own: its preemption service
  catches SIGTERM on any process and `reached(step)` is
  `multihost_utils.reached_preemption_sync_point(step)`, which turns True on every process at
  the same step (it must be called at every step). No Python SIGTERM handler is installed then,
  since one would replace JAX's. A single process has no preemption service: the guard turns
  SIGTERM into a local flag instead, restoring the previous handler on exit.

  `event` is the flag of a SIGTERM handler installed before the guard (main.py installs one at
  start-up), so a SIGTERM during imports, restore or compile counts too; `local_flags` carries it
  into the train step, whose collectives make every process agree on it.
  """

  def __init__(self, event: threading.Event | None = None):
    self._event = event or threading.Event()
    self._previous = None
    self.synced = jax.process_count() > 1 and jax.distributed.is_initialized()

  def __enter__(self):
    if not self.synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  @property
  def requested(self) -> bool:
    """A SIGTERM seen by this process's own handler (start-up, or a single process)."""
    return self._event.is_set()

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop: JAX's sync point on several processes, else the flag."""
    if self.synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def local_flags(self, num_local_devices: int) -> np.ndarray:
    return np.full((num_local_devices,), self.requested, np.bool_)
