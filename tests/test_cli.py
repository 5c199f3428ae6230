"""The CLI's error contract: usage errors and user errors are one clear message, never a traceback."""

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsimil_core", *args], capture_output=True, text=True)


def test_unknown_option_is_a_usage_error_without_traceback():
    out = _run("--bogus")
    assert out.returncode == 2
    assert "No such option" in out.stderr
    assert "Traceback" not in out.stderr


def test_user_error_is_one_line_and_debug_shows_traceback():
    out = _run("info", "/nonexistent/slide.svs")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error:") and "/nonexistent/slide.svs" in out.stderr
    assert "Traceback" not in out.stderr
    debug = _run("--debug", "info", "/nonexistent/slide.svs")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
