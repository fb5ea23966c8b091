"""Class names: the one rule for every name that enters a head or a bundle, and its check.

Torch-free floor module; :mod:`edge_tl.spec` re-exports it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from edge_tl.errors import EdgeTLError

__all__ = ["LABEL_RULE", "MAX_LABEL_CHARS", "UNKNOWN", "check_label", "check_labels"]

UNKNOWN = "unknown"
"""The label ``predict`` gives an image that is like none of the known classes (reserved)."""
MAX_LABEL_CHARS = 100
LABEL_SEPARATORS = "=,/\\"
LABEL_RULE = (
    f"a class name is 1-{MAX_LABEL_CHARS} characters, with no leading or trailing space, no "
    "control character and none of = , / \\, is not 'unknown', and differs from the "
    "head's other class names ignoring case"
)
"""The one rule for class names, wherever they enter: class folders (``train``, ``learn``,
``--add``), ``--relabel OLD=NEW``, the labels an export writes, and the labels read back
from ``manifest.json`` and head versions. ``=`` separates ``--relabel``'s two names, ``,``
separates names in lists, ``/`` and ``\\`` would not be folder names again; names equal
ignoring case would be one folder on macOS and Windows."""


def _label_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"is {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if len(name) > MAX_LABEL_CHARS:
        return f"is {len(name)} characters long"
    if name != name.strip():
        return "has leading or trailing space"
    bad = [c for c in name if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029"]
    if bad:
        return f"has the control character {bad[0]!r}"
    sep = [c for c in LABEL_SEPARATORS if c in name]
    if sep:
        return f"contains {sep[0]!r}"
    if name.casefold() == UNKNOWN:
        return "is reserved for open-set rejection"
    return None


def check_label(name: object, where: str = "", fix: str = "rename it") -> str:
    """``name`` if it is a valid class name (:data:`LABEL_RULE`).

    Args:
        where: where the name came from, for the message (``"class folders of data/"``).
        fix: what to do, for the message.

    Raises:
        EdgeTLError: naming the label, what is wrong with it and the rule.
    """
    problem = _label_problem(name)
    if problem is not None:
        origin = f" ({where})" if where else ""
        raise EdgeTLError(f"class name {name!r}{origin} {problem}: {LABEL_RULE}; {fix}")
    return name  # type: ignore[return-value]


def check_labels(
    names: Iterable[object],
    where: str = "",
    existing: Iterable[str] = (),
    fix: str = "rename it",
    written: bool = False,
) -> None:
    """Check every name in ``names`` by :data:`LABEL_RULE`, and that no two of ``names`` and
    ``existing`` (a head's other classes, already checked) are equal ignoring case.

    ``written``: the names are read back from a bundle (``manifest.json``, a head version);
    then only names that are equal outright are refused. Bundles exported before the rule
    carry torchvision's ImageNet labels ``Cardigan`` (the corgi) and ``cardigan`` (the
    sweater); they must keep loading, and new names are still checked against both.

    Raises:
        EdgeTLError: the first name that breaks the rule, or the first pair that collides.
    """
    seen = {str(n).casefold(): str(n) for n in existing}
    for name in names:
        key = check_label(name, where, fix).casefold()
        if written:
            key = str(name)
        if key in seen:
            other, origin = seen[key], f" ({where})" if where else ""
            what = (
                f"class name {name!r}{origin} is given twice"
                if other == name
                else f"class names {other!r} and {name!r}{origin} differ only in case"
            )
            raise EdgeTLError(f"{what}: {LABEL_RULE}; {fix}")
        seen[key] = str(name)
