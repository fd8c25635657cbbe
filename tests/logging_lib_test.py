"""The console of an entry point: our lines with a short prefix, the full one at --verbosity=1."""

import re
import subprocess
import sys

import pytest

from tests import helpers

# An absl program that sets up the console as main.py does, then logs one line of ours (the
# progress line of `logging_lib.Progress`), one line from elsewhere (library chatter) and a
# warning from elsewhere.
_PROGRAM = """
from absl import app, logging
from ddpm_jax.runtime import logging_lib

def main(_):
  logging_lib.setup_console()
  logging_lib.Progress(0, 10, use_bar=False).report(5, {"loss": 0.5})
  logging.info("library chatter")
  logging.warning("a library warning")

app.run(main)
"""


def _console(*flags: str) -> str:
  result = subprocess.run([sys.executable, "-c", _PROGRAM, *flags], cwd=helpers.REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  return result.stderr


def test_default_console_shows_our_lines_with_time_and_message_only():
  lines = _console().strip().splitlines()
  assert len(lines) == 2, lines
  assert re.fullmatch(r"\d\d:\d\d:\d\d step 5/10  loss=0\.5  .* steps/s  ETA \d+:\d\d:\d\d",
                      lines[0]), lines[0]
  assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING: a library warning", lines[1]), lines[1]


@pytest.mark.parametrize("flag", ["--verbosity=1", "-v=1"])
def test_verbosity_brings_back_absl_prefix_and_library_lines(flag):
  lines = _console(flag).strip().splitlines()
  absl_prefix = r"[IW]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.<>-]+:\d+\] "
  assert len(lines) == 3, lines
  assert re.match(absl_prefix + "step 5/10", lines[0]), lines[0]
  assert re.match(absl_prefix + "library chatter", lines[1]), lines[1]
  assert re.match(absl_prefix + "a library warning", lines[2]), lines[2]


def test_the_backend_probe_of_the_entry_point_stays_off_the_console(tmp_path):
  """With JAX free to pick a platform, jax probes every backend as the run starts and logs the
  missing ones at INFO ("Unable to initialize backend 'tpu'"); main.py's console filter is on
  before that. (The run stops at its clear error: the workdir holds no checkpoint.)"""
  env = helpers.subprocess_env(1)
  del env["JAX_PLATFORMS"]
  command = helpers.main_command(tmp_path / "empty", "--mode=sample")
  result = subprocess.run(command, cwd=helpers.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and "train first" in result.stderr, result.stderr[-2000:]
  log = result.stderr[:result.stderr.index("Traceback")]
  assert re.match(r"\d\d:\d\d:\d\d Mode sample, workdir ", log), log
  absl_lines = [line for line in log.splitlines() if re.match(r"[IWE]\d{4} ", line)]
  assert not absl_lines, absl_lines
