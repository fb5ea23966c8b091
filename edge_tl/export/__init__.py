"""The export side: a trained run (or a pretrained backbone) -> a checked bundle.

:mod:`~edge_tl.export.graph` (torch -> ONNX, parity, fused logits),
:mod:`~edge_tl.export.quantize` (ORT QDQ and NNCF builders, graph lookups),
:mod:`~edge_tl.export.accuracy_control` (the ladder, sensitivity ranking, refusal),
:mod:`~edge_tl.export.fidelity` (measurement), :mod:`~edge_tl.export.source` (what is
exported, calibration images) and :mod:`~edge_tl.export.pipeline` (the steps in order).

Example:
    >>> from edge_tl.export import export_bundle
    >>> export_bundle("bundles/neu_int8", "ort-int8", run="runs/neu")  # doctest: +SKIP
    >>> export_bundles("bundles", "onnx-fp32,ort-int8", run="runs/neu")  # doctest: +SKIP
"""

from edge_tl.export.accuracy_control import ToleranceError
from edge_tl.export.pipeline import BundleResult, export_bundle, export_bundles, iter_bundles

__all__ = ["BundleResult", "ToleranceError", "export_bundle", "export_bundles", "iter_bundles"]
