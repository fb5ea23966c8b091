"""Workstation-side training: strategies from a linear probe to full fine-tuning, one loop,
boundary caching, checkpoints, DDP, and ``compare``; text encoders through
:func:`train_text`.

Example:
    >>> from edge_tl.train import TrainConfig, train
    >>> metrics = train("../shared/data/neu_det", "runs/neu", TrainConfig())  # doctest: +SKIP
    >>> metrics = train_text("trec6:train", "runs/trec6", TextTrainConfig())  # doctest: +SKIP
"""

from edge_tl.spec import DEFAULT_STRATEGY, STRATEGIES
from edge_tl.train.config import TrainConfig
from edge_tl.train.core import train
from edge_tl.train.runs import checkpoint_path, load_run
from edge_tl.train.text import train_text
from edge_tl.train.text_config import TextTrainConfig
from edge_tl.train.text_runs import load_text_run

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "TextTrainConfig",
    "TrainConfig",
    "checkpoint_path",
    "load_run",
    "load_text_run",
    "train",
    "train_text",
]
