"""A small, Qt-free runner for long CLI jobs (``wsimil train``, ``wsimil mecds extend``) started from the docks.

The child runs in its own process (a crash cannot take napari down). A reader thread collects its merged
stdout/stderr line by line (``\\r`` of progress bars counts as a line end) into a queue; the GUI drains it with
``poll()`` from a timer, so nothing blocks the event loop. The console is for the log view and error messages
only: a run's numbers come from its ``metrics.jsonl``, which a second thread tails
(:class:`~napari_wsimil._metrics_tail.MetricsTail`) when the runner is given ``metrics=PATH``; the GUI drains
the new rows with ``poll_metrics()``. ``interrupt()`` sends SIGINT, which the trainer turns into "save the state
of the last finished epoch and exit"; ``stop()`` escalates to SIGTERM and SIGKILL when the child does not exit
in time. ``last_error_line(lines)`` picks the line that explains a failure (``error: ...`` or a traceback's last
line).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_wsimil._metrics_tail import MetricsTail

#: seconds between two reads of a run's metrics file by the tail thread.
METRICS_INTERVAL = 0.25


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a CLI child: unbuffered output, wide rich lines (no wrapping), no colour codes."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "250"
    env["NO_COLOR"] = "1"
    env["TERM"] = "dumb"
    env.pop("FORCE_COLOR", None)
    env.update(extra or {})
    return env


def wsimil_command(*args: str) -> list[str]:
    """``[python, -m, wsimil_core, *args]`` with this interpreter (the plugin's environment)."""
    return [sys.executable, "-m", "wsimil_core", *[str(a) for a in args]]


class ProcessRunner:
    """Run one command in a child process and stream its output lines.

    Args:
        argv: the command, e.g. ``wsimil_command("train", "run.yaml")``.
        cwd: working directory of the child.
        env: extra environment variables (added to ``child_env()``).
        keep: how many output lines ``lines`` keeps (the oldest are dropped).
        metrics: a JSON-lines file the child writes (``<run dir>/metrics.jsonl``); a thread tails it every
            ``METRICS_INTERVAL`` s while the child runs and once after it exits (see ``poll_metrics``).
        skip_existing_metrics: ignore that file until the child changes it (a stale file of an earlier run).

    Use::

        runner = ProcessRunner(wsimil_command("train", "run.yaml")).start()
        while runner.running:
            for line in runner.poll(): ...
            reset, rows = runner.poll_metrics()
        runner.returncode
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        keep: int = 5000,
        metrics: str | os.PathLike | None = None,
        skip_existing_metrics: bool = False,
    ):
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd) if cwd is not None else None
        self.env = child_env(env)
        self.keep = keep
        self.lines: list[str] = []
        self.interrupted = False
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._eof = threading.Event()
        self.metrics: list[dict[str, Any]] = []
        self._tail = MetricsTail(metrics, skip_existing_metrics) if metrics is not None else None
        self._metrics_queue: queue.Queue[tuple[bool, list[dict[str, Any]]]] = queue.Queue()
        self._watcher: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> ProcessRunner:
        """Start the child (its own process group, so a Ctrl-C in napari's terminal does not reach it)."""
        if self.proc is not None:
            raise RuntimeError("this runner was already started; create a new one")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,  # universal newlines: "\r" of progress bars ends a line too
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        self._reader = threading.Thread(target=self._read, name="wsimil-runner-reader", daemon=True)
        self._reader.start()
        if self._tail is not None:
            self._watcher = threading.Thread(target=self._watch, name="wsimil-runner-metrics", daemon=True)
            self._watcher.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                if line.strip():
                    self._queue.put(line)
        finally:
            self.proc.stdout.close()
            self._queue.put(None)
            self._eof.set()

    def _watch(self) -> None:
        assert self.proc is not None and self._tail is not None
        while True:
            exited = self.proc.poll() is not None and self._eof.is_set()
            reset, rows = self._tail.read()  # after the exit check: the last read sees the final file
            if reset or rows:
                self._metrics_queue.put((reset, rows))
            if exited:
                return
            time.sleep(METRICS_INTERVAL)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has exited (None while it runs or before ``start``)."""
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        """True while the child runs or its output is not fully read yet."""
        if self.proc is None:
            return False
        if self.proc.poll() is None or not self._eof.is_set() or not self._queue.empty():
            return True
        return (self._watcher is not None and self._watcher.is_alive()) or not self._metrics_queue.empty()

    def poll(self) -> list[str]:
        """New output lines since the last call (never blocks)."""
        new: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                new.append(item)
        if new:
            self.lines.extend(new)
            if len(self.lines) > self.keep:
                del self.lines[: len(self.lines) - self.keep]
        return new

    def poll_metrics(self) -> tuple[bool, list[dict[str, Any]]]:
        """``(reset, rows)``: metrics rows since the last call (never blocks). ``reset`` means the rows returned
        before are void (the file was restarted) and ``rows`` are the file's rows from the start. ``metrics``
        holds every row of the current file."""
        reset, rows = False, []
        while True:
            try:
                batch_reset, batch = self._metrics_queue.get_nowait()
            except queue.Empty:
                break
            if batch_reset:
                reset, rows = True, []
            rows.extend(batch)
        if reset:
            self.metrics = []
        self.metrics.extend(rows)
        return reset, rows

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit and its output to be read; returns the exit status (None on timeout)."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._eof.wait(timeout=5.0)
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
        self.poll()
        self.poll_metrics()
        return self.proc.returncode

    # --- stopping -----------------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Send SIGINT (Ctrl-C): the trainer keeps the state of its last finished epoch and exits.

        Returns False when the child is not running. On Windows this sends CTRL_BREAK_EVENT.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        self.interrupted = True
        try:
            if os.name == "nt":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                self.proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def terminate(self) -> None:
        """SIGTERM (the current epoch is lost; finished epochs are on disk)."""
        if self.proc is not None and self.proc.poll() is None:
            self.interrupted = True
            self.proc.terminate()

    def kill(self) -> None:
        """SIGKILL: last resort."""
        if self.proc is not None and self.proc.poll() is None:
            self.interrupted = True
            self.proc.kill()

    def stop(self, grace: float = 30.0, term_grace: float = 5.0) -> int | None:
        """Stop cleanly, blocking: SIGINT, then SIGTERM after ``grace`` s, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.interrupt():
            if self.wait(grace) is not None:
                return self.proc.returncode
            self.terminate()
            if self.wait(term_grace) is not None:
                return self.proc.returncode
            self.kill()
        return self.wait()

    # --- outcome ------------------------------------------------------------------------------------------
    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    @property
    def was_interrupted(self) -> bool:
        """Exited after ``interrupt()``/``stop()`` (exit 130, -SIGINT, or SIGTERM/SIGKILL after escalation)."""
        rc = self.returncode
        return rc is not None and self.interrupted and rc != 0

    def error_line(self) -> str:
        """The line that explains a failure (see ``last_error_line``)."""
        return last_error_line(self.lines, self.returncode)


# --- parsing --------------------------------------------------------------------------------------------------

_TRACEBACK_LAST = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b:?")


def last_error_line(lines: Sequence[str], returncode: int | None = None) -> str:
    """The line that best explains a failure.

    Preference: the CLI's one-line ``error: ...``; else a traceback's last line (``ValueError: ...``); else
    the last non-empty line; else a sentence naming the exit status.
    """
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if _TRACEBACK_LAST.match(line.strip()) and not line.startswith((" ", "\t")):
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"the process was killed by {name}"
    return f"the process exited with status {returncode}"


__all__ = ["METRICS_INTERVAL", "ProcessRunner", "child_env", "last_error_line", "wsimil_command"]
