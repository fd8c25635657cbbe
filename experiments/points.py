"""What a sweep is: its definition, its points, and their validated configs and command lines.

A sweep (format in experiments/sweeps/__init__.py) is a base config, fixed overrides, a grid
and/or explicit points. Before anything runs, every point's overrides are applied to the locked
base config (an unknown key fails, naming the key and the point), checked with
`ddpm_jax.config.validation.validate` (without opening the data, which may live only where the
point runs), and parsed back through `ml_collections.config_flags` from the exact command-line
arguments the subprocess will get. Nothing here runs a point (`experiments.runner`) or knows
where it runs (`experiments.launch`).
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import difflib
import importlib
import importlib.util
import itertools
import os
import re
from typing import Any
import warnings

from absl import flags
import ml_collections
from ml_collections import config_flags

from ddpm_jax.config import validation
from ddpm_jax.runtime import run_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._,+=-]")
_MAX_NAME = 200  # path components are limited to 255 bytes


class SweepError(ValueError):
  """A sweep that cannot run as defined; raised before any point starts."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep definition; the fields are described in experiments/sweeps/__init__.py."""
  name: str
  config: str
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  points: Sequence[Mapping[str, Any]] = ()
  checkpoint: str = ""
  plot: Mapping[str, Any] = dataclasses.field(default_factory=dict)


PLOT_KEYS = ("x", "y", "series", "floor", "logx", "title")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: filesystem-safe, from the labels: 'schedule-cosine__num_timesteps-1000__loss-mse'.
    labels: {axis alias: value label}, the point's columns in the results table.
    overrides: every dotted override of the run, the sweep's fixed ones first.
  """
  name: str
  labels: Mapping[str, str]
  overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated point: its full config and the `--config.k=v` arguments that rebuild it."""
  point: Point
  config: ml_collections.ConfigDict
  args: tuple[str, ...]


def as_sweep(sweep: Sweep | Mapping[str, Any]) -> Sweep:
  if not isinstance(sweep, Sweep):
    try:
      sweep = Sweep(**sweep)
    except TypeError as e:
      raise SweepError(f"Bad sweep definition: {e}.") from None
  if not sweep.name or _UNSAFE_NAME.search(sweep.name):
    raise SweepError(f"Sweep name {sweep.name!r} must be non-empty and filesystem-safe.")
  unknown = sorted(set(sweep.plot) - set(PLOT_KEYS))
  if unknown or (sweep.plot and not {"x", "y"} <= set(sweep.plot)):
    raise SweepError(f"Sweep {sweep.name!r}: plot needs 'x' and 'y' and takes only "
                     f"{list(PLOT_KEYS)}; got {sorted(sweep.plot)}.")
  if sweep.checkpoint and "://" in sweep.checkpoint:
    raise SweepError(f"Sweep {sweep.name!r}: checkpoint must be a local run directory, not "
                     f"{sweep.checkpoint}.")
  return sweep


def _module_from_file(path: str, name: str):
  module_spec = importlib.util.spec_from_file_location(name, path)
  if not os.path.isfile(path) or module_spec is None:
    raise SweepError(f"No such file: {path}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_sweep(spec: str, grid: str | None = None) -> Sweep:
  """Calls `get_sweep([grid])` of a module in experiments/sweeps, a dotted module or a .py file."""
  if spec.endswith(".py") or os.sep in spec:
    module = _module_from_file(os.path.abspath(spec), "sweep_definition")
  else:
    name = spec if "." in spec else f"experiments.sweeps.{spec}"
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "experiments", "sweeps"))
                       if f.endswith(".py") and not f.startswith("_"))
      raise SweepError(f"Unknown sweep {spec!r}; shipped sweeps: {shipped}.") from None
  try:
    return as_sweep(module.get_sweep() if grid is None else module.get_sweep(grid))
  except (TypeError, ValueError) as e:
    raise SweepError(f"{spec}: get_sweep({'' if grid is None else repr(grid)}): {e}") from None


