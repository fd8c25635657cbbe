"""Post-hoc EMA (Karras et al. 2024, EDM2 sec. 3) on disk: the snapshots a run writes, and the
EMA of any sigma_rel rebuilt from them into a new, params-only workdir.

A run with `training.phema_sigma_rels=(s_1, ..., s_n)` tracks n power-function EMAs in its train
state (`TrainState.phema`, see `core.posthoc_ema`) and, every `training.phema_snapshot_every`
steps (0: every `training.checkpoint_every`) and at its last step, writes all n of them to

  <workdir>/phema/phema-<step:08d>.safetensors

one safetensors file per step (no pickle: safe to read from anywhere), whose tensors are named
`<i>/<param path>` (i: the index of s_i; the path of the param tree joined with '/') and whose
metadata holds the format, the step, the sigma_rels and their gammas (JSON). A local file is
written under a temporary name, synced and renamed; a cloud one (gs://) is one object put. Only
process 0 writes, and only steps whose update was checked finite.

A run resumed from checkpoint s (after any number of kills) first sets the snapshots of steps
after s aside under names no other restart uses (`set_aside_after`), and deletes the temporary
files of writes a kill cut short (`remove_temporaries`); train.py also rewrites snapshot s from
the checkpoint when a kill came between the two.

`reconstruct(run, sigma_rel, step)` solves for the combination of every snapshot up to `step`
whose averaging profile best matches the wanted one (`core.posthoc_ema.solve_coefficients`) and
sums the snapshots with it (a `sigma_rel` outside the tracked widths, an extrapolation, only with
`allow_extrapolation=True`); `write_reconstruction` writes the result as the params (and EMA
params) of a new workdir with the run's config.json, by the importer's own writer, so
`--mode=sample|eval`, sweeps and `training.init_from` read it as they read an imported model.
"""

import dataclasses
import datetime
import io
import json
import os
import re
import secrets
import struct
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import safetensors.numpy

from ddpm_jax.config import factories
from ddpm_jax.core import posthoc_ema
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import importer
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib

SNAPSHOT_DIR = "phema"
FORMAT = "ddpm_jax.phema/1"
_NAME = re.compile(r"^phema-(\d+)\.safetensors$")
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^phema-\d+\.safetensors\.tmp$")
_TRAIN_HINT = ("train with post-hoc EMA on, e.g. --config.training.phema_sigma_rels='(0.05, 0.10)' "
               "(snapshots every --config.training.phema_snapshot_every steps)")


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One snapshot file's header: its step, the sigma_rels (and gammas) of the EMAs it holds."""
  path: epath.Path
  step: int
  sigma_rels: tuple[float, ...]
  gammas: tuple[float, ...]


@dataclasses.dataclass
class Reconstruction:
  """The EMA of `sigma_rel` at `step`, rebuilt from `snapshots` with `coefficients`."""
  params: Any  # NumPy param tree, in the snapshots' dtype
  sigma_rel: float
  gamma: float
  step: int
  snapshots: list[Snapshot]  # the files used
  sources: list[tuple[int, float]]  # (step, sigma_rel) of each EMA combined, in order
  coefficients: np.ndarray  # float64, one per source
  extrapolated: bool = False  # sigma_rel outside the combined EMAs' widths (allowed explicitly)


def snapshot_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / SNAPSHOT_DIR


def snapshot_path(workdir: str, step: int) -> epath.Path:
  return snapshot_dir(workdir) / f"phema-{step:08d}.safetensors"


def snapshot_every(config: ml_collections.ConfigDict) -> int:
  """The snapshot interval: training.phema_snapshot_every, or checkpoint_every when it is 0."""
  tc = config.training
  return int(tc.get("phema_snapshot_every", 0)) or int(tc.checkpoint_every)


