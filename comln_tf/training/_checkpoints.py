"""Checkpoints a run can trust, and the lock of a run's directory.

Resuming reads the newest checkpoint that is intact: its index and every
data shard present and readable (every tensor read back). A damaged or
partly missing one (deleted `ckpt-N.index`, truncated data, a `checkpoint`
state file that is gone or names missing files) is set aside with a
warning naming its files, and the run resumes from the newest intact one;
with checkpoints but none intact it stops with an error. The state file is
then rewritten to list the intact checkpoints only, so the
CheckpointManager's pruning (max_to_keep) never spends a slot on a damaged
one, and never deletes an intact one because of it.

A run's directory is locked while it trains (`RunLock`): a lock file holding
the host, pid and start time of the process. A second training of the same
directory is refused; a lock whose process is gone (a crash, SIGKILL) is
stale and taken over.
"""

import dataclasses
import glob
import json
import logging
import os
import re
import socket
import time
from typing import List, Optional, Tuple

import tensorflow as tf

from comln_tf.training._config import ConfigError

_LOG = logging.getLogger(__name__)

STATE_FILE = "checkpoint"
LOCK_FILE = ".lock"
DAMAGED_SUFFIX = ".damaged"

_CHECKPOINT_FILE = re.compile(r"^(ckpt-(\d+))\.(index|data-\d+-of-(\d+))$")


class CheckpointError(ConfigError):
  """No intact checkpoint to resume from, though checkpoints exist."""


@dataclasses.dataclass(frozen=True)
class Found:
  """A checkpoint on disk: its step, prefix and files."""

  step: int
  prefix: str
  files: Tuple[str, ...]


def _on_disk(directory: str) -> List[Found]:
  """Checkpoints `ckpt-<step>.*` in `directory`, newest first."""
  files = {}
  for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*")):
    match = _CHECKPOINT_FILE.match(os.path.basename(path))
    if match:
      files.setdefault(int(match.group(2)), []).append(path)
  return [
    Found(step, os.path.join(directory, f"ckpt-{step}"), tuple(sorted(paths)))
    for step, paths in sorted(files.items(), reverse=True)
  ]


def problems(prefix: str) -> List[str]:
  """What is wrong with checkpoint `prefix`: [] when it is intact.

  Intact: the index exists, every data shard it needs exists, and every
  tensor reads back (a truncated data file fails there).

  Args:
    prefix: a checkpoint prefix, e.g. model_dir/ckpt-100.

  Returns:
    List of messages, each naming a file.
  """
  index = f"{prefix}.index"
  found = []
  if not os.path.isfile(index):
    found.append(f"{index} is missing")
  shards = glob.glob(f"{glob.escape(prefix)}.data-*-of-*")
  if not shards:
    found.append(f"{prefix}.data-* is missing")
  else:
    total = int(shards[0].rsplit("-of-", 1)[1])
    for shard in range(total):
      name = f"{prefix}.data-{shard:05d}-of-{total:05d}"
      if not os.path.isfile(name):
        found.append(f"{name} is missing")
  if found:
    return found
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as error:  # pylint: disable=broad-except
    # Truncated or corrupted files fail in many ways (IndexError,
    # DataLossError, OutOfRangeError...): any is damage.
    first_line = str(error).strip().splitlines() or [type(error).__name__]
    return [
      f"{prefix}.{{index,data-*}} cannot be read "
      f"({type(error).__name__}: {first_line[0][:200]})"
    ]
  return []


def _set_aside(found: Found) -> List[str]:
  """Renames a damaged checkpoint's files to *.damaged; returns the new names.

  Kept, not deleted: they are evidence, and a later save of the same step
  must not mix with them.
  """
  moved = []
  for path in found.files:
    target = path + DAMAGED_SUFFIX
    os.replace(path, target)
    moved.append(target)
  return moved


def _state_paths(directory: str) -> List[str]:
  """Checkpoint prefixes the state file lists (all_model_checkpoint_paths)."""
  try:
    state = tf.train.get_checkpoint_state(directory)
  except Exception:  # pylint: disable=broad-except
    return []  # An unreadable state file is rebuilt from the files on disk.
  if state is None:
    return []
  paths = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
    paths.append(state.model_checkpoint_path)
  return [
    path if os.path.isabs(path) else os.path.join(directory, path)
    for path in paths
  ]


