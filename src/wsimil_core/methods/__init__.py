"""Methods, one folder per paper (model, training recipe, CLI sub-app, predictor, extras).

Importing this package registers every built-in model and method: ``create_method(name, **cfg)``,
``list_methods()``, and the model registry of ``wsimil_core.models``.
"""

from importlib import import_module

from wsimil_core.methods.base import (
    Method,
    MethodOptions,
    create_method,
    list_methods,
    method_class,
    register_method,
)

# One line per method package (asmil last: its anchor plug-in wraps abmil and abmilx).
METHOD_PACKAGES = ("abmil", "abmilx", "momkd", "ahdmil", "mecds", "asmil")

for _name in METHOD_PACKAGES:
    import_module(f"wsimil_core.methods.{_name}")

__all__ = [
    "METHOD_PACKAGES",
    "Method",
    "MethodOptions",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
]
