"""Workstation-side training: a linear probe on cached embeddings, or fine-tuning the last
stages on activations cached at the freeze boundary.

Example:
    >>> from edge_tl.train import TrainConfig, train
    >>> metrics = train("../shared/data/neu_det", "runs/neu", TrainConfig())  # doctest: +SKIP
"""

from edge_tl.train.core import STRATEGIES, TrainConfig, load_run, train

__all__ = ["STRATEGIES", "TrainConfig", "load_run", "train"]
