"""The hidden ``.<name>.partial-*`` folder a save writes into, and the cleanup of those that a killed save left.

A save (``checkpoint.CheckpointWriter``) holds an exclusive ``flock`` on ``OWNER_FILE`` inside its partial folder
for as long as it runs. The operating system releases that lock when the process ends, however it ends (SIGKILL,
OOM killer), so a later save can tell a leftover from a save still in progress by trying to take the lock: unlike a
process id, the lock means the same in every PID namespace (containers sharing a volume) and cannot be recycled.

Only leftovers recorded by this machine (same host name) are ever removed; on Windows, which has no ``flock``,
nothing is removed automatically.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

OWNER_FILE = ".writer.json"
PARTIAL_MARK = ".partial-"

log = logging.getLogger(__name__)


def partial_prefix(folder: Path) -> str:
    """The name prefix of the partial folders of a save into ``folder``."""
    return f".{folder.name}{PARTIAL_MARK}"


class WriterLock:
    """The running save's claim on its partial folder: ``OWNER_FILE`` (pid and host, for people reading it) under
    an exclusive lock. The file is written and locked under a temporary name, then renamed, so a cleanup never sees
    it unlocked."""

    def __init__(self, partial: Path) -> None:
        self.path = partial / OWNER_FILE
        staging = partial / (OWNER_FILE + ".new")
        self.handle: IO[str] | None = open(staging, "w", encoding="utf-8")  # noqa: SIM115 - held until release
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, self.handle)
        self.handle.flush()
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: this leftover is never cleaned up
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(staging, self.path)

    def release(self) -> None:
        """Unlock and delete ``OWNER_FILE`` (before the folder is renamed into place)."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()
            self.handle = None


def _is_abandoned(partial: Path) -> bool:
    """True when ``partial`` has an owner record from this host whose lock nobody holds."""
    if fcntl is None:
        return False
    try:
        with open(partial / OWNER_FILE, encoding="utf-8") as handle:
            owner = json.load(handle)
            if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while its save runs
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return True
    except (OSError, ValueError):
        return False


def remove_abandoned_writes(folder: Path) -> None:
    """Delete the partial folders of earlier saves into ``folder`` whose process is gone."""
    for entry in folder.parent.glob(glob.escape(partial_prefix(folder)) + "*"):
        if entry.is_dir() and _is_abandoned(entry):
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s, left by an interrupted save (its process is gone)", entry)
