"""The feature store (zarr v3, ``zarr_store``), its deep verification (``verify``) and importers (CLAM/TRIDENT ``.h5``,
MIL-benchmark CSV)."""

from wsimil_core.store.h5 import h5_files, read_h5_bag
from wsimil_core.store.layout import STORE_FORMAT, check_name, safe_slide_id, slide_fingerprint
from wsimil_core.store.verify import SlideDamage, repair_store, verify_slide, verify_store
from wsimil_core.store.zarr_store import Bag, FeatureStore

__all__ = [
    "STORE_FORMAT",
    "Bag",
    "FeatureStore",
    "SlideDamage",
    "check_name",
    "h5_files",
    "read_h5_bag",
    "repair_store",
    "safe_slide_id",
    "slide_fingerprint",
    "verify_slide",
    "verify_store",
]
