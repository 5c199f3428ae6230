"""CLAM/TRIDENT ``.h5`` feature files: reading one bag and listing the files of a folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core.errors import StoreError
from wsimil_core.store.layout import attrs_jsonable


def read_h5_bag(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Read a CLAM/TRIDENT ``.h5`` file.

    Returns:
        ``(features [N, D], coords int64 [N, 2], slide_attrs, encoder_attrs)``. Slide attrs hold what the file
        says about the grid: ``patch_size_level0`` (TRIDENT attr, or CLAM's ``patch_size`` x ``downsample`` at
        ``patch_level``; else the smallest coordinate step), ``stride_level0`` (smallest step), ``grid_origin``
        and the raw ``h5_attrs``.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise StoreError(
                    f"{path}: not a CLAM/TRIDENT feature file: no {' or '.join(missing)} dataset "
                    f"(it has {sorted(f.keys())})"
                )
            feats = np.asarray(f["features"][...])
            crd = np.asarray(f["coords"][...])
            raw = {f"coords.{k}": attrs_jsonable(v) for k, v in f["coords"].attrs.items()}
            raw.update({f"features.{k}": attrs_jsonable(v) for k, v in f["features"].attrs.items()})
            raw.update({k: attrs_jsonable(v) for k, v in f.attrs.items()})
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{path}: cannot read the .h5 file: {exc}") from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if crd.ndim == 3 and crd.shape[0] == 1:
        crd = crd[0]
    if feats.ndim != 2:
        raise StoreError(f"{path}: 'features' must be [N, D] or [1, N, D], got shape {feats.shape}")
    if crd.ndim != 2 or crd.shape[1] != 2:
        raise StoreError(f"{path}: 'coords' must be [N, 2], got shape {crd.shape}")
    if crd.shape[0] != feats.shape[0]:
        raise StoreError(f"{path}: {feats.shape[0]} feature rows but {crd.shape[0]} coords")
    if crd.size and not np.issubdtype(crd.dtype, np.integer):
        if not np.isfinite(crd).all() or np.any(crd != np.round(crd)):
            raise StoreError(f"{path}: 'coords' are not integer level-0 pixels")
    crd = crd.astype(np.int64)

    def step(col: np.ndarray) -> int | None:
        d = np.diff(np.unique(col))
        d = d[d > 0]
        return int(d.min()) if d.size else None

    stride = None
    if crd.shape[0]:
        steps = [s for s in (step(crd[:, 0]), step(crd[:, 1])) if s]
        stride = min(steps) if steps else None
    size0 = raw.get("coords.patch_size_level0")
    if size0 is None and raw.get("coords.patch_size") is not None:
        ds: Any = raw.get("coords.downsample")  # an h5 attr: a number or a per-axis list
        ds = ds[0] if isinstance(ds, list) and ds else ds
        size0 = float(raw["coords.patch_size"]) * float(ds if ds is not None else 1.0)
    if size0 is None:
        size0 = stride
    slide_attrs: dict[str, Any] = {"h5_attrs": raw}
    if size0 is not None:
        slide_attrs["patch_size_level0"] = int(round(float(size0)))
    if stride is not None:
        slide_attrs["stride_level0"] = stride
    if crd.shape[0]:
        slide_attrs["grid_origin"] = [int(crd[:, 0].min()), int(crd[:, 1].min())]
    if raw.get("coords.patch_size") is not None:
        slide_attrs["patch_size"] = int(raw["coords.patch_size"])
    enc_attrs = {}
    for key in ("features.encoder", "features.name", "encoder", "model_name"):
        if isinstance(raw.get(key), str):
            enc_attrs["name"] = raw[key]
            break
    return feats, crd, slide_attrs, enc_attrs


def h5_files(path: Any) -> list[Path]:
    """The ``.h5`` files meant by ``path``: a file, a directory (its ``*.h5``/``*.hdf5``), or a list of files."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix.lower() in (".h5", ".hdf5"))
            if not files:
                raise StoreError(f"{p}: no .h5 files in this directory")
            return files
        items = [p]
    else:
        items = [Path(x) for x in path]
    if not items:
        raise StoreError("no .h5 files given")
    for p in items:
        if not p.is_file():
            raise StoreError(f"{p}: .h5 file does not exist")
    return items
