"""MOMKD: model (``model``) and training recipe (``method``); importing this package registers both."""

from wsimil_core.methods.momkd import method, model  # noqa: F401  (registration)
