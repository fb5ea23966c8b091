"""What ``edge-tl select`` produces: each candidate's scores (:class:`BackboneScore`), the
ranking with its baseline and checks (:class:`Selection`), and the names its files and
metrics go by (:mod:`edge_tl.train.select` makes them, :mod:`edge_tl.train.select_report`
writes and reads them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "NEGATIVE_MARGIN", "SELECT_FILE", "BackboneScore", "Selection"]

SELECT_FILE = "select.json"
METRICS = ("logme", "leep", "h_score")
NEGATIVE_MARGIN = 0.0
"""LogME (nats per sample) by which the best pre-trained backbone must beat randomly
initialised features of its architecture; at or below it, transfer is not expected to help.
Measured gaps (benchmarks/transferability.py): NEU-DET 0.93, flowers5 0.18, ELPV 0.12, with
fine-tuning beating from-scratch by 24-35 pt on NEU-DET and flowers5 (README, "Which
transfer pays")."""


@dataclass(frozen=True)
class BackboneScore:
    """One candidate's scores on the data; ``seconds`` covers building, embedding and
    scoring (``embed_seconds`` the embedding alone)."""

    backbone: str
    logme: float
    leep: float
    h_score: float
    dim: int
    seconds: float
    embed_seconds: float
    finetuned_accuracy: float | None = None
    finetune_seconds: float | None = None


@dataclass
class Selection:
    """The ranking (best LogME first), the random-feature baseline and the checks."""

    data: str
    n_images: int
    classes: list[str]
    rows: list[BackboneScore]
    baseline: dict[str, Any] | None = None
    weighted_tau: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)

    @property
    def best(self) -> BackboneScore:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranking"] = {m: [r.backbone for r in _ranked(self.rows, m)] for m in METRICS}
        return d


def _ranked(rows: list[BackboneScore], metric: str) -> list[BackboneScore]:
    return sorted(rows, key=lambda r: -getattr(r, metric))


def _same_data(recorded: str, data: str | Path) -> bool:
    """Whether a record's data is ``data``: the same named set, the same folder, or (a
    relative path recorded elsewhere that does not resolve here) the same folder name."""
    a, b = str(recorded), str(data)
    if not Path(a).exists() or not Path(b).exists():
        return a == b or (Path(a).name == Path(b).name and not Path(a).is_absolute())
    return Path(a).resolve() == Path(b).resolve()
