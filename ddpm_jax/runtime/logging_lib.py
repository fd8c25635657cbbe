"""Where a run reports to: TensorBoard events, the metrics history and the console.

Only process 0 writes; on every other process a `MetricWriter` does nothing, so callers never
branch on the process index.

The metrics history lives in `<workdir>/metrics/` as one JSONL object per run segment (and per
chunk of `CHUNK_RECORDS` lines), never appended to: object stores (gs://) have no append, so each
write replaces a whole small object. `read_metrics` merges the segments: a segment that starts at
step S (the checkpoint it resumed from) supersedes every record after S of the segments before it,
so each logged step appears exactly once however many times the run was resumed.
"""

import json
import logging as py_logging
import os
import re
import shutil
import sys
import tempfile
import time

from absl import logging
from etils import epath
import jax
import numpy as np
import tqdm

from ddpm_jax.runtime import staging

METRICS_DIR = "metrics"
LEGACY_METRICS = "metrics.jsonl"  # the single appended file of earlier versions (read only)
CHUNK_RECORDS = 256  # records per object: bounds the bytes rewritten per log line
TB_UPLOAD_EVERY_S = 60.0
_SEGMENT_RE = re.compile(r"segment_(\d+)_(\d+)_(\d+)\.jsonl")

# Our own code: INFO lines from anywhere else are library chatter (Orbax, etc.).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OWN_DIRS = tuple(os.path.join(_REPO_ROOT, d) + os.sep
                  for d in ("ddpm_jax", "experiments", "configs", "benchmarks"))


def read_metrics(workdir) -> list[dict]:
  """The metrics history of `workdir`, one record per logged step, sorted by step.

  Segments are applied in order of (start step, creation time); each drops the records with
  step > its start that the earlier segments hold, then adds its own (the last record of a step
  wins within a segment). The legacy `metrics.jsonl`, if any, is the oldest segment.
  """
  workdir = epath.Path(workdir)
  segments = []  # (start, created, chunk, path)
  if (workdir / LEGACY_METRICS).exists():
    segments.append((-1, 0, 0, workdir / LEGACY_METRICS))
  if (workdir / METRICS_DIR).exists():
    for path in (workdir / METRICS_DIR).iterdir():
      match = _SEGMENT_RE.fullmatch(path.name)
      if match:
        segments.append((*map(int, match.groups()), path))
  by_step, current = {}, None
  for start, created, _, path in sorted(segments, key=lambda s: s[:3]):
    if (start, created) != current:
      current = (start, created)
      by_step = {s: r for s, r in by_step.items() if s <= start}
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill (legacy file only)
        continue
      if "step" in record:
        by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX's writer imports torch whenever it is installed (1.4 s on a 2-core Xeon), only to
  accept torch tensors, which we never hand it. Where torch is not imported yet, the import is
  made to fail for the time tensorboardX loads, as it does where torch is not installed.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to TensorBoard (`<workdir>/tb`) and to this segment's metrics objects.

  On a local workdir TensorBoard writes in place. On an object store, tensorboardX's own GCS
  writer retries a resumable upload for up to 120 s and has hung at exit against an emulator, so
  events are written to a local staging folder and each event file is uploaded whole (one put
  through the same client as everything else) at most every `TB_UPLOAD_EVERY_S`, at every
  `flush` (each checkpoint) and at `close`.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, first_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if not self.enabled:
      return
    SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
    self._workdir = epath.Path(workdir)
    (self._workdir / METRICS_DIR).mkdir(parents=True, exist_ok=True)
    self._segment = f"segment_{first_step:010d}_{time.time_ns()}"
    self._records: list[str] = []
    self._chunk = 0
    self._tb_dest = self._workdir / "tb"
    self._tb_dest.mkdir(parents=True, exist_ok=True)
    self._staging = tempfile.mkdtemp(prefix="ddpm_tb_") if staging.is_remote(workdir) else None
    self._tb = SummaryWriter(self._staging or str(self._tb_dest))
    self._uploaded_at = time.monotonic()

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    if len(self._records) == CHUNK_RECORDS:
      self._chunk, self._records = self._chunk + 1, []
    self._records.append(json.dumps({"step": step, "time": time.time(), **scalars}))
    name = f"{self._segment}_{self._chunk:06d}.jsonl"
    staging.write_whole(self._workdir / METRICS_DIR / name, "\n".join(self._records) + "\n")
    self._maybe_upload_tb()

  def write_image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_uint8, step, dataformats="HWC")
      self._maybe_upload_tb()

  def flush(self) -> None:
    """Uploads the staged TensorBoard events now. The trainer calls it after every checkpoint,
    so a killed run loses no events up to the checkpoint it will resume from."""
    if self.enabled and self._tb is not None:
      self._tb.flush()  # a local workdir: events on disk before a kill
      self._maybe_upload_tb(force=True)

  def _maybe_upload_tb(self, force: bool = False) -> None:
    if self._staging is None:
      return
    if not force and time.monotonic() - self._uploaded_at < TB_UPLOAD_EVERY_S:
      return
    self._tb.flush()
    for name in os.listdir(self._staging):
      with open(os.path.join(self._staging, name), "rb") as f:
        (self._tb_dest / name).write_bytes(f.read())
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self.enabled and self._tb is not None:
      self._tb.close()
      self._maybe_upload_tb(force=True)
      if self._staging:
        shutil.rmtree(self._staging, ignore_errors=True)
      self._tb = None


