"""Mount each method's own commands as ``wsimil <method> <command>`` (the ``Method.cli`` hook).

A method declares ``cli = "wsimil_core.methods.<name>.cli:app"``; its sub-app is added under the method's
name. Commands that lived at the top level in 0.1 keep working for one release as hidden aliases that print
where the command moved (``MOVED``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

import typer

from wsimil_core.methods import list_methods, method_class

#: 0.1 command name -> (method, command name in its sub-app). Removed in 0.3.
MOVED: dict[str, tuple[str, str]] = {
    "abmilx-predict": ("abmilx", "predict"),
    "predict-slide": ("ahdmil", "predict-slide"),
    "attention-jsd": ("asmil", "attention-jsd"),
    "extend": ("mecds", "extend"),
    "memory-gallery": ("momkd", "memory-gallery"),
}


def method_apps() -> dict[str, typer.Typer]:
    """``{method name: typer sub-app}`` for every registered method that declares its own ``cli``."""
    apps: dict[str, typer.Typer] = {}
    for name in list_methods():
        cls = method_class(name)
        ref = cls.__dict__.get("cli")  # declared by this class, not inherited (abmil-anchor is not abmil)
        if not ref:
            continue
        module, _, attr = ref.partition(":")
        apps[name] = getattr(import_module(module), attr or "app")
    return apps


def _moved(callback: Callable[..., Any], old: str, new: str) -> Callable[..., Any]:
    @functools.wraps(callback)  # typer reads the options from the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        print(f"note: `wsimil {old}` moved to `wsimil {new}`; the old name goes away in 0.3", file=sys.stderr)
        return callback(*args, **kwargs)

    return run


def mount_method_commands(app: typer.Typer) -> None:
    """Add every method's sub-app to ``app`` and the hidden 0.1 aliases of ``MOVED``."""
    apps = method_apps()
    for name, sub in apps.items():
        app.add_typer(sub, name=name)
    for old, (method, command) in MOVED.items():
        owner = apps.get(method)
        found = [c for c in (owner.registered_commands if owner else []) if c.name == command]
        if not found or found[0].callback is None:
            raise RuntimeError(f"alias {old!r}: method {method!r} has no command {command!r}")
        app.command(old, hidden=True)(_moved(found[0].callback, old, f"{method} {command}"))


__all__ = ["MOVED", "method_apps", "mount_method_commands"]
