"""Where a run reports to: TensorBoard events, a metrics JSONL and the console.

Only process 0 writes; on every other process a `MetricWriter` does nothing, so callers never
branch on the process index.
"""

import json
import time

from absl import logging
from etils import epath
import jax
import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(workdir / "tb"))
      self._jsonl = (workdir / "metrics.jsonl").open("a")

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_uint8, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Console progress: step, rate and ETA, every time `report` is called."""

  def __init__(self, first_step: int, last_step: int):
    self._start_step, self._last_step = first_step, last_step
    self._start = self._mark = time.perf_counter()
    self._mark_step = first_step

  def report(self, step: int, scalars: dict) -> dict:
    """Logs a line and returns the rates since the previous report."""
    now = time.perf_counter()
    steps_per_s = (step - self._mark_step) / max(now - self._mark, 1e-9)
    self._mark, self._mark_step = now, step
    eta = (self._last_step - step) / max(steps_per_s, 1e-9)
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self._last_step, text,
                 steps_per_s, _hms(eta))
    return {"steps_per_sec": steps_per_s}


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
