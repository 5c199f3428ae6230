"""OS file locks: one run per run folder, and short store-wide locks around a feature store's replacements.

Both are ``flock(2)`` locks on a file named :data:`LOCK_FILE` inside the folder. The kernel drops a lock when its
holder exits or is killed, so a crash never leaves a folder locked (the file itself stays; it is only a handle).
The lock file is opened without following links (``O_NOFOLLOW``): a link planted in its place is refused.

* :func:`hold_folder`: an exclusive lock taken without waiting and held for a whole run. The holder writes its
  pid, host, start time and command into the file; a second process is refused with a :class:`LockError` that
  quotes them.
* :func:`folder_lock`: an exclusive (writers) or shared (readers) lock that waits, held for a few renames.

POSIX only: on other systems (no ``fcntl``) nothing is locked and a ``RuntimeWarning`` says so once. Over NFS,
Linux maps ``flock`` onto NFS byte-range locks, which work between hosts when the server supports locking.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsimil_core.errors import LockError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking, see _unsupported
    fcntl = None  # type: ignore[assignment]

#: the lock file inside a locked folder (a run folder, a feature store)
LOCK_FILE = ".wsimil-lock"
_warned = False


def _unsupported(folder: Path) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"{folder}: file locks are not available on this system ({sys.platform}); wsimil cannot stop two "
            "processes from writing the same run folder or store at once, so do not start them together",
            RuntimeWarning,
            stacklevel=3,
        )


def _open(path: Path, readonly_ok: bool) -> int | None:
    """An fd of the lock file (created when missing); None when it cannot be opened and ``readonly_ok``."""
    flags = os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, os.O_RDWR | flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(
                f"{path}: is a symbolic link; wsimil does not follow links for its lock files (remove it)"
            ) from None
        if not readonly_ok:
            raise LockError(f"{path}: cannot open the lock file: {exc.strerror or exc}") from None
    try:  # a read-only store: a shared lock on a read-only fd still works when the file exists
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it has not written its name yet)"
    out = f"process {info.get('pid')} on host {info.get('host', '?')}"
    if info.get("started"):
        out += f", started {info['started']}"
    if info.get("command"):
        out += f" ({info['command']})"
    return out


@contextmanager
def hold_folder(folder: str | os.PathLike, what: str = "folder", hint: str = "") -> Iterator[None]:
    """Hold ``folder``'s lock for the body (exclusive, not waiting); the folder must exist.

    Args:
        folder: the folder to lock (``folder/.wsimil-lock``).
        what: what the folder is, for the message (``"run folder"``).
        hint: the end of the message (what to do instead).

    Raises:
        LockError: another process (or another open of this process) holds it; the message names the holder's
            pid, host, start time and command.
    """
    folder = Path(folder)
    if fcntl is None:
        _unsupported(folder)
        yield
        return
    fd = _open(folder / LOCK_FILE, readonly_ok=False)
    assert fd is not None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockError(
                f"{folder}: this {what} is in use by {_holder(fd)}" + (f"; {hint}" if hint else "")
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(" ".join(sys.argv).split())[:300],  # one line, whatever the arguments hold
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a later contender must not quote a finished holder
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Wait for and hold ``folder``'s lock for the body: exclusive for writers, ``shared`` for readers.

    A reader that cannot open the lock file (a read-only store without one) reads without it. Do not nest: a
    second lock of the same folder in one process waits for the first forever.
    """
    folder = Path(folder)
    if fcntl is None:
        _unsupported(folder)
        yield
        return
    fd = _open(folder / LOCK_FILE, readonly_ok=shared)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "hold_folder", "folder_lock"]
