"""The device side: load a bundle and run it with numpy, Pillow and one engine.

Never imports torch (a test proves it).

Example:
    >>> from edge_tl.runtime import Model
    >>> Model("bundle").predict(["image.jpg"])  # doctest: +SKIP
"""

from edge_tl.runtime.model import Model

__all__ = ["Model"]