def flatten(tree) -> dict[str, np.ndarray]:
  """{'a/b/c': leaf} of a nested dict of arrays (a Flax param tree)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any("/" in k for k in keys):
      raise ValueError(f"A param name holds '/': {keys}")
    out["/".join(keys)] = leaf
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, name = key.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return tree


def _host_copy(x) -> np.ndarray:
  """A replicated (possibly multi-process) array's value, from this process's own replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.array(x.addressable_data(0))
  return np.array(x)


def write_snapshot(workdir: str, step: int, phema, sigma_rels, gammas) -> epath.Path:
  """Writes the tracked EMAs `phema` (one param tree per sigma_rel) of `step`; returns the path.

  The caller writes on process 0 only, after checking the step finite.
  """
  if len(phema) != len(sigma_rels) or len(phema) != len(gammas):
    raise ValueError(f"{len(phema)} EMAs for {len(sigma_rels)} sigma_rels and {len(gammas)} "
                     "gammas")
  tensors = {}
  for i, tree in enumerate(phema):
    tensors.update({f"{i}/{k}": _host_copy(v) for k, v in flatten(tree).items()})
  metadata = {"format": FORMAT, "step": str(int(step)),
              "sigma_rels": json.dumps([float(s) for s in sigma_rels]),
              "gammas": json.dumps([float(g) for g in gammas])}
  data = safetensors.numpy.save(tensors, metadata=metadata)
  path = snapshot_path(workdir, step)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in str(path):
    path.write_bytes(data)  # one object put: readers see all of it or nothing
  else:
    tmp = path.with_name(path.name + _TMP_SUFFIX)  # a kill leaves it; remove_temporaries removes it
    with open(os.fspath(tmp), "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # on disk before the name is: a power cut leaves no short snapshot
    os.replace(tmp, path)
  return path


def _bad_file(path, problem: str) -> ValueError:
  return ValueError(f"Post-hoc EMA snapshot {path} is unreadable: {problem}. Move it out of "
                    f"{path.parent} (or delete it) to use the other snapshots.")


def _read_header(path: epath.Path) -> dict:
  """The safetensors header (8-byte little-endian length, then JSON), without the tensors."""
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise _bad_file(path, f"it is {len(head)} bytes long, too short to be a safetensors file "
                      "(truncated, e.g. by a crash or a full disk)")
    (length,) = struct.unpack("<Q", head)
    if length > 100_000_000:
      raise _bad_file(path, f"its first 8 bytes announce a {length}-byte header: not a "
                      "safetensors file")
    text = f.read(length)
  try:
    return json.loads(text)
  except (ValueError, UnicodeDecodeError) as error:
    problem = (f"its {length}-byte header is cut short at {len(text)} bytes (truncated, e.g. by "
               "a crash or a full disk)" if len(text) < length else
               f"its header is not valid JSON ({error})")
    raise _bad_file(path, problem) from None


def _snapshot_from_metadata(path: epath.Path, metadata: dict | None) -> Snapshot:
  if not metadata or metadata.get("format") != FORMAT:
    raise ValueError(f"{path} is not a ddpm_jax post-hoc EMA snapshot (metadata {metadata}).")
  try:
    return Snapshot(path, int(metadata["step"]),
                    tuple(float(s) for s in json.loads(metadata["sigma_rels"])),
                    tuple(float(g) for g in json.loads(metadata["gammas"])))
  except (KeyError, TypeError, ValueError) as error:
    raise _bad_file(path, f"its metadata {metadata} lacks or misstates {error}") from None


def list_snapshots(workdir: str) -> list[Snapshot]:
  """Every snapshot of `workdir` (headers only), by step; [] when it has none.

  Raises:
    ValueError: naming a snapshot file that cannot be read, and what is wrong with it.
  """
  root = snapshot_dir(workdir)
  if not root.is_dir():
    return []
  out = []
  for path in root.iterdir():
    if _NAME.match(path.name):
      out.append(_snapshot_from_metadata(path, _read_header(path).get("__metadata__")))
  return sorted(out, key=lambda s: s.step)


def _restart_tag() -> str:
  """A tag no earlier restart used: UTC time and a random part."""
  return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def set_aside_after(workdir: str, step: int) -> list[epath.Path]:
  """Renames the snapshots of steps after `step` to `<name>.abandoned-at-<step>-<tag>` and
  returns their new paths: a run resumed from checkpoint `step` replays those steps on another
  trajectory (e.g. after a kill between a snapshot and the next checkpoint), and a
  reconstruction must not mix the two. Nothing is deleted.

  `<tag>` (UTC time and a random part) is new at every call, so a run killed again and again
  before the same checkpoint sets each attempt's snapshots aside under names of their own. The
  step is read from the file name, so a truncated snapshot is set aside too.
  """
  root = snapshot_dir(workdir)
  if not root.is_dir():
    return []
  late = sorted((p for p in root.iterdir() if (m := _NAME.match(p.name)) and int(m[1]) > step),
                key=lambda p: p.name)
  tag = _restart_tag()
  while any((p.parent / f"{p.name}.abandoned-at-{step}-{tag}").exists() for p in late):
    tag = _restart_tag()
  moved = []
  for path in late:
    target = path.parent / f"{path.name}.abandoned-at-{step}-{tag}"
    path.rename(target)
    moved.append(target)
  return moved


def remove_temporaries(workdir: str) -> list[epath.Path]:
  """Deletes the `phema-<step>.safetensors.tmp` files that a write cut short by a kill left, and
  returns their paths. Only the trainer's process 0 writes snapshots: call it there, before the
  first step."""
  root = snapshot_dir(workdir)
  if not root.is_dir():
    return []
  stale = [p for p in root.iterdir() if _TMP_NAME.match(p.name)]
  for path in stale:
    path.unlink()
  return stale


def read_snapshot(path) -> tuple[Snapshot, tuple[dict, ...]]:
  """A snapshot's header and its EMAs (NumPy param trees, one per sigma_rel).

  Raises:
    ValueError: naming the file and what is wrong with it (truncated, not a snapshot).
  """
  path = epath.Path(path)
  data = path.read_bytes()
  problem = diffusers_io.safetensors_problem(io.BytesIO(data), len(data))
  if problem:
    raise _bad_file(path, problem)
  try:
    flat = safetensors.numpy.load(data)
  except Exception as error:  # pylint: disable=broad-except
    raise _bad_file(path, f"safetensors cannot read it ({error})") from None
  (length,) = struct.unpack("<Q", data[:8])
  snap = _snapshot_from_metadata(path, json.loads(data[8:8 + length]).get("__metadata__"))
  trees = []
  for i in range(len(snap.sigma_rels)):
    prefix = f"{i}/"
    trees.append(unflatten({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}))
  return snap, tuple(trees)


def format_table(snapshots: list[Snapshot]) -> str:
  lines = [f"{'step':>10}  sigma_rels", *(f"{s.step:>10}  " + ", ".join(f"{r:g}" for r in
                                                                        s.sigma_rels)
                                          for s in snapshots)]
  return "\n".join(lines)


def _check_sigma_rel(sigma_rel: float) -> float:
  try:
    return posthoc_ema.gamma_from_sigma_rel(float(sigma_rel))
  except ValueError as error:
    raise ValueError(f"--sigma_rel={sigma_rel} is out of range: {error}. EDM2's widths are "
                     "around 0.05 to 0.15.") from None


def _select(snapshots: list[Snapshot], run: str, step: int | None) -> tuple[int, list[Snapshot]]:
  if not snapshots:
    raise FileNotFoundError(f"No post-hoc EMA snapshots in {snapshot_dir(run)}; {_TRAIN_HINT}.")
  steps = [s.step for s in snapshots]
  if step is None:
    step = steps[-1]
  elif step not in steps:
    shown = ", ".join(str(s) for s in steps[-10:])
    raise ValueError(f"--step={step}: {run} has no snapshot of that step; it has "
                     f"{len(steps)} snapshots, the newest at steps {shown}. Pass one of them, or "
                     "leave --step out for the newest.")
  return step, [s for s in snapshots if s.step <= step]


def _coefficient_text(sources, coefficients, most: int = 12) -> str:
  """'c (step t, sigma_rel s)' for each coefficient, the largest in magnitude first."""
  order = np.argsort(-np.abs(coefficients))
  parts = [f"{coefficients[j]:+.3f} (step {sources[j][0]}, sigma_rel {sources[j][1]:g})"
           for j in order[:most]]
  more = len(order) - most
  return ", ".join(parts) + (f" and {more} smaller" if more > 0 else "")


def reconstruct(run: str, sigma_rel: float, step: int | None = None,
                use_sigma_rels=None, allow_extrapolation: bool = False) -> Reconstruction:
  """The EMA of `sigma_rel` at snapshot step `step` (default: the newest) of run `run`.

  Args:
    run: the workdir of a run trained with training.phema_sigma_rels.
    sigma_rel: the wanted relative width, in (0, 0.2886].
    step: a step with a snapshot; every snapshot up to it is combined.
    use_sigma_rels: combine only the tracked EMAs of these sigma_rels (default: all of them).
    allow_extrapolation: build a `sigma_rel` outside the range of the combined EMAs' widths
      anyway (with a warning listing the coefficients). Such a width is an extrapolation: its
      coefficients are large and of both signs, so it amplifies the snapshots' differences.

  Raises:
    ValueError: `sigma_rel` out of (0, 0.2886], or outside the combined widths without
      `allow_extrapolation` (stating the valid range); a snapshot that cannot be read (naming it).
  """
  gamma = _check_sigma_rel(sigma_rel)
  step, used = _select(list_snapshots(run), run, step)
  sources, keep = [], []  # (file, index in it) of each EMA combined
  for snap in used:
    for i, (s, g) in enumerate(zip(snap.sigma_rels, snap.gammas)):
      if use_sigma_rels is None or any(np.isclose(s, u) for u in use_sigma_rels):
        sources.append((snap.step, s, g))
        keep.append((snap, i))
  if not sources:
    raise ValueError(f"None of the snapshots in {snapshot_dir(run)} tracks the sigma_rels "
                     f"{tuple(use_sigma_rels)}; it tracks {used[-1].sigma_rels}.")
  coefficients = posthoc_ema.solve_coefficients([t for t, _, _ in sources],
                                                [g for _, _, g in sources], step, gamma)
  lo, hi = min(s for _, s, _ in sources), max(s for _, s, _ in sources)
  extrapolated = not lo * (1 - 1e-9) <= float(sigma_rel) <= hi * (1 + 1e-9)
  if extrapolated:
    coefficient_text = _coefficient_text([(t, s) for t, s, _ in sources], coefficients)
    widths = f"{lo:g} to {hi:g}" if lo != hi else f"only {lo:g}"
    if not allow_extrapolation:
      raise ValueError(
          f"--sigma_rel={sigma_rel:g} is outside the widths that the snapshots of {run} combine "
          f"({widths}): it can only be extrapolated, with coefficients from "
          f"{coefficients.min():+.2f} to {coefficients.max():+.2f} that amplify the snapshots' "
          f"differences. Pass a --sigma_rel in [{lo:g}, {hi:g}], or pass --allow_extrapolation "
          "(allow_extrapolation=True) to build it anyway.")
    logging.warning("--sigma_rel=%g is outside the widths the snapshots of %s combine (%s): "
                    "extrapolated (allow_extrapolation), with coefficients %s.", sigma_rel, run,
                    widths, coefficient_text)
  # One file at a time into a float64 sum: the coefficients alternate in sign and can be large.
  total, dtypes, k = None, None, 0
  for snap in used:
    indices = [i for s, i in keep if s is snap]
    if not indices:
      continue
    _, trees = read_snapshot(snap.path)
    for i in indices:
      c = float(coefficients[k])
      k += 1
      if total is None:
        dtypes = jax.tree.map(lambda x: x.dtype, trees[i])
        total = jax.tree.map(lambda x: c * x.astype(np.float64), trees[i])
      else:
        total = jax.tree.map(lambda acc, x: acc + c * x.astype(np.float64), total, trees[i])
  params = jax.tree.map(lambda x, d: x.astype(d), total, dtypes)
  return Reconstruction(params, float(sigma_rel), gamma, step, used,
                        [(t, s) for t, s, _ in sources], coefficients, extrapolated)


def _check_out(out: str, run: str) -> None:
  path = epath.Path(out)
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"--out={out} exists and is not a folder; the reconstruction writes a "
                          "new workdir. Choose a new --out.")
  step = checkpointing.latest_step(out) if path.exists() else None
  if step is not None:
    raise FileExistsError(f"--out={out} already holds a checkpoint (step {step}); the "
                          "reconstruction writes a new workdir. Choose a new --out.")
  if path.exists() and any(path.iterdir()):
    raise FileExistsError(f"--out={out} exists and is not empty; the reconstruction writes a new "
                          "workdir. Choose a new --out.")
  if path.resolve() == epath.Path(run).resolve():
    raise ValueError(f"--out={out} is the run itself; choose a new workdir.")


