"""AHDMIL: DMIN model (``model``), DB-LIPN pre-screening network (``prescreen``), training recipe (``method``),
pre-screened slide inference (``predictor``) and CLI (``cli``); importing this package registers them."""

from wsimil_core.methods.ahdmil import method, model  # noqa: F401  (registration)
