"""Inference: slide predictions and per-patch maps from a checkpoint (``predict``), GeoJSON export (``geojson``)."""
