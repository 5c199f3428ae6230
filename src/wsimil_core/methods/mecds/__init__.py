"""MECDS: model (``model``) and training recipe (``method``); importing this package registers both."""

from wsimil_core.methods.mecds import method, model  # noqa: F401  (registration)
