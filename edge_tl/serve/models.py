"""The bundles a server holds: each loaded once (hashes, signature, self-test, as
:class:`~edge_tl.runtime.Model` does), in a background thread so that the server answers
``live`` at once and ``ready`` when every bundle is loaded; and what ``infer`` computes.

Learning goes through the runtime's own calls (:class:`~edge_tl.runtime.Classifier`,
:class:`~edge_tl.runtime.AnomalyDetector`), which write each change as a new version under
the store's file lock and swap the state in force in one assignment, so a prediction uses
one complete head or bank version. A change written by another process (``edge-tl learn``
on the same bundle, or another ``--workers`` process) is picked up before the next
prediction: the server compares the ``CURRENT`` pointer files (a few bytes) and reloads
the state when one changed. Torch-free.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_tl.errors import EdgeTLError
from edge_tl.runtime import Model
from edge_tl.runtime.classifier import Classifier
from edge_tl.runtime.detector import AnomalyDetector
from edge_tl.runtime.versions import CURRENT
from edge_tl.serve.protocol import ProtocolError, Tensor

__all__ = ["Registry", "ServedModel", "model_name"]

_logger = logging.getLogger("edge_tl.serve")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_TOP_K = 100


def model_name(name: str) -> str:
    """``name`` if it can be a model's name in a URL path (letters, digits, ``._-``, not
    starting with ``.``, at most 64 characters).

    Raises:
        EdgeTLError: naming the rule.
    """
    if not name or len(name) > 64 or name.startswith(".") or set(name) - NAME_CHARS:
        raise EdgeTLError(
            f"model name {name!r} is not usable in a URL; give --name with letters, digits, "
            "'.', '_' or '-' (1-64 characters, not starting with '.')"
        )
    return name


def _pointer(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


@dataclass
class ServedModel:
    """One bundle behind a name: its :class:`Model` once loaded, the lock its learning
    calls take, and the pointers of the versions it last read."""

    name: str
    path: Path
    model: Model | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: tuple[bytes | None, bytes | None] = (None, None)

    # ---- loading and refreshing ---------------------------------------------------------
    def load(self, trust: Any = None) -> None:
        """Open the bundle (hashes, signature with ``trust``, self-test)."""
        model = Model(self.path, trust=trust)
        self._seen = self._pointers(model)
        self.model = model

    @staticmethod
    def _pointers(model: Model) -> tuple[bytes | None, bytes | None]:
        return (
            _pointer(model.classifier.store.dir / CURRENT),
            _pointer(model.detector.store.dir / CURRENT),
        )

    def require(self) -> Model:
        """The loaded model.

        Raises:
            ProtocolError: 503 while it loads, or when it failed to load.
        """
        if self.model is None:
            why = f"failed to load: {self.error}" if self.error else "is still loading"
            raise ProtocolError(503, f"model {self.name!r} {why}")
        return self.model

    def refresh(self) -> Model:
        """The loaded model, its head and bank re-read when another process changed them
        (their ``CURRENT`` pointers differ from the last ones read)."""
        model = self.require()
        seen = self._pointers(model)
        if seen != self._seen:
            with self.lock:
                seen = self._pointers(model)
                if seen[0] != self._seen[0]:
                    model.classifier = Classifier(model)
                if seen[1] != self._seen[1]:
                    model.detector = AnomalyDetector(model)
                self._seen = seen
        return model

    def committed(self) -> None:
        """Note the pointers after this process's own change (no reload needed)."""
        if self.model is not None:
            self._seen = self._pointers(self.model)

    # ---- what it is -------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``anomaly`` (the bundle has a bank) or ``classifier``."""
        return "anomaly" if self.require().task == "anomaly" else "classifier"

    def version(self) -> int | None:
        """The head (classifier) or bank (anomaly) version in force; None: the exported
        head, nothing learned yet."""
        model = self.require()
        state = model.detector.state if self.kind == "anomaly" else model.classifier.state
        return None if state is None else state.meta.get("version")

    def metadata(self, server_version: str) -> dict[str, Any]:
        """The protocol's model metadata, with edge_tl's ``parameters``."""
        model = self.refresh()
        kind = self.kind
        version = self.version()
        params: dict[str, Any] = {
            "kind": kind,
            "backbone": model.manifest.backbone,
            "artifact": f"{model.manifest.artifact.format}-{model.manifest.artifact.precision}",
        }
        if kind == "anomaly":
            state = model.detector.require()
            params["bank_version"] = version
            params["threshold"] = round(state.threshold, 4)
            params["grid"] = list(self.grid())
        else:
            params["classes"] = list(model.classifier.labels)
            params["head_version"] = version
        return {
            "name": self.name,
            "versions": [str(version or 0)],
            "platform": f"edge_tl_{server_version}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": self.outputs(),
            "parameters": params,
        }

    def outputs(self) -> list[dict[str, Any]]:
        if self.kind == "anomaly":
            h, w = self.grid()
            return [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "threshold", "datatype": "FP32", "shape": [-1]},
                {"name": "verdict", "datatype": "BYTES", "shape": [-1]},
                {"name": "map", "datatype": "FP32", "shape": [-1, h, w]},
            ]
        return [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "top_k_labels", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "top_k_scores", "datatype": "FP32", "shape": [-1, -1]},
        ]

    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the bank's anomaly map: the patch grid of its first stage."""
        model = self.require()
        state = model.detector.require()
        shape = model.manifest.outputs[state.stages[0]]
        return int(shape[-2]), int(shape[-1])

    # ---- answering --------------------------------------------------------------------
    def infer(
        self, images: Sequence[Image.Image], parameters: dict[str, Any]
    ) -> tuple[list[Tensor], int | None]:
        """``(output tensors, version)`` for ``images`` (decoded uploads), by the face the
        bundle is set up for: ``label``, ``score`` (+ ``top_k_labels``, ``top_k_scores``
        with ``parameters["top_k"]``) for a classifier; ``score``, ``threshold``,
        ``verdict`` (+ ``map`` with ``parameters["map"]``) for an anomaly bank.

        The whole request uses one head or bank version, ``version`` (None: the exported
        head): the face is a shallow copy holding the state in force when the request
        began, so a change committed meanwhile (which replaces the original's state in one
        assignment) is used from the next request on.

        Raises:
            ProtocolError: 400 for a bad ``top_k`` / ``map``, or what the runtime refuses.
        """
        model = self.refresh()
        n = len(images)
        if model.modality != "image":
            raise ProtocolError(400, f"model {self.name!r} is a text model; it takes texts")
        if self.kind == "anomaly":
            want_map = parameters.get("map", False)
            if not isinstance(want_map, bool):
                raise ProtocolError(400, "parameter 'map' must be true or false")
            if "top_k" in parameters:
                raise ProtocolError(
                    400, "parameter 'top_k' is for classifiers; this is an anomaly bank"
                )
            h, w = self.grid()
            detector = copy.copy(model.detector)  # one bank for the whole request
            version = detector.require().meta.get("version")
            try:
                verdicts = detector.predict(list(images), maps=want_map)
            except EdgeTLError as e:
                raise ProtocolError(400, str(e)) from None
            out = [
                Tensor("score", "FP32", [n], np.array([v.score for v in verdicts], np.float32)),
                Tensor(
                    "threshold", "FP32", [n], np.array([v.threshold for v in verdicts], np.float32)
                ),
                Tensor("verdict", "BYTES", [n], [v.verdict for v in verdicts]),
            ]
            if want_map:
                maps = np.stack([_on_grid(v.map, (h, w)) for v in verdicts])  # type: ignore[arg-type]
                out.append(Tensor("map", "FP32", [n, h, w], maps))
            return out, version
        if "map" in parameters:
            raise ProtocolError(400, "parameter 'map' is for anomaly banks; this is a classifier")
        top_k = parameters.get("top_k")
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K
        ):
            raise ProtocolError(
                400, f"parameter 'top_k' must be a whole number in [1, {MAX_TOP_K}], not {top_k!r}"
            )
        classifier = copy.copy(model.classifier)  # one head for the whole request
        state = classifier.require()
        version = state.meta.get("version")
        k = min(top_k or 1, len(state.labels))
        try:
            preds = classifier.predict(list(images), top_k=k)
        except EdgeTLError as e:
            raise ProtocolError(400, str(e)) from None
        out = [
            Tensor("label", "BYTES", [n], [p.label for p in preds]),
            Tensor("score", "FP32", [n], np.array([p.score for p in preds], np.float32)),
        ]
        if top_k is not None:
            labels = [[t["label"] for t in p.top_k] for p in preds]
            scores = np.array([[t["score"] for t in p.top_k] for p in preds], np.float32)
            out.append(Tensor("top_k_labels", "BYTES", [n, k], labels))
            out.append(Tensor("top_k_scores", "FP32", [n, k], scores))
        return out, version


