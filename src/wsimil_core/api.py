"""The public surface of wsimil_core: what the napari plugin and users import.

Everything here is stable across minor releases; anything else is internal and may move.

Names are resolved lazily, on first access, from the module that defines them (``_SOURCES``), so
``from wsimil_core.api import open_slide, FeatureStore`` imports the slide reader and the store, not torch or every
method. A name from ``models``, ``methods``, ``engine`` or ``inference`` first imports ``wsimil_core.methods``,
which registers every built-in model and method (``list_models()`` and ``list_methods()`` are complete).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import wsimil_core

__version__: str = wsimil_core.__version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time ``__getattr__`` imports each name on first access
    from wsimil_core._io import atomic_write_text, write_json_atomic
    from wsimil_core.checkpoint_meta import CheckpointMeta, EncoderMeta, GridMeta, StoreRef, TaskMeta, ThresholdMeta
    from wsimil_core.demo.cohort import make_demo_cohort
    from wsimil_core.demo.lesions import load_lesions
    from wsimil_core.engine.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
    from wsimil_core.engine.config import TrainConfig, default_config_yaml, load_config, validate_config
    from wsimil_core.engine.crossval import CrossvalResult, crossval
    from wsimil_core.engine.trainer import RunResult, train
    from wsimil_core.errors import CheckpointError, ConfigError, DataError, SlideError, StoreError, WsimilError
    from wsimil_core.inference.features import training_store
    from wsimil_core.inference.geojson import export_geojson, maps_to_geojson
    from wsimil_core.inference.loaded import LoadedCheckpoint
    from wsimil_core.inference.pipeline import (
        PipelineOptions,
        Progress,
        SlidePrediction,
        iter_slide_prediction,
        predict_slide,
    )
    from wsimil_core.inference.predict import BagPrediction, evaluate_store, load_predictor, predict_bag, predict_store
    from wsimil_core.inference.rows import (
        class_probabilities,
        prediction_columns,
        specs_by_name,
        survival_risk,
        survival_tasks,
    )
    from wsimil_core.methods.base import (
        Method,
        MethodOptions,
        create_method,
        list_methods,
        method_class,
        parse_options,
        predictor_for,
    )
    from wsimil_core.methods.predictor import FeaturePredictor, FeatureSource, Predictor, SlideInput
    from wsimil_core.models.base import (
        MILOutput,
        ModelConfig,
        config_field_docs,
        create_model,
        list_models,
        model_config_class,
        register_model,
    )
    from wsimil_core.models.map_spec import MapSpec, primary_map_names
    from wsimil_core.store.layout import slide_id_from_path
    from wsimil_core.store.zarr_store import Bag, FeatureStore, safe_slide_id
    from wsimil_core.wsi.annotations import (
        Annotation,
        annotations_to_geojson,
        points_in_polygons,
        read_geojson_annotations,
        write_geojson_annotations,
    )
    from wsimil_core.wsi.mpp import MPP_RANGE, ImplausibleMppWarning, implausible_mpp
    from wsimil_core.wsi.slide import Slide, open_slide
    from wsimil_core.wsi.tiling import GridSpec, PatchGrid, TissueParams, detect_tissue, make_grid

#: public name -> the module that defines it
_SOURCES: dict[str, str] = {
    "atomic_write_text": "wsimil_core._io",
    "write_json_atomic": "wsimil_core._io",
    "CheckpointMeta": "wsimil_core.checkpoint_meta",
    "EncoderMeta": "wsimil_core.checkpoint_meta",
    "GridMeta": "wsimil_core.checkpoint_meta",
    "StoreRef": "wsimil_core.checkpoint_meta",
    "TaskMeta": "wsimil_core.checkpoint_meta",
    "ThresholdMeta": "wsimil_core.checkpoint_meta",
    "make_demo_cohort": "wsimil_core.demo.cohort",
    "load_lesions": "wsimil_core.demo.lesions",
    "load_checkpoint": "wsimil_core.engine.checkpoint",
    "read_checkpoint_meta": "wsimil_core.engine.checkpoint",
    "save_checkpoint": "wsimil_core.engine.checkpoint",
    "default_config_yaml": "wsimil_core.engine.config",
    "load_config": "wsimil_core.engine.config",
    "TrainConfig": "wsimil_core.engine.config",
    "validate_config": "wsimil_core.engine.config",
    "crossval": "wsimil_core.engine.crossval",
    "CrossvalResult": "wsimil_core.engine.crossval",
    "RunResult": "wsimil_core.engine.trainer",
    "train": "wsimil_core.engine.trainer",
    "CheckpointError": "wsimil_core.errors",
    "ConfigError": "wsimil_core.errors",
    "DataError": "wsimil_core.errors",
    "SlideError": "wsimil_core.errors",
    "StoreError": "wsimil_core.errors",
    "WsimilError": "wsimil_core.errors",
    "training_store": "wsimil_core.inference.features",
    "export_geojson": "wsimil_core.inference.geojson",
    "maps_to_geojson": "wsimil_core.inference.geojson",
    "iter_slide_prediction": "wsimil_core.inference.pipeline",
    "LoadedCheckpoint": "wsimil_core.inference.loaded",
    "PipelineOptions": "wsimil_core.inference.pipeline",
    "predict_slide": "wsimil_core.inference.pipeline",
    "Progress": "wsimil_core.inference.pipeline",
    "SlidePrediction": "wsimil_core.inference.pipeline",
    "BagPrediction": "wsimil_core.inference.predict",
    "evaluate_store": "wsimil_core.inference.predict",
    "load_predictor": "wsimil_core.inference.predict",
    "predict_bag": "wsimil_core.inference.predict",
    "predict_store": "wsimil_core.inference.predict",
    "class_probabilities": "wsimil_core.inference.rows",
    "survival_risk": "wsimil_core.inference.rows",
    "survival_tasks": "wsimil_core.inference.rows",
    "prediction_columns": "wsimil_core.inference.rows",
    "specs_by_name": "wsimil_core.inference.rows",
    "create_method": "wsimil_core.methods.base",
    "list_methods": "wsimil_core.methods.base",
    "Method": "wsimil_core.methods.base",
    "method_class": "wsimil_core.methods.base",
    "MethodOptions": "wsimil_core.methods.base",
    "predictor_for": "wsimil_core.methods.base",
    "parse_options": "wsimil_core.methods.base",
    "FeaturePredictor": "wsimil_core.methods.predictor",
    "FeatureSource": "wsimil_core.methods.predictor",
    "Predictor": "wsimil_core.methods.predictor",
    "SlideInput": "wsimil_core.methods.predictor",
    "create_model": "wsimil_core.models.base",
    "list_models": "wsimil_core.models.base",
    "MapSpec": "wsimil_core.models.map_spec",
    "MILOutput": "wsimil_core.models.base",
    "ModelConfig": "wsimil_core.models.base",
    "register_model": "wsimil_core.models.base",
    "model_config_class": "wsimil_core.models.base",
    "config_field_docs": "wsimil_core.models.base",
    "primary_map_names": "wsimil_core.models.map_spec",
    "slide_id_from_path": "wsimil_core.store.layout",
    "Bag": "wsimil_core.store.zarr_store",
    "FeatureStore": "wsimil_core.store.zarr_store",
    "safe_slide_id": "wsimil_core.store.zarr_store",
    "Annotation": "wsimil_core.wsi.annotations",
    "annotations_to_geojson": "wsimil_core.wsi.annotations",
    "points_in_polygons": "wsimil_core.wsi.annotations",
    "read_geojson_annotations": "wsimil_core.wsi.annotations",
    "write_geojson_annotations": "wsimil_core.wsi.annotations",
    "MPP_RANGE": "wsimil_core.wsi.mpp",
    "ImplausibleMppWarning": "wsimil_core.wsi.mpp",
    "implausible_mpp": "wsimil_core.wsi.mpp",
    "open_slide": "wsimil_core.wsi.slide",
    "Slide": "wsimil_core.wsi.slide",
    "detect_tissue": "wsimil_core.wsi.tiling",
    "GridSpec": "wsimil_core.wsi.tiling",
    "make_grid": "wsimil_core.wsi.tiling",
    "PatchGrid": "wsimil_core.wsi.tiling",
    "TissueParams": "wsimil_core.wsi.tiling",
}

#: packages whose names need the model and method registries filled
_REGISTRY_PACKAGES = ("wsimil_core.models", "wsimil_core.methods", "wsimil_core.engine", "wsimil_core.inference")


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first access (and keep it in this module's namespace)."""
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module.startswith(_REGISTRY_PACKAGES):
        importlib.import_module("wsimil_core.methods")  # registers every built-in model and method
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = [
    "__version__",
    "Annotation",
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
    "ImplausibleMppWarning",
    "LoadedCheckpoint",
    "MapSpec",
    "MPP_RANGE",
    "Method",
    "MethodOptions",
    "MILOutput",
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
    "annotations_to_geojson",
    "atomic_write_text",
    "create_method",
    "config_field_docs",
    "create_model",
    "class_probabilities",
    "survival_risk",
    "survival_tasks",
    "crossval",
    "default_config_yaml",
    "detect_tissue",
    "evaluate_store",
    "export_geojson",
    "implausible_mpp",
    "iter_slide_prediction",
    "list_methods",
    "list_models",
    "load_lesions",
    "load_checkpoint",
    "load_config",
    "load_predictor",
    "make_demo_cohort",
    "make_grid",
    "maps_to_geojson",
    "method_class",
    "model_config_class",
    "open_slide",
    "parse_options",
    "points_in_polygons",
    "predict_bag",
    "prediction_columns",
    "predict_slide",
    "predict_store",
    "predictor_for",
    "primary_map_names",
    "read_checkpoint_meta",
    "read_geojson_annotations",
    "register_model",
    "safe_slide_id",
    "save_checkpoint",
    "slide_id_from_path",
    "specs_by_name",
    "train",
    "training_store",
    "write_geojson_annotations",
    "write_json_atomic",
    "validate_config",
]
