"""One writer at a time for an output folder: `RunLock` (a training run directory, a synthesis run).

It sits on the ground floor of the layering (it imports nothing of sam_fast), so that both
`sam_fast.train` and `sam_fast.synthesis` take the same lock without either importing the other;
`sam_fast.train.outputs` re-exports it under its old names.

``OUT/.lock`` is created exclusively and holds {"pid", "host", "started"}; a lock whose process is
gone (same host, pid not running) is stale and taken over, any other is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


def _notice(msg: str) -> None:
    print(f"sam_fast: {msg}", file=sys.stderr, flush=True)


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (or it cannot be told to be stale)."""


def _pid_alive(pid) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """Exclusive use of a run directory by this process (``with RunLock(out): ...`` or acquire/release).

    ``OUT/.lock`` is created with O_EXCL and holds {"pid", "host", "started"}. A lock left by a process
    that no longer runs on this host is stale: it is replaced (said in one line). A live one, or one
    from another host (whose process cannot be checked), raises `RunLockedError` naming holder and file."""

    def __init__(self, output: str | os.PathLike, notice=_notice):
        self.out = Path(output)
        self.path = self.out / LOCK_FILE
        self.notice = notice
        self.info = None

    def _read(self):
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError, RecursionError):
            return None

    def acquire(self) -> RunLock:
        """Take the lock; returns self."""
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage
                    time.sleep(0.2)
                    holder = self._read()
                    if holder is None:
                        raise RunLockedError(f"{self.path}: unreadable lock file; if no process trains into "
                                             f"{self.out}, delete it") from None
                if holder.get("host") == info["host"] and not _pid_alive(holder.get("pid")):
                    self._take_over(holder)
                    continue
                raise RunLockedError(
                    f"{self.out} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')}; if that process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
            self.info = info
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _take_over(self, holder: dict) -> None:
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # another process removed it first
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # a fresh lock taken meanwhile by another process: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            self.notice(f"{self.out}: removed a stale lock of pid {holder.get('pid')} on {holder.get('host')} "
                        "(no longer running)")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if self.info is not None and self._read() == self.info:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