def _on_grid(full: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """An anomaly map drawn at the image's size, averaged back onto the bank's patch grid
    ``(h, w)`` (box filter): ``float32[h, w]``."""
    h, w = grid
    img = Image.fromarray(np.asarray(full, np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), np.float32)


class Registry:
    """The served models by name, loaded one after another in a background thread."""

    def __init__(self, bundles: Sequence[str | Path], names: Sequence[str] = (), trust: Any = None):
        """``names`` name the first ``len(names)`` bundles; the others are named by their
        folder (or archive) name.

        Raises:
            EdgeTLError: more names than bundles, a missing bundle, a name not usable in a
                URL, or two bundles under one name.
        """
        if not bundles:
            raise EdgeTLError("serve needs at least one BUNDLE (a folder from `edge-tl export`)")
        if len(names) > len(bundles):
            raise EdgeTLError(
                f"{len(names)} --name for {len(bundles)} bundle(s); give at most one per BUNDLE"
            )
        self.models: dict[str, ServedModel] = {}
        for i, b in enumerate(bundles):
            path = Path(b)
            if not path.exists():
                raise EdgeTLError(
                    f"bundle {path} does not exist; pass a folder from `edge-tl export`"
                )
            default = path.name.removesuffix(".tar") if path.is_file() else path.name
            name = model_name(names[i] if i < len(names) else default)
            if name in self.models:
                raise EdgeTLError(
                    f"two bundles are named {name!r} ({self.models[name].path}, {path}); give "
                    "each a --name"
                )
            self.models[name] = ServedModel(name, path)
        self.trust = trust
        self.done = threading.Event()
        self.failed: str | None = None

    def start(self) -> threading.Thread:
        """Load every bundle in a background thread; :attr:`done` is set when it ends."""
        thread = threading.Thread(target=self.load_all, name="edge_tl-load", daemon=True)
        thread.start()
        return thread

    def load_all(self) -> None:
        for served in self.models.values():
            try:
                served.load(self.trust)
                _logger.info(
                    '{"event": "loaded", "model": "%s", "kind": "%s"}', served.name, served.kind
                )
            except Exception as e:  # noqa: BLE001 - any failure leaves the server not ready
                served.error = " ".join(str(e).split()) or type(e).__name__
                named = str(served.path) in served.error
                self.failed = served.error if named else f"bundle {served.path}: {served.error}"
                _logger.error('{"event": "load_failed", "model": "%s"}', served.name)
                break
        self.done.set()

    @property
    def ready(self) -> bool:
        return self.done.is_set() and self.failed is None

    def get(self, name: str) -> ServedModel:
        """The model served as ``name``.

        Raises:
            ProtocolError: 404 naming the models served.
        """
        served = self.models.get(name)
        if served is None:
            raise ProtocolError(
                404, f"unknown model {name[:80]!r}; this server has {', '.join(self.models)}"
            )
        return served
