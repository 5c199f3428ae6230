"""The ``wsimil`` command line (typer). Generic commands live in topic modules that add themselves to ``app``;
each method's commands are its own sub-app, mounted as ``wsimil <method> ...`` (``cli.methods``).

Errors that are the user's input (``WsimilError``) print as one line and exit 1; ``--debug`` shows the
traceback. The CLI never imports napari or Qt.
"""

from __future__ import annotations

import errno
import sys
from importlib import import_module
from typing import Any

from wsimil_core.cli import cohort, data, extract, predict, quickstart, store, train  # noqa: F401  (add their commands)
from wsimil_core.cli.app import app, state
from wsimil_core.cli.methods import mount_method_commands

mount_method_commands(app)  # wsimil <method> <command>: each method's own sub-app (Method.cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``wsimil`` command."""
    from wsimil_core.errors import WsimilError

    args = list(sys.argv[1:] if argv is None else argv)
    state.start(args)
    try:
        exit_code = app(args=args, prog_name="wsimil", standalone_mode=False)
        if exit_code == 130:  # typer turns a KeyboardInterrupt (Ctrl-C, SIGINT) into Exit(130)
            raise KeyboardInterrupt
        if isinstance(exit_code, int) and exit_code != 0:  # typer.Exit(code) returns its code here
            sys.exit(exit_code)
    except WsimilError as exc:
        if state.debug:
            raise
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {state.interrupt_note}", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as exc:  # a full disk or quota in any writer: one line (the safetensors writers say more)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or state.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {where}{exc.strerror}; files are written atomically, so the previous version of each is kept. "
            "Free space and re-run the same command to resume",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as exc:  # click usage errors and friends
        click_exception, abort = _click_error_types()
        if isinstance(exc, click_exception):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(1)
        raise


def user_message(exc: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker process (which torch re-raises with the
    worker's traceback in its message) is reduced to the original one-line message."""
    text = str(exc).strip()
    if "in DataLoader worker" in text and "Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return last[len(prefix) :] if last.startswith(prefix) else last
    return text


def _click_error_types() -> tuple[tuple[type[Any], ...], tuple[type[Any], ...]]:
    """Click's usage-error and abort classes (typer >= 0.29 bundles its own click as ``typer._click``)."""
    usage: list[type[Any]] = []
    abort: list[type[Any]] = []
    for module_name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            module = import_module(module_name)
        except ImportError:
            continue
        usage += [module.ClickException] if hasattr(module, "ClickException") else []
        abort += [module.Abort] if hasattr(module, "Abort") else []
    return tuple(usage), tuple(abort)


__all__ = ["app", "main"]