def _check_shapes(config, params, run: str) -> None:
  abstract = train_state_lib.abstract_params(config, factories.create_model(config),
                                             mesh_lib.make_mesh())
  want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  if want != got:
    diff = [f"{k}: snapshot {got.get(k, 'absent')} vs config {want.get(k, 'absent')}"
            for k in sorted(want.keys() | got.keys()) if want.get(k) != got.get(k)]
    raise ValueError(f"The snapshots of {run} do not fit the model of its config.json:\n  " +
                     "\n  ".join(diff[:10]))


def write_reconstruction(run: str, out: str, sigma_rel: float, step: int | None = None,
                         use_sigma_rels=None, allow_extrapolation: bool = False) -> dict:
  """Rebuilds the EMA of `sigma_rel` (see `reconstruct`, which also explains
  `allow_extrapolation`) and writes it as the params and EMA params of a new workdir `out`, with
  `run`'s config.json; returns the record written to `out`/imported.json.

  A local `out` is staged in a folder of our own beside it and renamed when complete
  (`runtime.staging`); no other folder is touched.
  """
  _check_out(out, run)
  config = run_config.load(run)
  if config is None:
    raise FileNotFoundError(f"{run} has no config.json: not a ddpm_jax run directory.")
  rec = reconstruct(run, sigma_rel, step, use_sigma_rels, allow_extrapolation)
  _check_shapes(config, rec.params, run)
  config.sampling.use_ema = True
  count = sum(int(np.size(v)) for v in jax.tree.leaves(rec.params))
  record = {
      "source": str(run), "kind": "posthoc_ema", "step": rec.step,
      "weights": f"post-hoc EMA, sigma_rel {rec.sigma_rel:g} (gamma {rec.gamma:.4f})",
      "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "params": count, "sigma_rel": rec.sigma_rel, "gamma": rec.gamma,
      "sources": [{"step": t, "sigma_rel": s, "coefficient": float(c)}
                  for (t, s), c in zip(rec.sources, rec.coefficients)],
      "extrapolated": rec.extrapolated,
      "notes": [f"EMA of sigma_rel {rec.sigma_rel:g} at step {rec.step}, rebuilt from "
                f"{len(rec.sources)} tracked EMAs in {len(rec.snapshots)} snapshot files of {run}"]
               + (["extrapolated beyond the tracked widths (allow_extrapolation)"]
                  if rec.extrapolated else []),
  }
  importer.write_workdir(out, config, rec.params, rec.step, record, what="--out")
  logging.info("Wrote the post-hoc EMA of sigma_rel %g at step %d of %s to %s.", rec.sigma_rel,
               rec.step, run, out)
  return record
