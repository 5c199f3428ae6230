"""A small, Qt-free runner for long CLI jobs (``wsimil train``, ``wsimil extend``) started from the widgets.

The child runs in its own process (a crash cannot take napari down). A reader thread collects its merged
stdout/stderr line by line (``\\r`` of progress bars counts as a line end) into a queue; the GUI drains it with
``poll()`` from a timer, so nothing blocks the event loop. ``interrupt()`` sends SIGINT, which the trainer
turns into "save the state of the last finished epoch and exit"; ``stop()`` escalates to SIGTERM and SIGKILL
when the child does not exit in time.

Line parsers (also Qt-free):
    ``parse_progress(line) -> (done, total) | None``: ``extend: epoch 2/5 ...`` and tqdm's ``| 9/20 [``.
    ``parse_epoch_metrics(line) -> EpochLine | None``: the trainer's per-epoch line
    (``train epoch 3  loss 0.6931  val/loss 0.7  val/auc 0.81  *``) and the extension's
    (``extend: epoch 2/5 loss 0.41 val_auc 0.77``).
    ``last_error_line(lines)``: the line that explains a failure (``error: ...`` or a traceback's last line).
"""

from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: exit codes that mean "stopped by SIGINT" (the CLI exits 130; an uncaught KeyboardInterrupt gives -SIGINT).
INTERRUPTED_CODES = (130, -int(signal.SIGINT))


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

    Use::

        runner = ProcessRunner(wsimil_command("train", "run.yaml")).start()
        while runner.running:
            for line in runner.poll(): ...
        runner.returncode
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        keep: int = 5000,
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
        return self.proc.poll() is None or not self._eof.is_set() or not self._queue.empty()

    @property
    def finished(self) -> bool:
        return self.proc is not None and not self.running

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

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit and its output to be read; returns the exit status (None on timeout)."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._eof.wait(timeout=5.0)
        self.poll()
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

_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)"
_PAIR = re.compile(rf"(?P<key>[A-Za-z_][\w/.-]*)\s+(?P<value>{_NUMBER})(?=\s|$)")
_TRAIN_EPOCH = re.compile(r"^(?P<phase>[A-Za-z_][\w-]*) epoch (?P<epoch>\d+)\s{2}(?P<rest>.*)$")
_EXTEND_EPOCH = re.compile(r"^extend: epoch (?P<epoch>\d+)/(?P<total>\d+)\s+(?P<rest>.*)$")
_FRACTION_EPOCH = re.compile(r"\bepoch (?P<done>\d+)/(?P<total>\d+)\b")
_TQDM = re.compile(r"\|\s*(?P<done>\d+)/(?P<total>\d+)\s*\[")
_TRACEBACK_LAST = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b:?")


@dataclass
class EpochLine:
    """One per-epoch line of ``wsimil train`` or ``wsimil extend``.

    Attributes:
        phase: the method's phase (``train``, ``teacher``, ...; ``extend`` for task extension).
        epoch: 1-based epoch within the phase.
        total: epochs of the phase when the line says (``extend: epoch 2/5``), else None.
        metrics: ``{"loss": ..., "val/auc": ...}`` as printed.
        best: the line ends with ``*`` (the best epoch so far).
    """

    phase: str
    epoch: int
    total: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    best: bool = False


def _pairs(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in _PAIR.finditer(text):
        try:
            out[m.group("key")] = float(m.group("value"))
        except ValueError:
            out[m.group("key")] = math.nan
    return out


def parse_epoch_metrics(line: str) -> EpochLine | None:
    """Parse a per-epoch metric line (see the module docstring); None for any other line."""
    line = line.strip()
    m = _EXTEND_EPOCH.match(line)
    if m:
        return EpochLine("extend", int(m.group("epoch")), int(m.group("total")), _pairs(m.group("rest")))
    m = _TRAIN_EPOCH.match(line)
    if m:
        rest = m.group("rest")
        metrics = _pairs(rest)
        if "loss" not in metrics:
            return None
        return EpochLine(m.group("phase"), int(m.group("epoch")), None, metrics, rest.rstrip().endswith("*"))
    return None


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from ``... epoch 2/5 ...`` or a tqdm bar ``...| 9/20 [...``; None otherwise."""
    m = _FRACTION_EPOCH.search(line) or _TQDM.search(line)
    if not m:
        return None
    done, total = int(m.group("done")), int(m.group("total"))
    return (done, total) if total > 0 else None


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


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass (headless helper for scripts and tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


__all__ = [
    "ProcessRunner",
    "EpochLine",
    "INTERRUPTED_CODES",
    "child_env",
    "wsimil_command",
    "parse_epoch_metrics",
    "parse_progress",
    "last_error_line",
    "wait_for",
]
