"""Workstation-side training: strategies from a linear probe to full fine-tuning, one loop,
boundary caching, checkpoints, DDP, and ``compare``.

Example:
    >>> from edge_tl.train import TrainConfig, train
    >>> metrics = train("../shared/data/neu_det", "runs/neu", TrainConfig())  # doctest: +SKIP
"""

from edge_tl.spec import DEFAULT_STRATEGY, STRATEGIES
from edge_tl.train.config import TrainConfig
from edge_tl.train.core import train
from edge_tl.train.runs import checkpoint_path, load_run

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "TrainConfig",
    "checkpoint_path",
    "load_run",
    "train",
]