class _OwnLinesOnly(py_logging.Filter):
  """Passes warnings and our own lines; library INFO passes only at --verbosity >= 1."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1
            or record.pathname.startswith(_OWN_DIRS))


class _ShortFormat(py_logging.Formatter):
  """`HH:MM:SS message` (warnings and errors name their level); absl's full prefix
  (`I1203 08:10:03.523997 139819074780032 train.py:37]`) at --verbosity >= 1."""

  def __init__(self, full: py_logging.Formatter | None):
    super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    self._full = full

  def format(self, record: py_logging.LogRecord) -> str:
    if logging.get_verbosity() >= 1 and self._full is not None:
      return self._full.format(record)
    text = super().format(record)
    if record.levelno >= py_logging.WARNING:
      stamp = self.formatTime(record, self.datefmt)
      text = f"{stamp} {record.levelname}: {text[len(stamp) + 1:]}"
    return text


def setup_console() -> None:
  """Shows our own INFO lines, with a short prefix, unless `--verbosity>=1` asks for the rest.

  Orbax and the other libraries log through the same absl handler as we do, so the filter and
  the format go on that handler (both read the verbosity at each record, so a later
  `--verbosity` change applies). Called by the entry point (main.py), never on import.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnLinesOnly) for f in handler.filters):
    handler.addFilter(_OwnLinesOnly())
  current = handler.python_handler.formatter
  if not isinstance(current, _ShortFormat):
    handler.setFormatter(_ShortFormat(current))


class Progress:
  """Console progress with rate and ETA: a tqdm bar on a terminal, plain log lines otherwise."""

  def __init__(self, first_step: int, last_step: int, use_bar: bool | None = None):
    self._start_step, self._last_step = first_step, last_step
    self._start = self._mark = time.perf_counter()
    self._mark_step = first_step
    if use_bar is None:
      use_bar = sys.stderr.isatty() and jax.process_index() == 0
    self._bar = (tqdm.tqdm(total=last_step, initial=first_step, unit="step", dynamic_ncols=True)
                 if use_bar else None)

  def report(self, step: int, scalars: dict) -> dict:
    """Shows the step and its scalars; returns the rate since the previous report."""
    now = time.perf_counter()
    steps_per_s = (step - self._mark_step) / max(now - self._mark, 1e-9)
    if self._bar is not None:
      self._bar.update(step - self._mark_step)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=True)
      if step >= self._last_step:
        self._bar.close()
    else:
      eta = (self._last_step - step) / max(steps_per_s, 1e-9)
      text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
      logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self._last_step, text,
                   steps_per_s, _hms(eta))
    self._mark, self._mark_step = now, step
    return {"steps_per_sec": steps_per_s}


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
