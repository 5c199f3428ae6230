"""The headless core and its CLI never import napari or Qt (DESIGN.md: one direction of imports)."""

import subprocess
import sys

FORBIDDEN = ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "magicgui", "vispy")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.strip().split(",") if m}


def test_core_import_pulls_no_gui():
    assert _imported_after("import wsimil_core") == set()


def test_core_modules_and_cli_pull_no_gui():
    code = (
        "import wsimil_core.models, wsimil_core.methods, wsimil_core.functional\n"
        "import wsimil_core.cli\n"
        "from wsimil_core.cli import app\n"
    )
    assert _imported_after(code) == set()


def test_cli_help_runs_without_gui():
    out = subprocess.run([sys.executable, "-m", "wsimil_core", "--help"], capture_output=True, text=True, check=True)
    assert "wsimil" in out.stdout
