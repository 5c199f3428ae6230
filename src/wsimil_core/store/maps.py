"""Per-patch maps in the feature store: ``<slide_id>/maps/<checkpoint_id>/m000, m001, ...``.

A map is float32 ``[N]`` or ``[N, K]`` aligned with the slide's coords. Map names are slash paths
(``attention/head3``), which cannot be zarr node names beside ``attention``, so arrays are named ``m000``,
``m001``, ... and each one's attrs hold its ``map_name`` and, when given, its ``map_spec`` (a
``MapSpec.to_dict()``). The maps group's attrs hold ``arrays`` (key -> name), the caller's attrs and
``complete``. A checkpoint's maps are written (replaced) atomically, under the store lock (concurrent writers
take turns; see ``groups``); a read that overlaps a replacement is done again (``SlideGroups._consistent``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core.errors import DataError, StoreError
from wsimil_core.store.groups import SlideGroups
from wsimil_core.store.layout import (
    array_ok,
    attrs_jsonable,
    check_name,
    create_array,
    is_name,
    node_attrs,
    read_meta,
    rmtree,
    zarr_module,
)


class StoreMaps(SlideGroups):
    """The maps part of :class:`~wsimil_core.store.zarr_store.FeatureStore` (write, list and read maps)."""

    def _maps_ok(self, slide_id: str, checkpoint_id: str, n: int) -> bool:
        node = self.root / slide_id / "maps" / checkpoint_id
        meta = read_meta(node)
        if not meta or not meta.get("attributes", {}).get("complete"):
            return False
        names = meta["attributes"].get("arrays", {})
        return all(array_ok(node / key, rows=n) for key in names)

    def map_ids(self, slide_id: str) -> list[str]:
        """Checkpoint ids with complete maps for the slide."""
        n = self._group_n(check_name(slide_id, "slide id", self.root))
        mdir = self.root / slide_id / "maps"
        if n is None or not mdir.is_dir():
            return []
        return sorted(p.name for p in mdir.iterdir() if is_name(p.name) and self._maps_ok(slide_id, p.name, n))

    def write_maps(
        self,
        slide_id: str,
        checkpoint_id: str,
        maps: Mapping[str, Any],
        attrs: dict | None = None,
        specs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write (replace) a checkpoint's per-patch maps for a slide, atomically.

        Args:
            slide_id: a complete slide in the store.
            checkpoint_id: safe name of the checkpoint (``maps/<checkpoint_id>``).
            maps: ``{name: [N] or [N, K]}`` aligned with the slide's coords; names are slash paths
                (``attention/head3``); stored as float32.
            attrs: JSON-able attrs of the maps group (checkpoint path, class names, prediction, ...).
            specs: ``{name: MapSpec.to_dict()}`` of the maps (how to read and draw each one); stored in each
                array's attrs as ``map_spec`` and returned by ``read_map_specs``.
        """
        n = self._require_group(slide_id)
        check_name(checkpoint_id, "checkpoint id", self.root)
        self._writable(self.root / slide_id / "maps" / checkpoint_id)
        where = f"store {self.root}: slide {slide_id!r}, maps {checkpoint_id!r}"
        arrays: dict[str, np.ndarray] = {}
        keys: dict[str, str] = {}
        for i, (name, value) in enumerate(maps.items()):
            if not isinstance(name, str) or not name or any(not part for part in name.split("/")):
                raise DataError(f"{where}: invalid map name {name!r}")
            v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
            if v.ndim not in (1, 2) or v.shape[0] != n:
                raise DataError(f"{where}: map {name!r} has shape {v.shape}, expected [{n}] or [{n}, K]")
            key = f"m{i:03d}"
            arrays[key] = v
            keys[key] = name
        zarr = zarr_module()
        mdir = self._require_subgroup(slide_id, "maps")
        tmp = self._tmp_dir(f"{slide_id}-maps-{checkpoint_id}")
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for key, v in arrays.items():
                spec = (specs or {}).get(keys[key])
                array_attrs = {"map_name": keys[key], **({"map_spec": attrs_jsonable(dict(spec))} if spec else {})}
                create_array(g, key, np.ascontiguousarray(v), array_attrs)
            g.attrs.update({**attrs_jsonable(attrs or {}), "arrays": keys, "complete": True})
            self._swap_in(tmp, mdir / checkpoint_id)
        except BaseException:
            rmtree(tmp)
            raise

    def _maps_node(self, slide_id: str, checkpoint_id: str) -> list[Path]:
        """The node a read of these maps depends on (for ``_consistent``)."""
        return [self._slide_dir(slide_id) / "maps" / check_name(checkpoint_id, "checkpoint id", self.root)]

    def read_maps(self, slide_id: str, checkpoint_id: str) -> dict[str, np.ndarray]:
        """``{map_name: float32 [N] or [N, K]}`` written by ``write_maps`` (``StoreError`` if absent)."""
        return self._consistent(
            self._maps_node(slide_id, checkpoint_id), lambda: self._read_maps_once(slide_id, checkpoint_id)
        )

    def _read_maps_once(self, slide_id: str, checkpoint_id: str) -> dict[str, np.ndarray]:
        n = self._require_group(slide_id)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(
                f"store {self.root}: slide {slide_id!r} has no complete maps of checkpoint {checkpoint_id!r} "
                f"(it has {self.map_ids(slide_id) or 'none'}); run predict"
            )
        node = self.root / slide_id / "maps" / checkpoint_id
        keys = node_attrs(node)["arrays"]
        return {name: self._read_array(node / key, slide_id) for key, name in keys.items()}

    def read_map_specs(self, slide_id: str, checkpoint_id: str) -> dict[str, dict]:
        """``{map_name: spec dict}`` stored beside the maps by ``write_maps`` (maps written without a spec are
        left out; ``MapSpec.from_dict`` turns each into a ``MapSpec``)."""
        return self._consistent(
            self._maps_node(slide_id, checkpoint_id), lambda: self._read_map_specs_once(slide_id, checkpoint_id)
        )

    def _read_map_specs_once(self, slide_id: str, checkpoint_id: str) -> dict[str, dict]:
        n = self._require_group(slide_id)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(f"store {self.root}: slide {slide_id!r} has no complete maps of {checkpoint_id!r}")
        node = self.root / slide_id / "maps" / checkpoint_id
        out = {}
        for key, name in node_attrs(node)["arrays"].items():
            spec = (read_meta(node / key) or {}).get("attributes", {}).get("map_spec")
            if isinstance(spec, dict):
                out[name] = spec
        return out

    def maps_attrs(self, slide_id: str, checkpoint_id: str) -> dict:
        """The attrs given to ``write_maps`` for this slide and checkpoint."""
        return self._consistent(
            self._maps_node(slide_id, checkpoint_id), lambda: self._maps_attrs_once(slide_id, checkpoint_id)
        )

    def _maps_attrs_once(self, slide_id: str, checkpoint_id: str) -> dict:
        n = self._require_group(slide_id)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(f"store {self.root}: slide {slide_id!r} has no complete maps of {checkpoint_id!r}")
        attrs = node_attrs(self.root / slide_id / "maps" / checkpoint_id)
        attrs.pop("arrays", None)
        attrs.pop("complete", None)
        return attrs
