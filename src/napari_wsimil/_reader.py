"""npe2 readers: whole-slide images and slide groups of a wsimil feature store.

* ``read_slide``: a slide file -> a multiscale RGB image layer streamed from the lazy dask pyramid (opening
  reads only the file's header; pixels are read tile by tile as napari shows them), world units µm.
* ``read_store_slide``: a slide group of a store (``<store>/<slide_id>``) -> the slide (when its file is still
  at ``slide_path``) and the layers of every stored map set (``maps/<checkpoint_id>/<name>``), each map drawn
  from the ``MapSpec`` stored beside it (``FeatureStore.read_map_specs``).

The tissue mask is optional (it reads a thumbnail): :func:`slide_layers` with ``tissue=True``, or the store
browser's "tissue mask" box.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil._grid import META_KEY, GridGeometry, LayerData
from napari_wsimil._map_layers import maps_layer_data
from napari_wsimil._reader_preference import (
    SLIDE_SUFFIXES,
    ImplausibleMppWarning,
    is_slide_path,
    mpp_problem,
    offer_reader_preference,
)
from napari_wsimil._slide_layers import slide_layer_data, tissue_layer_data
from napari_wsimil._viewer import watch_colorbars
from wsimil_core.api import FeatureStore, TissueParams, detect_tissue, open_slide


def is_store_slide_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a slide group of a wsimil feature store (a complete ``<store>/<slide_id>``)."""
    p = Path(path)
    if not p.is_dir() or not (p / "zarr.json").is_file() or not (p.parent / "zarr.json").is_file():
        return False
    try:
        return p.name in FeatureStore(p.parent)
    except Exception:  # noqa: BLE001 - not a store: not ours
        return False


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a slide file or a store slide group; None for anything else."""
    if isinstance(path, (list, tuple)):
        if not path or not all(is_slide_path(p) or is_store_slide_dir(p) for p in path):
            return None
        return read_paths
    if is_slide_path(path):
        return read_paths
    if is_store_slide_dir(path):
        return read_paths
    return None


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Read one or several slides / store slide groups."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    in_viewer = _colorbars_in_current_viewer()
    layers: list[LayerData] = []
    with warnings.catch_warnings():  # open_slide's warning says --slide-mpp; the one below names the dock's fix
        warnings.simplefilter("ignore", ImplausibleMppWarning)
        for p in paths:
            layers.extend(read_store_slide(p) if Path(p).is_dir() else slide_layers(p))
    for _, kwargs, _ in layers:
        meta = kwargs.get("metadata", {}).get(META_KEY, {})
        problem = mpp_problem(meta.get("mpp")) if meta.get("kind") == "slide" else None
        if problem:
            warnings.warn(
                f"{problem}: {Path(meta['slide_path']).name}; set the slide's mpp in the Inference dock",
                ImplausibleMppWarning,
                stacklevel=2,
            )
    if in_viewer:
        offer_reader_preference()  # once per session until answered: open slides without the reader dialog
    return layers


def slide_layers(path: str | os.PathLike, *, slide_mpp: float | None = None, tissue: bool = False) -> list[LayerData]:
    """The layers of a slide file: the multiscale image (+ the tissue mask when ``tissue``).

    Raises:
        SlideError: the file cannot be opened (the message names it).
    """
    slide = open_slide(path, slide_mpp=slide_mpp)
    layers = [slide_layer_data(slide)]
    if tissue and slide.mpp is not None:
        mask = detect_tissue(slide, TissueParams())
        layers.append(tissue_layer_data(mask, slide.mpp, name=f"{Path(path).name}: tissue"))
    return layers


def store_slide_layers(
    store: Any,
    slide_id: str,
    checkpoint_ids: list[str] | None = None,
    *,
    open_image: bool = True,
    tissue: bool = False,
) -> list[LayerData]:
    """The slide image (when its file exists) and the maps of ``checkpoint_ids`` (default: all) of a store slide.

    Map layers are named ``<slide> · <map name>`` (``<slide> · <checkpoint_id> · <map name>`` when several
    checkpoints are shown), as the inference dock names its layers;
    each is drawn from the spec stored beside it (a map without one: scalar, with a warning naming it).
    """
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    attrs = fs.slide_attrs(slide_id)
    coords = fs.read_coords(slide_id)
    layers: list[LayerData] = []
    slide_path = attrs.get("slide_path")
    if open_image and slide_path and Path(slide_path).is_file():
        layers.extend(slide_layers(slide_path, slide_mpp=attrs.get("slide_mpp"), tissue=tissue))
    geometry = GridGeometry.from_attrs(attrs, coords, where=f"store {fs.root}: slide {slide_id!r}")
    ids = fs.map_ids(slide_id) if checkpoint_ids is None else list(checkpoint_ids)
    for ckpt in ids:
        maps = fs.read_maps(slide_id, ckpt)
        prefix = f"{slide_id} · " + (f"{ckpt} · " if len(ids) > 1 else "")
        extra = {
            "slide_id": slide_id,
            "checkpoint_id": ckpt,
            "store": str(fs.root),
            "slide_path": slide_path,
            "coords": coords,
        }
        try:
            extra["prediction"] = fs.maps_attrs(slide_id, ckpt)
        except Exception:  # noqa: BLE001 - attrs are informational
            pass
        specs = fs.read_map_specs(slide_id, ckpt)
        layers.extend(maps_layer_data(maps, geometry, coords, specs=specs, prefix=prefix, extra_meta=extra))
    return layers


def _colorbars_in_current_viewer() -> bool:
    """napari adds a reader's layers itself; have the viewer that is opening them show scalar maps' colorbars.
    Returns whether there is such a viewer."""
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        watch_colorbars(viewer)
    return viewer is not None


def read_store_slide(path: str | os.PathLike) -> list[LayerData]:
    """Reader for ``<store>/<slide_id>``: the slide image and all of its stored maps."""
    p = Path(path)
    return store_slide_layers(p.parent, p.name)


def store_summary(store: Any) -> list[dict[str, Any]]:
    """One row per complete slide of a store: ``slide_id``, ``n_patches``, ``encoders``, ``maps`` (checkpoint
    ids), ``slide_path`` and whether that file exists."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    rows = []
    for sid in fs.slide_ids():
        attrs = fs.slide_attrs(sid)
        path = attrs.get("slide_path")
        rows.append(
            {
                "slide_id": sid,
                "n_patches": int(np.asarray(fs.read_coords(sid)).shape[0]),
                "encoders": fs.encoder_ids(sid),
                "maps": fs.map_ids(sid),
                "slide_path": path,
                "slide_found": bool(path) and Path(path).is_file(),
            }
        )
    return rows


__all__ = [
    "SLIDE_SUFFIXES",
    "get_reader",
    "is_slide_path",
    "is_store_slide_dir",
    "read_paths",
    "read_store_slide",
    "slide_layers",
    "store_slide_layers",
    "store_summary",
]
