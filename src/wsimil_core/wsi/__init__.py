"""Whole-slide images: reading (``slide``), writing test/demo pyramids (``writer``), tissue and patch grids
(``tiling``). Import the submodules; this package imports nothing heavy."""
