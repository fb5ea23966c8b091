"""One exception type for problems a user can fix; the CLI prints it as one line."""

__all__ = ["EdgeTLError", "require"]


class EdgeTLError(Exception):
    """Bad input or an unmet requirement. The message names the problem and the fix."""


def require(module: str, extra: str):
    """Import a heavy optional backend lazily, with an error that names the extra to install.

    Example:
        >>> ort = require("onnxruntime", "ort")  # doctest: +SKIP
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgeTLError(
            f"{module} is not installed ({e}); install it with: pip install 'edge_tl[{extra}]'"
        ) from None
