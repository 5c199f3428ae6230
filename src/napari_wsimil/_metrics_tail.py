"""Incremental reader of a run's ``metrics.jsonl`` (no Qt): the numbers the run docks show come from this file.

``MetricsTail(path).read() -> (reset, new rows)`` reads a JSON-lines file that its writer appends to or rewrites
atomically (the trainer appends a line per epoch, rewriting the file when a run starts or resumes);
``ProcessRunner(..., metrics=PATH)`` calls it from a thread while the child runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the per-epoch rows a wsimil run writes in its run directory (engine ``run_outputs``)
METRICS_FILE = "metrics.jsonl"


class MetricsTail:
    """Incremental reader of a JSON-lines file written by another process (a run's ``metrics.jsonl``).

    ``read()`` returns ``(reset, rows)``: the rows (dicts) completed since the last call, and whether the rows
    returned before are no longer valid (the file was replaced by one that does not continue it: a restarted run,
    or a resumed run that rewrote the epoch it had not finished). A file that does not exist yet gives
    ``(False, [])``, so the tail can start before its writer. Only complete lines (ending in ``\\n``) count; a
    partial last line is read again once it is complete. An atomic rewrite (a new inode, as the trainer's
    ``atomic_write_text`` makes when a run starts or resumes) is read whole and compared with what was consumed, so only
    its new rows are parsed. Appends to the same file are read from the last offset, re-reading the ``CHECK``
    bytes before it to notice a file truncated and rewritten in place. Lines that are not JSON objects are
    skipped and counted in ``bad_lines``.

    Args:
        path: the file.
        skip_existing: ignore the file as it is now (a stale file of an earlier run); read it once it changes.

    Attributes:
        rows: every valid row of the current file, in order.
    """

    #: bytes before the offset compared on each append read (detects an in-place rewrite).
    CHECK = 64

    def __init__(self, path: str | os.PathLike, skip_existing: bool = False):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.bad_lines = 0
        self._consumed = b""
        self._key: tuple[int, int] | None = None
        self._skip = self._stamp() if skip_existing else None

    def _stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """``(reset, new rows)`` since the last call (never raises for a missing or half-written file)."""
        stamp = self._stamp()
        if stamp is None or (self._skip is not None and stamp == self._skip):
            return False, []
        self._skip = None
        key, size = stamp[:2], stamp[2]
        offset = len(self._consumed)
        try:
            with self.path.open("rb") as fh:
                if key == self._key and size >= offset:
                    start = max(0, offset - self.CHECK)
                    fh.seek(start)
                    data = self._consumed[:start] + fh.read()
                else:
                    data = fh.read()
        except OSError:
            return False, []
        self._key = key
        reset = not data.startswith(self._consumed)
        if reset:
            self._consumed, self.rows = b"", []
        end = data.rfind(b"\n") + 1
        if end <= len(self._consumed):
            return reset, []
        new = self._parse(data[len(self._consumed) : end])
        self._consumed = data[:end]
        self.rows.extend(new)
        return reset, new

    def _parse(self, chunk: bytes) -> list[dict[str, Any]]:
        rows = []
        for line in chunk.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                self.bad_lines += 1
        return rows


__all__ = ["METRICS_FILE", "MetricsTail"]
