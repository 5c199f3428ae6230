"""napari-wsimil: the napari plugin of wsimil (reader, dock widgets, sample data).

Importing this package imports neither Qt nor the widgets; napari loads them through the npe2 manifest
(``napari.yaml``). See docs/napari.md.
"""

import wsimil_core

__version__ = wsimil_core.__version__

__all__ = ["__version__"]
