"""Extend dock: the paper's shared-stream extension (MECDS Sec. 3.4) is reachable from the GUI and runs as such.

GUI tests (``gui`` marker) skip without a display."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def tiny_checkpoint(synthetic_store, tmp_path) -> Path:
    """An untrained mecds checkpoint on the synthetic store's features (tasks label, task_b)."""
    import torch

    from wsimil_core.api import create_model
    from wsimil_core.data.dataset import BagDataset
    from wsimil_core.engine.checkpoint import save_checkpoint

    in_dim = BagDataset(synthetic_store.store, synthetic_store.labels, targets=["label"]).in_dim
    torch.manual_seed(0)
    model = create_model(
        "mecds", in_dim=in_dim, tasks={"label": 2, "task_b": 2}, dim=16, n_heads=2, router_dim=8, dropout=0.0
    )
    path = tmp_path / "base.safetensors"
    save_checkpoint(
        path,
        model,
        {
            "method": "mecds",
            "targets": ["label", "task_b"],
            "class_names": {"label": ["0", "1"], "task_b": ["0", "1"]},
            "train_config": {"data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels)}},
        },
    )
    return path


def test_shared_stream_mode_from_the_dock_gives_a_shared_stream_extension(
    extend_widget, tiny_checkpoint, synthetic_store, tmp_path
):
    from wsimil_core.cli import main
    from wsimil_core.engine.checkpoint import read_checkpoint_meta

    assert extend_widget.mode_label.text().startswith("isolated")
    extend_widget.load_checkpoint(tiny_checkpoint)
    assert extend_widget.column_combo.currentText() == "task_c"
    extend_widget.options_form.set_values({"isolated": False, "epochs": 1})
    assert "shared stream" in extend_widget.mode_label.text() and "Sec. 3.4" in extend_widget.mode_label.text()
    extend_widget.output_edit.setText(str(tmp_path / "ext.safetensors"))
    extend_widget.device_combo.setCurrentText("cpu")
    cmd = extend_widget.command()
    assert "--shared-stream" in cmd and "--isolated" not in cmd
    # what the dock's child process runs, here in-process: the new task joins the shared stream
    assert main(cmd) in (0, None)
    meta = read_checkpoint_meta(tmp_path / "ext.safetensors")
    assert meta.model_kwargs["tasks"] == {"label": 2, "task_b": 2, "task_c": 2}
    assert "task_c" not in meta.model_kwargs["isolated_tasks"]
    extend_widget.options_form.set_values({"isolated": True})
    assert extend_widget.mode_label.text().startswith("isolated") and "--isolated" in extend_widget.command()
