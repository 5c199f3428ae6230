"""The model contract and registry: ``MILOutput``, ``register_model``, ``create_model``, ``list_models``.

Models live with their method (``wsimil_core.methods.<name>.model``); ``import wsimil_core.methods`` (or
``wsimil_core.api``) registers them all.
"""

from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    create_model,
    list_models,
    model_config_dict,
    register_model,
)

__all__ = ["MapSpec", "MILOutput", "ModelConfig", "create_model", "list_models", "model_config_dict", "register_model"]
