"""New folders written whole: staged under a name of our own, then renamed onto their target.

The importer, the exporter and the post-hoc EMA writer each make a new folder. `staged(target)`
creates `<parent>/<name>.ddpm_jax-staging-<random hex>` beside it with `os.mkdir`, which fails
rather than reuse a path that exists, so the staging folder is always one this call created:
no folder of the user's can be mistaken for it, and nothing that existed before is ever
removed. When the block completes the folder is renamed to `target`; when it raises (a bad
weight, a full disk) the staging folder is removed. A kill leaves the target absent and at most
one staging folder, which is safe to delete.

The target may not exist yet, or be an empty folder (which the rename replaces); anything else
is refused, naming it. Cloud paths (gs://) have no rename: `is_remote` tells the callers to
write those in place, their marker file last.
"""

import contextlib
import os
import secrets
import shutil

STAGING_MARK = ".ddpm_jax-staging-"


def is_remote(path) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...), where folders cannot be renamed."""
  return "://" in str(path)


def write_whole(path, text: str) -> None:
  """Replaces the file `path` with `text` whole or not at all, even if the process is killed.

  On an object store one put is atomic; on a local disk the text goes to `<path>.tmp`, is
  fsynced, and is renamed over `path`.
  """
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_text(text)
    return
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.fspath(path))


def check_new_target(target: str, what: str) -> None:
  """Refuses a `target` that exists and is not an empty folder, naming it and `what` it is for.

  Raises:
    FileExistsError: `target` is a file, a link, or a folder that holds something.
  """
  if not os.path.lexists(target):
    return
  if os.path.islink(target) or not os.path.isdir(target):
    raise FileExistsError(f"{what}={target} exists and is not a folder; nothing was changed. "
                          "Choose a new path.")
  if os.listdir(target):
    raise FileExistsError(f"{what}={target} exists and is not empty; nothing was changed. "
                          "Choose a new path.")


def _make_staging_dir(target: str) -> str:
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  for _ in range(100):
    path = os.path.join(parent, f"{name}{STAGING_MARK}{secrets.token_hex(6)}")
    try:
      os.mkdir(path)  # exclusive: an existing path (anyone's) raises instead of being reused
    except FileExistsError:
      continue
    return path
  raise FileExistsError(f"Could not create a staging folder beside {target}.")


def _publish(staging_dir: str, target: str, what: str) -> None:
  """Renames the complete `staging_dir` onto `target` (absent or an empty folder)."""
  check_new_target(target, what)  # again: it may have appeared while we wrote
  if os.path.isdir(target):
    os.rmdir(target)  # empty (checked); rmdir cannot remove anything that is in it
  try:
    os.rename(staging_dir, target)
  except OSError as error:
    raise FileExistsError(f"{what}={target} appeared while it was being written ({error}); "
                          "nothing of it was changed. Choose a new path.") from None


@contextlib.contextmanager
def staged(target: str, what: str = "--out"):
  """Yields a new, empty local folder of our own; renames it to `target` when the block ends.

  Args:
    target: the local folder to create (absent, or an empty folder).
    what: how the user named `target` (e.g. '--workdir'), for the messages.

  Raises:
    FileExistsError: `target` holds something, before or after the block; nothing of the user's
      is removed either way.
  """
  target = os.path.abspath(str(target).rstrip("/"))
  check_new_target(target, what)
  staging_dir = _make_staging_dir(target)
  try:
    yield staging_dir
    _publish(staging_dir, target, what)
  except BaseException:
    shutil.rmtree(staging_dir, ignore_errors=True)  # ours: made by _make_staging_dir
    raise
