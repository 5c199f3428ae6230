"""Qt-free parts of the training dock: what a training config implies (epochs in all, paths of a loaded YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsimil_core.api import method_class, parse_options

#: model config fields the engine fills from the data (not shown in the model options form).
DATA_MODEL_FIELDS = ("in_dim", "n_classes", "tasks")


def total_epochs(config: dict[str, Any]) -> int:
    """Epochs a run will train in all: ``train.epochs`` per phase, ``train.phase_epochs`` overrides."""
    method = config.get("method", {})
    name = method.get("name", "abmil") if isinstance(method, dict) else str(method)
    cls = method_class(name)
    opts = parse_options(cls.options_cls, (method.get("options") if isinstance(method, dict) else None) or {}, name)
    phases = list(getattr(opts, "phases", None) or cls.phases)
    train = config.get("train", {})
    epochs = int(train.get("epochs", 20))
    overrides = train.get("phase_epochs") or {}
    return sum(int(overrides.get(p, epochs)) for p in phases)


def resolve_config_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative paths of a loaded config absolute (relative to the YAML's folder ``base`` when they exist
    there, else to the working directory; the run directory always relative to ``base``). Changes ``data`` in
    place and returns it."""

    def fix(value: Any) -> Any:
        if value in (None, ""):
            return value
        p = Path(str(value)).expanduser()
        if p.is_absolute():
            return str(p)
        return str((base / p) if (base / p).exists() else p.resolve())

    d = data.get("data") or {}
    for key in ("store", "labels", "omics"):
        if key in d:
            d[key] = fix(d[key])
    out = data.get("output") or {}
    if "dir" in out:
        p = Path(str(out["dir"])).expanduser()
        out["dir"] = str(p if p.is_absolute() else (base / p))
    return data


__all__ = ["DATA_MODEL_FIELDS", "resolve_config_paths", "total_epochs"]
