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


def test_method_commands_are_sub_apps_and_old_names_still_work(tmp_path, capsys):
    """`wsimil <method> <command>` is the home of a method's commands; the 0.1 top-level name still runs the
    same command and says where it moved."""
    from wsimil_core.cli import main
    from wsimil_core.cli.methods import MOVED, method_apps

    apps = method_apps()
    for old, (method, command) in MOVED.items():
        assert command in [c.name for c in apps[method].registered_commands], (old, method, command)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train/attention_jsd\n1,0.5\n2,0.25\n")
    main(["asmil", "attention-jsd", str(run)])
    new = capsys.readouterr()
    assert "moved" not in new.err and "2.5000e-01" in new.out
    main(["attention-jsd", str(run)])
    old = capsys.readouterr()
    assert "`wsimil attention-jsd` moved to `wsimil asmil attention-jsd`" in old.err
    assert old.out == new.out


def test_train_on_a_damaged_slide_stops_with_one_line_naming_it_and_the_fix(synthetic_store, tmp_path):
    """Issue 17 item 1: a corrupt chunk read in a DataLoader worker is one line (slide + fix), not a traceback."""
    import shutil

    import yaml

    root = tmp_path / "cohort"
    shutil.copytree(synthetic_store.root, root)  # the session fixture stays intact
    store = root / "store.zarr"
    chunk = next(
        p for p in (store / "slide_05" / "features" / synthetic_store.encoder_id / "c").rglob("*") if p.is_file()
    )
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    config = {
        "method": "abmil",
        "data": {"store": str(store), "labels": str(root / "labels.csv"), "num_workers": 1},
        "train": {"epochs": 1},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out = _run("train", str(tmp_path / "cfg.yaml"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "DataLoader worker" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "slide_05" in lines[0] and f"wsimil store verify --repair {store}" in lines[0]
