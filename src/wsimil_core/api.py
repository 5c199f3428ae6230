"""The public surface of wsimil_core: what the napari plugin and users import.

Importing this module registers every built-in model and method. Everything here is stable across minor
releases; anything else is internal and may move.
"""

from __future__ import annotations

import wsimil_core.methods  # noqa: F401  (registers every model and method)
from wsimil_core import __version__
from wsimil_core._io import write_json_atomic
from wsimil_core.checkpoint_meta import CheckpointMeta, EncoderMeta, GridMeta, StoreRef, TaskMeta, ThresholdMeta
from wsimil_core.demo import load_lesions
from wsimil_core.engine.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from wsimil_core.engine.config import TrainConfig, default_config_yaml, load_config
from wsimil_core.engine.crossval import CrossvalResult, crossval
from wsimil_core.engine.trainer import RunResult, train
from wsimil_core.errors import CheckpointError, ConfigError, DataError, SlideError, StoreError, WsimilError
from wsimil_core.features.extract import slide_id_from_path
from wsimil_core.inference.features import training_store
from wsimil_core.inference.geojson import export_geojson, maps_to_geojson
from wsimil_core.inference.pipeline import (
    LoadedCheckpoint,
    PipelineOptions,
    Progress,
    SlidePrediction,
    iter_slide_prediction,
    predict_slide,
)
from wsimil_core.inference.predict import BagPrediction, evaluate_store, load_predictor, predict_bag, predict_store
from wsimil_core.inference.rows import class_probabilities, prediction_columns, specs_by_name
from wsimil_core.methods.base import Method, MethodOptions, create_method, list_methods, method_class, predictor_for
from wsimil_core.methods.predictor import FeaturePredictor, FeatureSource, Predictor, SlideInput
from wsimil_core.models.base import MapSpec, MILOutput, ModelConfig, create_model, list_models, register_model
from wsimil_core.store.zarr_store import Bag, FeatureStore, safe_slide_id
from wsimil_core.wsi.slide import Slide, open_slide
from wsimil_core.wsi.tiling import GridSpec, PatchGrid, TissueParams, detect_tissue, make_grid

__all__ = [
    "__version__",
    "Bag",
    "BagPrediction",
    "CheckpointError",
    "CheckpointMeta",
    "ConfigError",
    "CrossvalResult",
    "DataError",
    "EncoderMeta",
    "FeaturePredictor",
    "FeatureSource",
    "FeatureStore",
    "GridMeta",
    "GridSpec",
    "LoadedCheckpoint",
    "MapSpec",
    "MILOutput",
    "Method",
    "MethodOptions",
    "ModelConfig",
    "PatchGrid",
    "PipelineOptions",
    "Predictor",
    "Progress",
    "RunResult",
    "Slide",
    "SlideError",
    "SlideInput",
    "SlidePrediction",
    "StoreError",
    "StoreRef",
    "TaskMeta",
    "ThresholdMeta",
    "TissueParams",
    "TrainConfig",
    "WsimilError",
    "create_method",
    "create_model",
    "class_probabilities",
    "crossval",
    "default_config_yaml",
    "detect_tissue",
    "evaluate_store",
    "export_geojson",
    "iter_slide_prediction",
    "list_methods",
    "list_models",
    "load_lesions",
    "load_checkpoint",
    "load_config",
    "load_predictor",
    "make_grid",
    "maps_to_geojson",
    "method_class",
    "open_slide",
    "predict_bag",
    "prediction_columns",
    "predict_slide",
    "predict_store",
    "predictor_for",
    "read_checkpoint_meta",
    "register_model",
    "safe_slide_id",
    "save_checkpoint",
    "slide_id_from_path",
    "specs_by_name",
    "train",
    "training_store",
    "write_json_atomic",
]
