"""The lock of a run's directory while it trains.

`RunLock` is an advisory lock on a lock file that records the host, pid and
start time of the process. A second training of the same directory is
refused; a lock whose process is gone (a crash, SIGKILL) is stale and taken
over, by one process only.
"""

import fcntl
import json
import logging
import os
import socket
import time

from comln_tf.config import ConfigError

_LOG = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (Linux /proc), or None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22 (starttime) follows the command name, which may hold
      # spaces but ends with the last ")".
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def process_runs(pid: int, start: str | None = None) -> bool:
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


def _missing_directories(directory: str) -> list[str]:
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


def _parse_record(text: str) -> dict | None:
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
    self._created: list[str] = []

  def _record(self):
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "start": _process_start(pid),
    }

  def _open_locked(self) -> int | None:
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
