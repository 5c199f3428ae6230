"""Reusable layers shared by models (e.g. the Chebyshev-KAN head in ``nn.kan``)."""
