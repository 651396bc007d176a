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

A run's directory is locked while it trains (`RunLock`): an advisory lock
on a lock file that records the host, pid and start time of the process. A
second training of the same directory is refused; a lock whose process is
gone (a crash, SIGKILL) is stale and taken over, by one process only.
"""

import dataclasses
import fcntl
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


def process_runs(pid: int, start: Optional[str] = None) -> bool:
  """Whether process `pid` (started at `start`, if known) runs on this host.

  The model_dir lock and the export's temporary folders use it to tell a
  live owner from one that is gone.
  """
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


def _missing_directories(directory: str) -> List[str]:
  """`directory` and its ancestors that do not exist, deepest first."""
  missing = []
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _parse_record(text: str) -> Optional[dict]:
  """A lock file's record, or None when it is empty or cut short."""
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


class RunLock:
  """An exclusive lock on a run's directory, released when its process ends.

  The lock is an advisory lock (`fcntl.flock`) on the lock file (`name` in
  `directory`), held for as long as the block runs. The kernel grants it to
  one process at a time and releases it when its process ends, however it
  ends: of several processes starting at once (or taking over a lock left
  by a crash) exactly one gets it, and a crashed training never blocks the
  next one. The file records the host, pid and process start time of its
  holder, for the messages. A record naming a live process (or any process
  on another host, which the lock may not reach through a network file
  system) is respected even when no lock is held on the file.

  A directory the lock created (with its missing parents) is removed again
  on release if it is still empty: a run refused before writing anything
  leaves nothing behind.

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
    self._descriptor = None
    self._created = []

  def _record(self):
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "start": _process_start(pid),
    }

  def _open_locked(self) -> Optional[int]:
    """A descriptor of the lock file, locked by this process; None if held.

    Also None when the file was removed or replaced between its opening
    and its locking (a holder releasing it): the caller tries again.
    """
    try:
      descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
      # The directory was removed meanwhile (an empty one, by a refused
      # run that had created it): create it again.
      self._created = _missing_directories(self._directory) + self._created
      os.makedirs(self._directory, exist_ok=True)
      return None
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = os.path.samestat(os.fstat(descriptor), os.stat(self.path))
    except (BlockingIOError, FileNotFoundError):
      locked = False
    except BaseException:
      os.close(descriptor)
      raise
    if not locked:
      os.close(descriptor)
      return None
    return descriptor

  def _in_use(self, owner) -> ConfigError:
    return ConfigError(
      f"--model_dir={self._directory} is in use by another training "
      f"(pid {owner.get('pid')} on host {owner.get('host')}, lock "
      f"file {self.path}). Wait for it to end; if it is gone (e.g. "
      f"its machine died), delete the lock file."
    )

  def _live(self, owner) -> bool:
    """Whether a record names a process that may still use the directory."""
    try:
      pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
      return False
    return owner.get("host") != socket.gethostname() or process_runs(
      pid, owner.get("start")
    )

  def _take(self, descriptor: int) -> None:
    """Writes this process's record into the locked file.

    Raises:
      ConfigError: the previous record names a process that may still use
        the directory.
    """
    with os.fdopen(os.dup(descriptor), "r+") as f:
      previous = _parse_record(f.read())
      if previous is not None and self._live(previous):
        raise self._in_use(previous)
      if previous is not None:
        _LOG.warning(
          "Taking over the stale lock %s of pid %s, which no longer runs.",
          self.path,
          previous.get("pid"),
        )
      f.seek(0)
      f.truncate()
      json.dump(self._record(), f)

  def _owner(self):
    """The record of the lock file, or None if unreadable."""
    try:
      with open(self.path) as f:
        return _parse_record(f.read())
    except FileNotFoundError:
      return None

  def __enter__(self):
    try:
      self._created = _missing_directories(self._directory)
      os.makedirs(self._directory, exist_ok=True)
      for _ in range(50):
        descriptor = self._open_locked()
        if descriptor is not None:
          try:
            self._take(descriptor)
          except BaseException:
            os.close(descriptor)
            raise
          self._descriptor = descriptor
          return self
        owner = self._owner()
        if owner is not None and self._live(owner):
          raise self._in_use(owner)
        # Held, and its record is being written (or is stale and about to
        # be replaced by its new holder): look again.
        time.sleep(0.1)
    except OSError as error:
      self._remove_created()
      raise ConfigError(
        f"--model_dir={self._directory} cannot be used: "
        f"{error.strerror or error} ({error.filename or self.path})."
      ) from error
    except ConfigError:
      self._remove_created()
      raise
    self._remove_created()
    raise ConfigError(
      f"Could not lock --model_dir={self._directory} "
      f"({self.path} is locked, but its record cannot be read)."
    )

  def _remove_created(self):
    """Removes the directories this lock created, if they are empty."""
    for path in self._created:
      try:
        os.rmdir(path)
      except OSError:
        break  # Not empty (or gone): it and its parents stay.
    self._created = []

  def __exit__(self, *unused_exc_info):
    if self._descriptor is None:
      return
    try:
      # Removed while still locked, and only if it is still this lock's
      # file: the next training creates a new one.
      if os.path.samestat(os.fstat(self._descriptor), os.stat(self.path)):
        os.remove(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._descriptor)
      self._descriptor = None
    self._remove_created()
