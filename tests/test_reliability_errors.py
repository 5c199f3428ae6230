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
