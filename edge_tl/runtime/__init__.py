"""The device side: load a bundle and run it with numpy, Pillow and one engine.

Never imports torch, the workstation side or the export side (the layer rules in
``pyproject.toml`` are checked by ``tests/test_layers.py``; ``tests/test_no_torch.py``
runs it with torch blocked).

Example:
    >>> from edge_tl.runtime import Model
    >>> Model("bundle").predict(["image.jpg"])  # doctest: +SKIP
"""

from edge_tl.runtime.classifier import Classifier, HeadChange
from edge_tl.runtime.detector import AnomalyDetector, BankChange
from edge_tl.runtime.model import Model
from edge_tl.runtime.results import AnomalyEvaluation, Evaluation, Prediction, Verdict

__all__ = [
    "AnomalyDetector",
    "AnomalyEvaluation",
    "BankChange",
    "Classifier",
    "Evaluation",
    "HeadChange",
    "Model",
    "Prediction",
    "Verdict",
]
