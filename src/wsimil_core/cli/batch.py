"""Batch commands report each bad input and go on: one ``FAILED <input>: <cause>`` line per bad input, a summary
error (exit code 1) at the end; ``--fail-fast`` stops at the first bad input instead."""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from wsimil_core.errors import WsimilError

FAIL_FAST_HELP = "Stop at the first bad input (default: report each one, go on with the others, exit 1 at the end)."


@dataclass
class Failures:
    """The bad inputs of one batch command.

    Attributes:
        what: the kind of input, for messages (``"file"``, ``"slide"``).
        error: the ``WsimilError`` subclass raised at the end (or at the first failure with ``fail_fast``).
        fail_fast: raise at the first failure.
        items: ``{input name: one-line cause}`` in the order they failed.
    """

    what: str
    error: type[WsimilError] = WsimilError
    fail_fast: bool = False
    items: dict[str, str] = field(default_factory=dict)

    def add(self, item: str, cause: str) -> None:
        """Record (and print) one bad input; with ``fail_fast`` raise its error instead."""
        self.items[item] = cause
        line = cause if cause.startswith(item) else f"{item}: {cause}"  # most causes already name their input
        if self.fail_fast:
            raise self.error(f"{line} (--fail-fast: stopped at the first bad {self.what})")
        typer.echo(f"FAILED {line}", err=True)

    def finish(self, total: int) -> None:
        """Raise the summary error (``N of M <what>s failed: a, b``) when any input failed."""
        if self.items:
            names = ", ".join(self.items)
            raise self.error(f"{len(self.items)} of {total} {self.what}(s) failed: {names}")
