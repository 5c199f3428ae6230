"""The headless core and its CLI never import napari or Qt (DESIGN.md: one direction of imports).

``pip install .`` is a headless training server: the core dependencies name no GUI package, and the core, its
public API and the ``wsimil`` command work when every GUI package is unimportable.
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FORBIDDEN = ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "magicgui", "vispy")
# Made unimportable in the headless subprocesses below (the top-level names of napari's GUI stack).
GUI_PACKAGES = ("napari", "npe2", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy", "superqt")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# Prepended to the subprocess code: a meta-path finder that refuses every GUI package, as if not installed.
_BLOCKER = textwrap.dedent(
    f"""
    import sys

    _BLOCKED = {GUI_PACKAGES!r}
    assert not [m for m in sys.modules if m.split(".")[0] in _BLOCKED], "a GUI package was imported at start-up"


    class _NoGui:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: headless test)", name=name)
            return None


    sys.meta_path.insert(0, _NoGui())
    """
)


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.strip().split(",") if m}


def _run_headless(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], capture_output=True, text=True)


def test_core_import_pulls_no_gui():
    assert _imported_after("import wsimil_core") == set()


def test_core_modules_and_cli_pull_no_gui():
    code = (
        "import wsimil_core.models, wsimil_core.methods, wsimil_core.functional\n"
        "import wsimil_core.api\n"
        "import wsimil_core.cli\n"
        "from wsimil_core.cli import app\n"
    )
    assert _imported_after(code) == set()


def test_cli_help_runs_without_gui():
    out = subprocess.run([sys.executable, "-m", "wsimil_core", "--help"], capture_output=True, text=True, check=True)
    assert "wsimil" in out.stdout


def test_blocker_makes_gui_packages_unimportable():
    """The finder the headless tests rely on really refuses napari and Qt (else those tests prove nothing)."""
    out = _run_headless(
        """
        refused = []
        for name in ("napari", "qtpy", "PyQt6", "PyQt5", "magicgui", "npe2"):
            try:
                __import__(name)
            except ImportError:
                refused.append(name)
        print(",".join(refused))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "napari,qtpy,PyQt6,PyQt5,magicgui,npe2"


def test_core_and_api_import_with_gui_packages_missing():
    out = _run_headless(
        """
        import wsimil_core
        import wsimil_core.api as api

        assert api.list_models() and api.list_methods()
        print(wsimil_core.__version__)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_wsimil_help_runs_with_gui_packages_missing():
    """``wsimil --help`` and every command's ``--help`` (the console script's entry point, ``cli:main``)."""
    out = _run_headless(
        """
        import typer.main

        from wsimil_core.cli import app, main


        def helps(cmd, prefix):
            yield [*prefix, "--help"]
            for name, sub in sorted(getattr(cmd, "commands", {}).items()):
                yield from helps(sub, [*prefix, name])


        n = 0
        for argv in helps(typer.main.get_command(app), []):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
            n += 1
        print("helps:", n)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "Usage: wsimil" in out.stdout
    n_helps = int(re.search(r"helps: (\d+)", out.stdout).group(1))
    assert n_helps > 10  # the top level and every command


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_name_no_gui_package():
    project = _pyproject()["project"]
    gui = {"napari", "npe2", "magicgui", "qtpy", "pyqt5", "pyqt6", "pyside2", "pyside6", "vispy", "superqt"}
    core = {_dist_name(r) for r in project["dependencies"]}
    assert core and not core & gui
    napari_extra = {_dist_name(r) for r in project["optional-dependencies"]["napari"]}
    assert {"napari", "npe2", "magicgui", "qtpy"} <= napari_extra
    # a Qt6 binding: napari warns on every start that PyQt5 is deprecated
    assert napari_extra & {"pyqt6", "pyside6"} and not napari_extra & {"pyqt5", "pyside2"}


def test_version_has_one_source():
    """The distribution's version is read from ``wsimil_core.__version__``; the plugin reports the same one."""
    import napari_wsimil
    import wsimil_core

    data = _pyproject()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "wsimil_core.__version__"}
    assert napari_wsimil.__version__ == wsimil_core.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", wsimil_core.__version__)
