"""wsimil_core: headless weakly-supervised MIL on whole-slide images.

Importing this package never imports napari or Qt (a test proves it). Heavy submodules
(torch models, slide readers) are imported where used, so ``import wsimil_core`` stays fast.
"""

__version__ = "0.2.0.dev0"

from wsimil_core.errors import WsimilError  # noqa: E402

__all__ = ["WsimilError", "__version__"]
