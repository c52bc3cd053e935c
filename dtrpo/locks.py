"""One run at a time per output: a lock file made with O_EXCL, holding the pid and host of its run.

A lock whose pid no longer exists on this host is stale (its run was killed) and is taken over, so a
crash never blocks the next run. A process may take a lock it already holds (nested `hold`s of one
path), as the CLI holds the output folder around `train` and the final save, and `train` holds it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

_held: dict[str, int] = {}  # lock path -> how many nested `hold`s of this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held by a live run


def _stale(holder: dict) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _take(path: Path) -> bool:
    """Create the lock file; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
    return True


def acquire(path: Path, what: str) -> None:
    """Take the lock at `path` for `what` (a flag and its value, as the error names it), or raise a
    ValueError naming the run that holds it."""
    key = str(path.resolve())
    if _held.get(key):
        _held[key] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
        if _take(path):
            _held[key] = 1
            return
        holder = _holder(path)
        if not _stale(holder):
            break
        path.unlink(missing_ok=True)
    raise ValueError(
        f"{what} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
        f"{holder.get('since', '?')}; lock file {path}): wait for it to finish, or delete the lock file if that "
        "run is gone"
    )


def release(path: Path) -> None:
    key = str(path.resolve())
    _held[key] = _held.get(key, 1) - 1
    if _held[key] <= 0:
        del _held[key]
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(path: str | Path, what: str) -> Iterator[None]:
    """The lock at `path` for the duration of the block (see `acquire`)."""
    path = Path(path)
    acquire(path, what)
    try:
        yield
    finally:
        release(path)
