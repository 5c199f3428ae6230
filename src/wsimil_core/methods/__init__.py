"""Method registry: ``create_method(name, **cfg)``, ``list_methods()`` (one training recipe per paper)."""

from importlib import import_module

from wsimil_core.methods.base import (
    Method,
    MethodOptions,
    create_method,
    list_methods,
    method_class,
    register_method,
)

# One line per method module.
_METHOD_MODULES = (
    "abmil",
    "asmil",
    "momkd",
    "abmilx",
    "ahdmil",
    "mecds",
)

for _name in _METHOD_MODULES:
    import_module(f"wsimil_core.methods.{_name}")

__all__ = ["Method", "MethodOptions", "create_method", "list_methods", "method_class", "register_method"]
