"""Inference: the one slide pipeline and what uses it.

``pipeline`` (grid -> features -> the method's predictor -> row + maps; ``LoadedCheckpoint``,
``iter_slide_prediction``, ``predict_slide``), ``features`` (grids, store cache checks, feature sources),
``encoder`` (the checkpoint's encoder, rebuilt once from its metadata), ``rows`` (predictions-table rows and maps
attrs), ``predict`` (``predict_store``, ``evaluate_store``) and ``geojson`` (QuPath export).
"""
