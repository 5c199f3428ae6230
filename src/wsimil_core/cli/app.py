"""The typer application object shared by the command modules."""

from __future__ import annotations

from dataclasses import dataclass

import typer


@dataclass
class CLIState:
    debug: bool = False
    #: what a command keeps when interrupted (Ctrl-C) and how to resume; printed by ``main`` on exit 130
    interrupt_note: str = "finished work is kept; re-run the same command to resume"

    def start(self, args: list[str]) -> None:
        """A fresh state for one ``main`` call with these arguments."""
        self.debug = "--debug" in args
        self.interrupt_note = CLIState.interrupt_note


state = CLIState()

app = typer.Typer(
    name="wsimil",
    help="Weakly-supervised multiple-instance learning on whole-slide images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """wsimil: slides -> tissue -> patches -> features -> MIL models -> maps."""
    state.debug = state.debug or debug
