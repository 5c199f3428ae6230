"""MECDS: model (``model``; its config in ``config``, its MFA modules in ``mfa``), training recipe (``method``)
and CLI (``cli``); importing this package registers the model and the method."""

from wsimil_core.methods.mecds import method, model  # noqa: F401  (registration)