def latest_intact(
  directory: str, restore=None, modify: bool = True
) -> Optional[str]:
  """The newest intact checkpoint of `directory`, damaged ones set aside.

  Candidates are the checkpoints on disk and those the state file lists.
  Each damaged one, newer than the one chosen, is renamed to *.damaged and
  named in a warning. The state file is rewritten to list the intact
  checkpoints up to the chosen one.

  Args:
    directory: where a CheckpointManager writes (model_dir, or model_dir/
      best).
    restore: optional callable(prefix) that restores the checkpoint into
      the run's objects; raising counts as damage and the next older one is
      tried.
    modify: set damaged checkpoints aside and rewrite the state file (the
      chief); False only reads (the other workers of a multi-worker run,
      which must pick the same checkpoint but not touch the chief's files).

  Returns:
    The prefix of the checkpoint restored (or to restore), or None if the
    directory holds no checkpoint at all.

  Raises:
    CheckpointError: checkpoints exist but none is intact.
  """
  if not os.path.isdir(directory):
    return None
  on_disk = _on_disk(directory)
  listed = set(_state_paths(directory))
  known = {found.prefix for found in on_disk}
  damaged = []
  for prefix in sorted(listed - known):
    damaged.append(
      f"{prefix}: listed in {os.path.join(directory, STATE_FILE)}"
      f" but no file is left"
    )
  chosen, bad = None, []
  for found in on_disk:
    issues = problems(found.prefix)
    if not issues and restore is not None:
      try:
        restore(found.prefix)
      except Exception as error:  # pylint: disable=broad-except
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        issues = [
          f"{found.prefix} does not restore "
          f"({type(error).__name__}: {first_line})"
        ]
    if not issues:
      chosen = found
      break
    damaged.extend(issues)
    bad.append(found)
  if damaged:
    if chosen is None:
      # Left in place: set aside, they would look like no checkpoint at
      # all, and a rerun would start from step 0.
      raise CheckpointError(
        f"No intact checkpoint in {directory!r} to resume from: "
        f"{'; '.join(damaged)}. Restore the files from a backup, or train "
        f"in a new model_dir."
      )
    if modify:
      for found in bad:
        damaged.append(f"set aside as {', '.join(_set_aside(found))}")
    _LOG.warning(
      "Damaged checkpoints in %s: %s. Resuming from the newest "
      "intact one, %s (step %d).",
      directory,
      "; ".join(damaged),
      chosen.prefix,
      chosen.step,
    )
  if chosen is None:
    return None
  intact = [
    found.prefix for found in reversed(on_disk) if found.step <= chosen.step
  ]
  if modify and (
    damaged or not os.path.isfile(os.path.join(directory, STATE_FILE))
  ):
    # Rebuilt: the CheckpointManager created next prunes (max_to_keep) from
    # this list, and must not count a damaged checkpoint in it.
    # With their times: the manager prunes only checkpoints younger than
    # last_preserved_timestamp (without times, it would keep them forever).
    times = [os.path.getmtime(f"{prefix}.index") for prefix in intact]
    tf.compat.v1.train.update_checkpoint_state(
      directory,
      chosen.prefix,
      all_model_checkpoint_paths=intact,
      all_model_checkpoint_timestamps=times,
      last_preserved_timestamp=min(times) - 1.0,
    )
  return chosen.prefix


def recorded_value(prefix: str, name: str) -> Optional[float]:
  """A scalar variable of a checkpoint (e.g. best_accuracy), or None."""
  try:
    return float(
      tf.train.load_checkpoint(prefix).get_tensor(
        f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
      )
    )
  except Exception:  # pylint: disable=broad-except
    return None


def _process_start(pid: int) -> Optional[str]:
  """The start time of process `pid` (Linux /proc), or None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22 (starttime) follows the command name, which may hold
      # spaces but ends with the last ")".
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: Optional[str]) -> bool:
  """Whether process `pid` (started at `start`, if known) still runs here."""
  if pid <= 0:
    return False  # Not a process id (os.kill would signal a group).
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  # The pid may have been reused by another process since.
  return start is None or _process_start(pid) in (None, start)


class RunLock:
  """An exclusive lock on a run's directory, detected stale after a crash.

  The lock file (`name` in `directory`) holds the host, pid and process
  start time of its owner. It is created with O_EXCL; an existing lock is
  taken over only when its owner is on this host and no longer runs.

  Args:
    directory: the directory to lock (created if missing).
    name: the lock file's name (one per worker of a multi-worker run).

  Raises (on enter):
    ConfigError: the directory cannot be created or written, or another
      live training holds the lock (naming its host and pid).
  """

  def __init__(self, directory: str, name: str = LOCK_FILE):
    self.path = os.path.join(directory, name)
    self._directory = directory
    self._owned = False

  def _record(self):
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "start": _process_start(pid),
    }

  def _create(self):
    descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as f:
      json.dump(self._record(), f)

  def __enter__(self):
    try:
      os.makedirs(self._directory, exist_ok=True)
      for _ in range(50):
        try:
          self._create()
          self._owned = True
          return self
        except FileExistsError:
          pass
        owner = self._owner()
        if owner is None:
          time.sleep(0.1)  # Being written or just released: try again.
          continue
        if owner.get("host") != socket.gethostname() or _alive(
          int(owner.get("pid", -1)), owner.get("start")
        ):
          raise ConfigError(
            f"--model_dir={self._directory} is in use by another training "
            f"(pid {owner.get('pid')} on host {owner.get('host')}, lock "
            f"file {self.path}). Wait for it to end; if it is gone (e.g. "
            f"its machine died), delete the lock file."
          )
        _LOG.warning(
          "Taking over the stale lock %s of pid %s, which no longer runs.",
          self.path,
          owner.get("pid"),
        )
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
    except OSError as error:
      raise ConfigError(
        f"--model_dir={self._directory} cannot be used: "
        f"{error.strerror or error} ({error.filename or self.path})."
      ) from error
    raise ConfigError(
      f"Could not lock --model_dir={self._directory} "
      f"({self.path} keeps changing)."
    )

  def _owner(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:
      # Cut short: being written right now (young), or by a process that
      # crashed while writing it (stale).
      try:
        if time.time() - os.path.getmtime(self.path) < 5.0:
          return None
      except FileNotFoundError:
        return None
      return {"host": socket.gethostname(), "pid": -1}

  def __exit__(self, *unused_exc_info):
    if self._owned:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self._owned = False
