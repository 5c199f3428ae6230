"""Bags, datasets, splits and sampling over the feature store."""

from wsimil_core.data.bag import BagBatch

__all__ = ["BagBatch"]
