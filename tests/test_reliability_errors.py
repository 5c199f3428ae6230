"""Issue 17 item 8: silent or misleading errors become one clear line (full disk, SIGINT of extract, truncated
TIFFs, directories named like slides)."""

from __future__ import annotations

import errno

import pytest
import yaml

from test_trainer import make_config
from wsimil_core.cli import main
from wsimil_core.engine.checkpoint import load_state


def test_full_disk_during_training_names_the_file_and_keeps_the_last_resume(
    synthetic_store, tmp_path, monkeypatch, capsys
):
    """ENOSPC while writing the resume file: one error line naming it; the previous resume file is intact and the
    same command finishes the run once there is space again."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"resume": 0}

    def full_disk(tensors, filename, metadata=None):
        if "resume.safetensors" in str(filename):
            calls["resume"] += 1
            if calls["resume"] >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    run = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(make_config(synthetic_store, run, train_opts={"epochs": 3})))
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit) as stop:
        main(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"error: {run / 'resume.safetensors'}: ") and "No space left on device" in line
    assert "previous file is kept" in line and "re-run the same command" in line
    assert "Traceback" not in line and "safetensors" not in line.split(": ", 2)[2]
    _, meta = load_state(run / "resume.safetensors")  # the last good one, from epoch 1
    assert not meta.get("completed")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    main(["train", str(path)])
    assert (run / "result.json").is_file()


def test_full_disk_in_any_other_writer_is_one_line(synthetic_store, tmp_path, monkeypatch, capsys):
    """ENOSPC from a plain writer (metrics.jsonl) is one line naming the file, not a traceback."""
    import wsimil_core.engine.run_outputs as run_outputs

    def full_disk(path, text, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_outputs, "atomic_write_text", full_disk)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", _write(tmp_path, make_config(synthetic_store, run, train_opts={"epochs": 1}))])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {run}") and "No space left on device" in err[0] and "re-run" in err[0]


def _write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_sigint_of_extract_says_what_is_kept_and_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the process group, worker pool included) exits 130 with one line naming the store and
    the way to resume; the same command then finishes, skipping the slides already done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_extract import _tissue_slide

    slides = [str(_tissue_slide(tmp_path / f"s{i}.tif", i)) for i in range(5)]
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "wsimil_core", "extract", *slides, "--store", str(store), "--mpp", "0.5"]
    cmd += ["--patch", "32", "--min-tissue", "0.5", "--workers", "2", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.is_dir() and any(p.is_dir() for p in store.glob("s[0-9]")):
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and str(store) in last and "re-run the same command" in last
    done = sorted(p.name for p in store.glob("s[0-9]") if p.is_dir())
    assert 1 <= len(done) < 5, done
    again = subprocess.run(cmd, capture_output=True, env=env, timeout=300, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipped {len(done)} already done" in again.stdout


def test_interrupted_extract_prints_what_is_kept(tmp_path, monkeypatch, capsys):
    """In-process: a KeyboardInterrupt inside extract (typer makes it Exit(130)) still prints the note, exit 130."""
    import wsimil_core.features.extract as extract

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "extract_cohort", interrupted)
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        main(["extract", str(slide), "--store", str(tmp_path / "store"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 130
    assert err[-1].startswith("interrupted: ") and str(tmp_path / "store") in err[-1] and "re-run" in err[-1]


def test_directory_named_like_a_slide_is_reported_by_extract_and_tile(tmp_path, capsys):
    """A folder ``x.svs`` (given, or inside a given folder) is one line "<path>: a directory, not a slide file" in
    both ``extract`` and ``tile``, and the command exits 1; never silently skipped."""
    folder = tmp_path / "slides"
    bogus = folder / "x.svs"
    bogus.mkdir(parents=True)
    expected = f"{bogus}: a directory, not a slide file"
    common = ["--device", "cpu", "--no-progress", "--workers", "0"]
    runs = {
        "extract given": ["extract", str(bogus), "--store", str(tmp_path / "store"), *common],
        "extract folder": ["extract", str(folder), "--store", str(tmp_path / "store"), *common],
        "tile": ["tile", str(bogus), "--out", str(tmp_path / "tiles")],
    }
    for name, args in runs.items():
        with pytest.raises(SystemExit) as stop:
            main(args)
        captured = capsys.readouterr()
        assert stop.value.code == 1, name
        assert expected in captured.out + captured.err, (name, captured.err[-500:])


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_tiff_fails_info_with_the_cause(tmp_path, capsys, keep):
    """A TIFF cut short (tile data, or a later pyramid level's directory, past the end) is refused by ``wsimil
    info`` with one line naming the file, the damage and OpenSlide's own message (no exit 0 on the header)."""
    from test_extract import _tissue_slide

    whole = _tissue_slide(tmp_path / "whole.tif", 1)
    cut = tmp_path / "cut.tif"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    main(["info", str(whole)])  # the intact file still opens
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["info", str(cut)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1
    assert err[-1].startswith(f"error: {cut}: truncated or damaged TIFF") and "OpenSlide: " in err[-1], err


_FILE_LIMIT = """
import resource, signal, sys
import torch
from wsimil_core.engine.checkpoint import load_state, save_state
from wsimil_core.errors import CheckpointError
path = sys.argv[1]
save_state(path, {"w": torch.zeros(10)}, {"epoch": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.RLIM_INFINITY))
try:
    save_state(path, {"w": torch.ones(1 << 20)}, {"epoch": 2})
except CheckpointError as exc:
    print("ERROR", exc)
tensors, meta = load_state(path)
print("KEPT", meta["epoch"], tensors["w"].shape[0])
"""


def test_real_write_failure_inside_safetensors_is_wrapped(tmp_path):
    """A real I/O error inside safetensors' own (Rust) writer, not a mock: a file-size limit (EFBIG, like a full
    disk) gives the CheckpointError naming the file, and the previous resume file is intact."""
    import subprocess
    import sys

    path = tmp_path / "resume.safetensors"
    proc = subprocess.run([sys.executable, "-c", _FILE_LIMIT, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"ERROR {path}: cannot write (") and "previous file is kept unchanged" in lines[0]
    assert lines[1] == "KEPT 1 10"
    assert [p.name for p in tmp_path.iterdir()] == ["resume.safetensors"]  # no temp file left