def _label(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    value = ",".join(str(v) for v in value) or "none"
  return _UNSAFE_NAME.sub("_", str(value))


def _aliases(keys: Sequence[str]) -> dict[str, str]:
  """The last component of each dotted key, or the whole key where two would collide."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: _label(s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _axis_choice(axis: str, value: Any) -> tuple[str, dict[str, Any]]:
  """(label, overrides) of one grid value: a plain value of `axis`, or a dict of linked ones."""
  if not isinstance(value, Mapping):
    return _label(value), {axis: value}
  overrides = {k: v for k, v in value.items() if k != "label"}
  if not overrides or ("label" not in value and axis not in overrides):
    raise SweepError(f"Grid axis {axis!r}: a dict value needs overrides and a 'label' (or the "
                     f"axis key itself); got {dict(value)!r}.")
  return _label(value.get("label", overrides.get(axis))), overrides


def _name(labels: Mapping[str, str]) -> str:
  return "__".join(f"{k}-{v}" for k, v in labels.items()) or "base"


def expand(sweep: Sweep | Mapping[str, Any]) -> list[Point]:
  """The grid's points (product in axis order, last axis fastest), then the explicit ones."""
  sweep = as_sweep(sweep)
  points = []
  axes = list(sweep.grid)
  alias = _aliases(axes)
  choices = [[_axis_choice(a, v) for v in sweep.grid[a]] for a in axes]
  for combo in itertools.product(*choices) if axes else ():
    overrides = dict(sweep.fixed)
    for _, own in combo:
      overrides.update(own)
    labels = {alias[a]: label for a, (label, _) in zip(axes, combo)}
    points.append(Point(_name(labels), labels, overrides))
  for spec in sweep.points:
    own = {k: v for k, v in spec.items() if k != "name"}
    alias = _aliases(list(own))
    labels = {alias[k]: _label(v) for k, v in own.items()}
    name = _label(spec["name"]) if "name" in spec else _name(labels)
    points.append(Point(name, labels, {**sweep.fixed, **own}))
  if not points:
    raise SweepError(f"Sweep {sweep.name!r} defines no points.")
  names = [p.name for p in points]
  for name in names:
    if names.count(name) > 1:
      raise SweepError(f"Sweep {sweep.name!r}: two points are both named {name!r}; give linked "
                       "values distinct labels or explicit points a 'name'.")
    if len(name) > _MAX_NAME:
      raise SweepError(f"Sweep {sweep.name!r}: point name {name!r} is too long for a directory; "
                       "shorten the labels or give the point a 'name'.")
  return points


def _config_file(path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def cli_value(value: Any, default: Any) -> str:
  """`value` as config_flags must read it for a field whose base value is `default`."""
  if isinstance(default, bool):
    return "true" if value else "false"
  if isinstance(default, str):
    return str(value)  # absl's string parser keeps the text as it is
  if isinstance(default, tuple):
    return repr(tuple(value))  # TupleParser: ast.literal_eval, e.g. "('digits_score', 'bpd')"
  return repr(value)  # int/float parsers, or ast.literal_eval for fields that default to None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> tuple[str, ...]:
  """Sets each dotted key of a locked `config`; returns the matching `--config.k=v` arguments."""
  args = []
  for key, value in overrides.items():
    node, path = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        raise SweepError(f"{where}: unknown config key {key!r}; {'.'.join(path)} is a field.")
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        valid = sorted(".".join(path + [k]) for k in node.keys())
        raise SweepError(f"{where}: unknown config key {key!r}"
                         + (f" (did you mean {'.'.join(path + close)!r}?)" if close else "")
                         + f"; valid keys: {valid}.")
      parent, node, path = node, node[part], path + [part]
    if isinstance(node, ml_collections.ConfigDict):
      raise SweepError(f"{where}: {key!r} is a group of the config, not a field.")
    if isinstance(node, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      parent[path[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:
      raise SweepError(f"{where}: cannot set {key}={value!r}: {e}") from None
    args.append(f"--config.{key}={cli_value(parent[path[-1]], node)}")
  return tuple(args)


def config_from_args(config_path: str, args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `python -m ddpm_jax.main --config=config_path *args` would build."""
  argv = ["main", f"--config={_config_file(config_path)}", *args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  with warnings.catch_warnings():  # config_flags loads the file with a deprecated importlib API
    warnings.simplefilter("ignore", DeprecationWarning)
    flag_values(argv)
  return holder.value


def plan(sweep: Sweep, points: Sequence[Point]) -> list[Plan]:
  """Validates every point (see the module docstring); any problem raises `SweepError`."""
  module = _module_from_file(_config_file(sweep.config), "sweep_base_config")
  plans = []
  for point in points:
    where = f"sweep {sweep.name!r}, point {point.name!r}"
    config = module.get_config()
    config.lock()
    args = apply_overrides(config, point.overrides, where)
    try:
      # What the point's own run will check, less its data (it may live only where it runs).
      validation.validate(config, mode="eval" if sweep.checkpoint else "train", open_data=False)
      parsed = config_from_args(sweep.config, args)
    except (ValueError, flags.Error) as e:
      raise SweepError(f"{where}: {e}") from None
    diff = run_config.config_diff(parsed, config)
    if diff:
      raise SweepError(f"{where}: the command line would not rebuild the config: {diff}.")
    if sweep.checkpoint and not config.eval.metrics:
      raise SweepError(f"{where}: a sample-only sweep runs --mode=eval, which needs "
                       "eval.metrics (e.g. ('digits_score',)).")
    plans.append(Plan(point, config, args))
  return plans
