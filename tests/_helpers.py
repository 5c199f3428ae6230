"""Plain helpers shared by several test modules (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import os
import sys

NO_DISPLAY_REASON = "no display (install Xvfb so pytest-xvfb can start one)"


def display_available() -> bool:
    """A display exists (pytest-xvfb sets DISPLAY before collection when Xvfb is installed)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")
