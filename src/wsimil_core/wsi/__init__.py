"""Whole-slide images: reading (``slide``: ``open_slide``; ``base``: the ``Slide`` interface; backends
``openslide_backend`` and ``tifffile_backend``; ``pixels``), writing test/demo pyramids (``writer``), tissue
detection (``tissue``) and patch grids (``tiling``). Import the submodules; this package imports nothing heavy."""
