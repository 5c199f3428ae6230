"""ASMIL: model (``model``), training recipe (``method``) and the EMA-anchor plug-in (``anchor``, which also
registers ``abmil-anchor`` and ``abmilx-anchor``); importing this package registers them."""

from wsimil_core.methods.asmil import anchor, method, model  # noqa: F401  (registration)
