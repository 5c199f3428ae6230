"""Model registry: ``create_model(name, **cfg)``, ``list_models()``.

Each model lives in its own module and registers itself with ``@register_model``; the modules are
imported here so the registry is complete after ``import wsimil_core.models``.
"""

from importlib import import_module

from wsimil_core.models.base import (
    MILOutput,
    ModelConfig,
    create_model,
    list_models,
    model_config_dict,
    register_model,
)

# One line per model module (one model per file, as in timm).
_MODEL_MODULES = (
    "abmil",
    "asmil",
    "momkd",
    "abmilx",
    "abmilx_e2e",
    "ahdmil",
    "mecds",
)

for _name in _MODEL_MODULES:
    import_module(f"wsimil_core.models.{_name}")

__all__ = ["MILOutput", "ModelConfig", "create_model", "list_models", "model_config_dict", "register_model"]
