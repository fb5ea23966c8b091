"""What every export of one run shares, computed once and kept on disk beside the run.

Every recipe of a run starts from the same work: the FP32 ONNX graph (and its parity with
PyTorch), the decoded check, training and calibration images, and the FP32 reference
embeddings of the check images (PyTorch and the FP32 engine) and of the training images
(the FP32 engine, for the head FP32 accuracy is measured with). :class:`ExportCache` keeps
them in ``RUN/.export_cache/`` as ``.onnx``, ``.npz`` and ``.json`` files (no pickles), so
a second export of the same run, or every recipe of ``edge-tl export RUN --recipe a,b,c``,
reuses them.

Keys: the folder belongs to one *run key*, the SHA-256 of the run's ``run.json`` and
weights/head files with the versions of edge_tl, torch and ONNX Runtime; a run trained
again (or another version) wipes the folder. Each array is keyed by what it was made from:
the image paths with each file's size and modification time, and the preprocessing. An
unwritable run folder leaves the export uncached (one warning), never failed.

Example:
    >>> cache = ExportCache.for_run("runs/elpv")  # doctest: +SKIP
    >>> images = cache.images(paths, pre, labels, desc="decoding held-out split")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl import __version__
from edge_tl.export.fidelity import Images
from edge_tl.spec import Preprocess

__all__ = ["CACHE_DIR", "ExportCache", "run_key"]

_logger = logging.getLogger(__name__)

CACHE_DIR = ".export_cache"
_FORMAT = 1
_RUN_FILES = (".json", ".safetensors", ".npz")


def run_key(run: str | Path) -> str:
    """SHA-256 (hex) of what makes a run's exports what they are: the run's top-level
    ``.json`` / ``.safetensors`` / ``.npz`` files (record, weights, heads) and the versions
    of edge_tl, torch and ONNX Runtime that export and embed."""
    import onnxruntime
    import torch

    h = hashlib.sha256()
    h.update(
        json.dumps([_FORMAT, __version__, torch.__version__, onnxruntime.__version__]).encode()
    )
    for p in sorted(Path(run).iterdir()):
        if p.is_file() and p.suffix in _RUN_FILES:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _images_key(paths: Sequence[str], pre: Preprocess) -> str:
    """Key of decoded images: paths, each file's size and mtime, and the preprocessing."""
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    text = json.dumps([stats, dataclasses.asdict(pre)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ExportCache:
    """The shared work of one run's exports in ``folder`` (see the module docstring).

    Every method takes a ``compute`` fallback (or computes itself) and stores what it made;
    a cache that cannot write keeps working in memory only.
    """

    def __init__(self, folder: str | Path | None, key: str = "") -> None:
        self.folder = Path(folder) if folder is not None else Path()
        self.key = key
        self.writable = folder is not None
        self.hits: list[str] = []
        """Names of the entries read back from disk in this process (what a test checks)."""
        self._memory: dict[str, Any] = {}
        if self.writable:
            self._open()

    @classmethod
    def in_memory(cls) -> ExportCache:
        """A cache that shares work within one call only (a backbone export, AdaBN)."""
        return cls(None)

    @classmethod
    def for_run(cls, run: str | Path) -> ExportCache:
        """The cache of ``run`` in ``run/.export_cache`` (wiped when the run changed)."""
        return cls(Path(run) / CACHE_DIR, run_key(run))

    def _open(self) -> None:
        stamp = self.folder / "key.json"
        try:
            if self.folder.is_dir():
                try:
                    ok = json.loads(stamp.read_text()).get("run_key") == self.key
                except (OSError, ValueError):
                    ok = False
                if ok:
                    return
                _logger.info(f"export cache {self.folder}: the run changed, starting afresh")
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            stamp.write_text(json.dumps({"run_key": self.key, "format": _FORMAT}) + "\n")
        except OSError as e:
            self.writable = False
            _logger.warning(
                f"cannot keep an export cache in {self.folder} ({e.strerror}); "
                "every export recomputes its FP32 reference"
            )

    # ---- storage --------------------------------------------------------------------
    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        """Write ``name`` atomically (a temporary file renamed into place)."""
        if not self.writable:
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.folder)
            os.close(fd)
            write(Path(tmp))
            os.replace(tmp, self.folder / name)
        except OSError as e:
            self.writable = False
            _logger.warning(f"export cache {self.folder}: cannot write ({e.strerror})")

    def _read_array(self, name: str) -> np.ndarray | None:
        path = self.folder / name
        if not self.writable or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arr = z["a"]
        except (OSError, ValueError, KeyError):
            return None
        self.hits.append(name)
        return arr

    def array(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``name.npz`` from memory or disk, else ``compute()`` stored there."""
        file = f"{name}.npz"
        if file in self._memory:
            return self._memory[file]
        arr = self._read_array(file)
        if arr is None:
            arr = np.asarray(compute())
            self._write(file, lambda p: _save_npz(p, arr))
        self._memory[file] = arr
        return arr

    # ---- what exports share -------------------------------------------------------------
    def images(
        self,
        paths: Sequence[str],
        pre: Preprocess,
        labels: np.ndarray | None = None,
        desc: str | None = None,
    ) -> Images:
        """:class:`Images` of ``paths`` (decoded pixels cached by paths, files and
        preprocessing)."""
        key = _images_key(paths, pre)
        pixels = self.array(f"pixels-{key}", lambda: Images(list(paths), pre, desc=desc).pixels)
        return Images(list(paths), pre, labels, pixels=pixels)

    def embeddings(
        self, model: str, images: Images, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """``model``'s (``pytorch``, ``onnx-fp32``) embeddings of ``images``, cached."""
        return self.array(f"emb-{model}-{_images_key(images.paths, images.pre)}", compute)

    def graph(self, compute: Callable[[Path], dict[str, Any]], work: Path) -> tuple[Path, dict]:
        """``(fp32.onnx, record)``: the FP32 graph and what ``compute(path)`` returned for it
        (JSON: its outputs and parity), exported once."""
        onnx_path, record_path = self.folder / "fp32.onnx", self.folder / "graph.json"
        if "graph" in self._memory:
            return self._memory["graph"]
        if self.writable and onnx_path.is_file() and record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
                self.hits.append("fp32.onnx")
                self._memory["graph"] = (onnx_path, record)
                return onnx_path, record
            except (OSError, ValueError):
                pass
        path = work / "fp32.onnx"
        record = compute(path)
        if self.writable:
            self._write("fp32.onnx", lambda p: shutil.copyfile(path, p))
            self._write("graph.json", lambda p: p.write_text(json.dumps(record) + "\n"))
        result = (onnx_path if self.writable else path), record
        self._memory["graph"] = result
        return result


def _save_npz(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, a=arr)
