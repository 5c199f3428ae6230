"""The feature store (zarr v3, ``zarr_store``) and importers (CLAM/TRIDENT ``.h5``, MIL-benchmark CSV)."""

from wsimil_core.store.zarr_store import (
    STORE_FORMAT,
    Bag,
    FeatureStore,
    check_name,
    h5_files,
    read_h5_bag,
    safe_slide_id,
    slide_fingerprint,
)

__all__ = [
    "STORE_FORMAT",
    "Bag",
    "FeatureStore",
    "check_name",
    "h5_files",
    "read_h5_bag",
    "safe_slide_id",
    "slide_fingerprint",
]
