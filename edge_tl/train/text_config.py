"""Text training settings: one flat frozen dataclass, checked before any text is read.

The image settings (:class:`~edge_tl.train.TrainConfig`) describe stages, augmentation and
batch norm; a BERT-family encoder has none of them, so text has its own record with the same
names where the idea is the same (``lr_head``, ``lr_backbone``, ``layer_decay``,
``patience``, the split).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge_tl.backbones import get_text_spec
from edge_tl.errors import EdgeTLError
from edge_tl.spec import STRATEGIES, TEXT_STRATEGIES, SplitRecord
from edge_tl.train.config import check_optimizer

__all__ = ["DEFAULT_TEXT_BACKBONE", "TEXT_STRATEGIES", "TextTrainConfig", "check_text_strategy"]

DEFAULT_TEXT_BACKBONE = "all-minilm-l6-v2"


def check_text_strategy(strategy: str) -> None:
    """Refuse a strategy text training does not have, in one line that lists the ones it has.

    Raises:
        EdgeTLError: an image-only strategy (bn-only, selective, ...) or an unknown name.
    """
    if strategy in TEXT_STRATEGIES:
        return
    what = "is an image strategy" if strategy in STRATEGIES else "is not a strategy"
    raise EdgeTLError(
        f"--strategy {strategy} {what}; text models train with {', '.join(TEXT_STRATEGIES)}"
    )


@dataclass(frozen=True)
class TextTrainConfig:
    """Text training settings; defaults are the ones ``edge-tl train`` uses on text
    (measured on TREC-6, README "Text models": ``edge-tl train trec6:train --test-data
    trec6:test`` reaches 96.6 % on the 500 test questions).

    ``lr_backbone`` is the rate of the last transformer layer; each layer below it gets
    ``layer_decay`` times the rate of the one above (layer-wise learning-rate decay, as in
    ELECTRA, Clark et al. 2020), the word embeddings (``full`` only) that of a layer below
    the first. ``test_data`` names a separate held-out set (e.g. ``trec6:test``): DATA is
    then split into training and validation only (``val_frac`` of it validates) and the test
    accuracy is measured on ``test_data``.
    """

    backbone: str = DEFAULT_TEXT_BACKBONE
    strategy: str = "finetune"
    epochs: int = 5
    batch_size: int = 32
    lr_head: float = 3e-3
    lr_backbone: float = 1e-4
    layer_decay: float = 0.9
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    dropout: float = 0.1
    train_layers: int = 2
    patience: int = 2
    test_frac: float = 0.2
    val_frac: float = 0.1
    train_per_class: int = 0
    seed: int = 0
    device: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    test_data: str | None = None

    def __post_init__(self) -> None:
        spec = get_text_spec(self.backbone)
        check_text_strategy(self.strategy)
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgeTLError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        for name in ("epochs", "train_layers"):
            if getattr(self, name) < 1:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be at least 1")
        if self.train_layers > spec.layers:
            raise EdgeTLError(
                f"--train-layers {self.train_layers}: {self.backbone} has {spec.layers} "
                f"layers; use 1..{spec.layers} (or --strategy full)"
            )
        for name in ("patience", "train_per_class"):
            if getattr(self, name) < 0:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.batch_size < 1:
            raise EdgeTLError("--batch-size must be at least 1")
        check_optimizer(self)
        if self.test_data is not None and not 0 < self.val_frac < 1:
            raise EdgeTLError(
                "with --test-data, --val-frac is the share of DATA that validates; use 0 < "
                "--val-frac < 1"
            )
        t, v = self.split.test_frac, self.split.val_frac
        if not 0 < t < 1 or not 0 <= v < 1 - t:  # the rule of stratified_split, checked early
            raise EdgeTLError(
                f"split fractions test={self.test_frac}, val={self.val_frac} are invalid; use "
                "0 < --test-frac < 1 and 0 <= --val-frac < 1 - --test-frac"
            )

    @property
    def split(self) -> SplitRecord:
        """How DATA is split. With ``test_data`` DATA gives no test split: its ``val_frac``
        share is cut off as a held-out part (:func:`edge_tl.data.split`'s test part), which
        :func:`edge_tl.train.text_runs.text_splits` then names ``val``."""
        if self.test_data is not None:
            return SplitRecord(self.val_frac, 0.0, self.seed, self.train_per_class)
        return SplitRecord(self.test_frac, self.val_frac, self.seed, self.train_per_class)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
