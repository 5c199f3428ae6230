"""ABMILX: model (``model``), end-to-end model and pixel pipeline (``e2e_model``, ``e2e``), training recipe
(``method``) and CLI (``cli``); importing this package registers the models and the method."""

from wsimil_core.methods.abmilx import e2e_model, method, model  # noqa: F401  (registration)
