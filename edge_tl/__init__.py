"""edge_tl: transfer learning that ends on a device.

Workstation side (torch): :mod:`edge_tl.backbones`, :mod:`edge_tl.train`,
:mod:`edge_tl.export`, :mod:`edge_tl.quantize`.
Device side (numpy + Pillow + one engine, never torch): :mod:`edge_tl.runtime`.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "EdgeTLError"]

from edge_tl.errors import EdgeTLError  # noqa: E402
