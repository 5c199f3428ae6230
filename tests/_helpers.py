"""Plain helpers shared by several test modules (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

NO_DISPLAY_REASON = "no display (install Xvfb so pytest-xvfb can start one)"


def display_available() -> bool:
    """A display exists (pytest-xvfb sets DISPLAY before collection when Xvfb is installed)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")


def train_from_config(config: dict, path) -> Path:
    """Write ``config`` as YAML to ``path``, run ``wsimil train`` on it, and return the run directory."""
    import yaml

    from wsimil_core.cli import main

    Path(path).write_text(yaml.safe_dump(config))
    main(["train", str(path)])
    return Path(config["output"]["dir"])
