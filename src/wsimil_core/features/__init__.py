"""Patch features: encoders by name (``encoders``), batched resumable extraction into the store (``extract``),
and the same over a dask.distributed cluster (``distributed``)."""
