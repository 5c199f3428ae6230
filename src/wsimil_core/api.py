"""The public surface of wsimil_core: what the napari plugin and users import.

Importing this module registers every built-in model and method. Everything here is stable across minor
releases; anything else is internal and may move.
"""

from __future__ import annotations

import wsimil_core.methods  # noqa: F401  (registers every model and method)
from wsimil_core import __version__
from wsimil_core._io import atomic_write_text
from wsimil_core.engine.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from wsimil_core.engine.config import TrainConfig, default_config_yaml, load_config, validate_config
from wsimil_core.engine.crossval import CrossvalResult, crossval
from wsimil_core.engine.trainer import RunResult, train
from wsimil_core.errors import CheckpointError, ConfigError, DataError, SlideError, StoreError, WsimilError
from wsimil_core.inference.geojson import export_geojson
from wsimil_core.inference.predict import BagPrediction, evaluate_store, predict_bag, predict_store, task_names
from wsimil_core.methods.base import Method, MethodOptions, create_method, list_methods, method_class, parse_options
from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    create_model,
    list_models,
    model_config_class,
    register_model,
)
from wsimil_core.store.zarr_store import Bag, FeatureStore, safe_slide_id
from wsimil_core.wsi.slide import Slide, open_slide
from wsimil_core.wsi.tiling import GridSpec, PatchGrid, TissueParams, detect_tissue, make_grid

__all__ = [
    "__version__",
    "Bag",
    "BagPrediction",
    "CheckpointError",
    "ConfigError",
    "CrossvalResult",
    "DataError",
    "FeatureStore",
    "GridSpec",
    "MapSpec",
    "Method",
    "MethodOptions",
    "MILOutput",
    "ModelConfig",
    "PatchGrid",
    "RunResult",
    "Slide",
    "SlideError",
    "StoreError",
    "TissueParams",
    "TrainConfig",
    "WsimilError",
    "atomic_write_text",
    "create_method",
    "create_model",
    "crossval",
    "default_config_yaml",
    "detect_tissue",
    "evaluate_store",
    "export_geojson",
    "list_methods",
    "list_models",
    "load_checkpoint",
    "load_config",
    "make_grid",
    "method_class",
    "model_config_class",
    "open_slide",
    "parse_options",
    "predict_bag",
    "predict_store",
    "read_checkpoint_meta",
    "register_model",
    "safe_slide_id",
    "save_checkpoint",
    "task_names",
    "train",
    "validate_config",
]
