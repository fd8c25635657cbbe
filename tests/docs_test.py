"""The documentation's commands exist, and the entry points are plain importable modules.

Every `python -m MODULE ...` command in README.md and docs/*.md (fenced blocks, with their
backslash continuations, and inline code) must name a module that exists and flags that it
defines; `--config.KEY=VALUE` overrides must name a field of the config the command loads.
`python PATH.py` commands must name a file of the repository.
"""

import functools
import glob
import importlib
import importlib.util
import os
import re
import shlex

from absl import flags
import ml_collections
import pytest

from helpers import REPO_ROOT

ENTRY_POINTS = ("ddpm_jax.main", "ddpm_jax.pack_folder", "ddpm_jax.import_checkpoint",
                "ddpm_jax.export_checkpoint", "ddpm_jax.posthoc_ema")
# Modules of other projects that the docs run (their flags are theirs to check).
_EXTERNAL = {"pytest", "pip", "venv", "http.server", "tensorboard"}
_DOC_FILES = sorted([os.path.join(REPO_ROOT, "README.md"),
                     *glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True)])
_COMMAND = re.compile(r"\bpython3? (-m [\w.]+|[\w/.-]+\.py)\b")
_END = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def _fenced_lines(text: str):
  """(line number, line) of every fenced code line, backslash continuations joined."""
  inside, pending, start = False, "", 0
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      inside, pending = not inside, ""
      continue
    if not inside:
      for span in re.findall(r"`([^`]+)`", line):  # inline code
        yield number, span
      continue
    if not pending:
      start = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield start, pending + line
    pending = ""


def _commands():
  """(doc:line, argv) of every python command in the docs, from `python` to the line's end."""
  found = []
  for path in _DOC_FILES:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for number, line in _fenced_lines(text):
      for match in _COMMAND.finditer(line):
        rest = line[match.start():]
        if len(re.findall(r'(?<!\\)"', line[:match.start()])) % 2:  # inside "...": up to its end
          rest = re.split(r'(?<!\\)"', rest, maxsplit=1)[0].replace('\\"', '"')
        try:
          tokens = shlex.split(rest, comments=True)
        except ValueError as e:  # the test below names the line
          found.append((f"{os.path.relpath(path, REPO_ROOT)}:{number}", [f"unparsable: {e}"]))
          continue
        argv = []
        for token in tokens[1:]:
          if token in _END:
            break
          argv.append(token)
        found.append((f"{os.path.relpath(path, REPO_ROOT)}:{number}", argv))
  return found


COMMANDS = _commands()


def _config_for(argv: list[str]) -> ml_collections.ConfigDict:
  """The config a command loads: its configs/NAME.py, else the base (a workdir's has its keys)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  for token in argv:
    match = re.fullmatch(r"--config=(?:\S*/)?configs/(\w+)\.py(?::\S*)?", token)
    if match and match.group(1) != "workdir":
      return importlib.import_module(f"configs.{match.group(1)}").get_config()
  return base.get_config()


def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


@functools.cache
def _absl_flags(module_name: str) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  importlib.import_module(module_name).define_flags(flag_values)
  return flag_values


def _check_absl(module_name: str, argv: list[str]) -> list[str]:
  flag_values, problems = _absl_flags(module_name), []
  for token in argv:
    if not token.startswith("--"):
      continue
    name, _, value = token[2:].partition("=")
    if name.startswith("config."):
      if re.search(r"[A-Z]", name):  # a placeholder: --config.KEY=VALUE
        continue
      if not _has_key(_config_for(argv), name[len("config."):]):
        problems.append(f"{token}: no config field {name[len('config.'):]!r}")
      continue
    if name in flag_values:
      flag = flag_values[name]
      choices = getattr(flag.parser, "enum_values", None)
      if choices and value and not re.search(r"[A-Z]", value):  # not a placeholder
        bad = [v for v in value.split("|") if v not in choices]
        if bad:
          problems.append(f"{token}: {bad} not in {choices}")
    elif not (name.startswith("no") and name[2:] in flag_values
              and flag_values[name[2:]].boolean):
      problems.append(f"{token}: {module_name} has no flag --{name}")
  return problems


def _check_argparse(module_name: str, argv: list[str]) -> list[str]:
  parser = importlib.import_module(module_name).build_parser()
  known = parser._option_string_actions  # pylint: disable=protected-access
  return [f"{token}: {module_name} has no flag {token.split('=')[0]}"
          for token in argv if token.startswith("--") and token.split("=")[0] not in known]


def test_the_docs_hold_commands_to_check():
  modules = {argv[1] for _, argv in COMMANDS if argv[0] == "-m"}
  assert {"ddpm_jax.main", "pytest"} <= modules, modules


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_names_a_module_and_its_flags(where, argv):
  assert not argv[0].startswith("unparsable"), f"{where}: {argv[0]}"
  if argv[0] != "-m":
    assert os.path.isfile(os.path.join(REPO_ROOT, argv[0])), f"{where}: no file {argv[0]}"
    return
  module_name, rest = argv[1], argv[2:]
  if module_name in _EXTERNAL:
    return
  assert importlib.util.find_spec(module_name) is not None, f"{where}: no module {module_name}"
  module = importlib.import_module(module_name)
  if hasattr(module, "define_flags"):
    problems = _check_absl(module_name, rest)
  elif hasattr(module, "build_parser"):
    problems = _check_argparse(module_name, rest)
  else:
    pytest.fail(f"{where}: {module_name} is documented as a command but has no define_flags or "
                "build_parser")
  assert not problems, f"{where}: {problems}"


def test_entry_points_define_no_flags_at_import_so_any_two_share_a_process():
  before = set(flags.FLAGS)
  for name in ENTRY_POINTS:
    importlib.reload(importlib.import_module(name))  # a module-level DEFINE would raise here
  assert set(flags.FLAGS) == before
  for name in ENTRY_POINTS:  # each defines its flags wherever it is told, once per FlagValues
    flag_values = flags.FlagValues()
    args = importlib.import_module(name).define_flags(flag_values)
    assert {holder.name for holder in vars(args).values()} == set(flag_values)
