"""Unsupervised domain adaptation: labelled source images, unlabelled target images.

Four methods from the literature, each a few dozen lines (the losses follow thuml's
Transfer-Learning-Library, ``tllib``, where it has them):

- ``adabn`` (Li et al. 2016, "Revisiting Batch Normalization for Practical Domain
  Adaptation", arXiv:1603.04779): after training, every batch-norm layer's running mean and
  variance are re-estimated on the target images; no gradient, no extra loss.
- ``coral`` (Sun & Saenko 2016, "Deep CORAL", ECCV workshops): ``||C_s - C_t||_F^2 / (4 d^2)``
  between the covariances of a source and a target batch of embeddings.
- ``dann`` (Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks", JMLR 17):
  a domain classifier on the embeddings behind a gradient-reversal layer whose coefficient
  ramps ``2 / (1 + exp(-10 p)) - 1`` over training progress ``p``.
- ``mcc`` (Jin et al. 2020, "Minimum Class Confusion for Versatile Domain Adaptation",
  ECCV): the class confusion of the target predictions (temperature 2.5, samples weighted by
  ``1 + exp(-entropy)``), off-diagonal mass minimised.

The training loop (:mod:`edge_tl.train.loop`) draws a target batch beside each source batch
and adds ``weight * loss`` (:class:`Adapter`); AdaBN runs once after training
(:func:`adabn`). :func:`open_target` reads the target: a named set or an ImageFolder is
split by :func:`edge_tl.domains.target_split` (adaptation sees the ``unlabeled`` part, the
``test`` part is scored), a flat folder of images is used whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_tl.data import Dataset, is_named_image_set, open_dataset
from edge_tl.errors import EdgeTLError
from edge_tl.images import check_images, entries

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_WEIGHTS",
    "LOOP_METHODS",
    "METHODS",
    "Adapter",
    "DomainDiscriminator",
    "TargetData",
    "adabn",
    "coral_loss",
    "dann_coefficient",
    "grad_reverse",
    "mcc_loss",
    "open_target",
]

_logger = logging.getLogger(__name__)

METHODS = ("none", "adabn", "coral", "dann", "mcc")
"""``none`` trains on the source alone and still scores the target (the baseline)."""
LOOP_METHODS = ("coral", "dann", "mcc")
"""Methods with a loss on target batches inside the training loop."""
DEFAULT_METHOD = "mcc"
"""``--adapt`` when only ``--target-unlabeled`` is given. Measured (README, domain
adaptation; ``benchmarks/domain_adaptation.py``): MCC gains on ELPV mono -> poly and poly ->
mono and on the NEU-DET camera change, the only method that lost on none of the three;
AdaBN gains most on ELPV but loses ~20 pt on the camera change."""
DEFAULT_WEIGHTS = {"coral": 1000.0, "dann": 1.0, "mcc": 1.0}
"""λ per method: tllib's trade-off 1.0 for DANN and MCC. Deep CORAL picks λ so that the
classification and CORAL losses are of the same order (Sun & Saenko 2016, sec. 3.2); their
loss sits on fc8 (d = classes), here on the 1,280-d embeddings of EfficientNet-Lite0, where
``||C_s - C_t||^2 / (4 d^2)`` starts near 1e-4 on NEU-DET's camera change (a cross-entropy of
~1 then), hence 1000 rather than skada's ``reg=1``."""
MCC_TEMPERATURE = 2.5
TARGET = "target"
"""Key of the unlabelled target images in :class:`~edge_tl.train.batches.TrainingData`."""


# ---- the target ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetData:
    """The target domain: ``unlabeled`` image paths (what adaptation sees) and, when the
    target has labels, ``test`` (held out, scored, never adapted on)."""

    spec: str
    unlabeled: list[str]
    test: Dataset | None

    def record(self) -> dict[str, Any]:
        """What ``run.json`` says about the target."""
        return {
            "data": self.spec,
            "unlabeled_images": len(self.unlabeled),
            "test_images": 0 if self.test is None else len(self.test),
        }


def open_target(spec: str | Path, classes: list[str] | None = None, seed: int = 0) -> TargetData:
    """The target ``spec``: a named set (``elpv:poly``), an ImageFolder (``<class>/<image>``)
    or a flat folder of images (all of them unlabelled).

    A labelled target is split by :func:`edge_tl.domains.target_split` (``seed``): a warning
    says once that its labels are not used for adaptation and that its held-out part is
    scored. Its classes must be ``classes`` (the source's) to be scored.

    Raises:
        EdgeTLError: missing folder, no images, a bad image, or other classes than the source.
    """
    from edge_tl.domains import target_split

    name = str(spec)
    if not is_named_image_set(spec):
        folder = Path(spec)
        if not folder.is_dir():
            raise EdgeTLError(
                f"target folder {folder} does not exist; pass a folder of unlabelled target "
                "images, an ImageFolder, or elpv:mono / elpv:poly"
            )
        name = str(folder.resolve())
        files, dirs = entries(folder)
        if files or not dirs:
            paths, _ = check_images(files, skip_bad=False)
            if not paths:
                raise EdgeTLError(f"target folder {folder} has no images; pass a folder of images")
            return TargetData(name, paths, None)
    ds = open_dataset(spec)
    if classes is not None and ds.classes != list(classes):
        raise EdgeTLError(
            f"target {spec} has classes {', '.join(ds.classes)}, the source "
            f"{', '.join(classes)}; pass a target with the same class folders, or a flat "
            "folder of unlabelled images"
        )
    parts = target_split(ds, seed=seed)
    _logger.warning(
        f"target {spec} has labels: they are not used for adaptation; adapting on "
        f"{len(parts['unlabeled'])} of its images and scoring the {len(parts['test'])} held out"
    )
    return TargetData(name, list(parts["unlabeled"].paths), parts["test"])


# ---- the losses ----------------------------------------------------------------------------
def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016, eq. 1): ``||C_s - C_t||_F^2 / (4 d^2)``.

    Args:
        source: embeddings ``float[n_s, d]`` (``n_s >= 2``).
        target: embeddings ``float[n_t, d]`` (``n_t >= 2``).

    Returns:
        A scalar tensor; ``C`` is the unbiased covariance (divided by ``n - 1``).
    """
    d = source.shape[1]
    cs = torch.cov(source.T)
    ct = torch.cov(target.T)
    return ((cs - ct) ** 2).sum() / (4 * d * d)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-5)).sum(dim=1)


def mcc_loss(logits: torch.Tensor, temperature: float = MCC_TEMPERATURE) -> torch.Tensor:
    """Minimum class confusion (Jin et al. 2020, eqs. 1-6; tllib's ``MinimumClassConfusionLoss``).

    Predictions ``softmax(logits / T)``; each sample weighted by ``1 + exp(-H)`` (``H`` its
    entropy, no gradient), weights scaled to sum to the batch size; confusion
    ``C = P^T W P`` normalised per class; the loss is the off-diagonal mass over ``K``.

    Args:
        logits: target logits ``float[n, K]``.

    Returns:
        A scalar tensor in ``[0, (K - 1) / K]``.
    """
    n, k = logits.shape
    p = F.softmax(logits / temperature, dim=1)
    w = 1 + torch.exp(-_entropy(p).detach())
    w = (n * w / w.sum()).unsqueeze(1)
    confusion = (p * w).T @ p
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - torch.trace(confusion)) / k


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky 2015): identity forward, ``-coeff * grad`` back."""
    return _GradReverse.apply(x, coeff)


def dann_coefficient(progress: float) -> float:
    """DANN's ramp ``2 / (1 + exp(-10 p)) - 1`` for training progress ``p`` in ``[0, 1]``."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """The domain classifier of DANN (tllib's ``DomainDiscriminator``): two hidden layers of
    ``hidden`` units with batch norm and ReLU, one logit (source = 1, target = 0)."""

    def __init__(self, in_features: int, hidden: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


def dann_loss(
    disc: nn.Module, source: torch.Tensor, target: torch.Tensor, coeff: float
) -> torch.Tensor:
    """Domain-classification loss (binary cross-entropy, mean of the two domains' means) on
    embeddings behind a gradient reversal of ``coeff``: the discriminator learns to tell the
    domains apart, the backbone learns to make them alike."""
    d = disc(grad_reverse(torch.cat([source, target]), coeff)).squeeze(1)
    ns = len(source)
    ls = F.binary_cross_entropy_with_logits(d[:ns], torch.ones_like(d[:ns]))
    lt = F.binary_cross_entropy_with_logits(d[ns:], torch.zeros_like(d[ns:]))
    return 0.5 * (ls + lt)


# ---- in the training loop ------------------------------------------------------------------
class Adapter:
    """A loop method's loss on the embeddings / logits of a source and a target batch, its
    trainable parts (DANN's discriminator) and the target batches of each epoch."""

    def __init__(self, method: str, weight: float, num_features: int, device: Any) -> None:
        if method not in LOOP_METHODS:
            raise EdgeTLError(f"{method} does not train in the loop; one of {LOOP_METHODS}")
        self.method, self.weight = method, weight
        self.disc = DomainDiscriminator(num_features).to(device) if method == "dann" else None

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.disc is None else list(self.disc.parameters())

    def train(self) -> None:
        if self.disc is not None:
            self.disc.train()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.disc is None else self.disc.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(state)

    def loss(
        self,
        f_source: torch.Tensor,
        f_target: torch.Tensor,
        logits_target: torch.Tensor,
        progress: float,
    ) -> torch.Tensor:
        """``weight *`` the method's loss; ``progress`` in ``[0, 1]`` (DANN's ramp)."""
        if self.method == "coral":
            loss = coral_loss(f_source, f_target)
        elif self.method == "mcc":
            loss = mcc_loss(logits_target)
        else:
            loss = dann_loss(self.disc, f_source, f_target, dann_coefficient(progress))
        return self.weight * loss

    @staticmethod
    def target_batches(
        n_target: int, n_batches: int, batch_size: int, seed: int, epoch: int
    ) -> list[np.ndarray]:
        """``n_batches`` index batches into the target images, cycling through shuffles drawn
        from ``(seed, epoch)`` (a resumed run draws the same)."""
        rng = np.random.default_rng([seed, epoch, 2016])
        order = np.concatenate(
            [rng.permutation(n_target) for _ in range(-(-n_batches * batch_size // n_target))]
        )
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


# ---- after training ------------------------------------------------------------------------
@torch.no_grad()
def adabn(
    features: nn.Module, paths: list[str], pre: Any, batch_size: int = 64, desc: str = "AdaBN"
) -> int:
    """AdaBN (Li et al. 2016): every batch-norm layer's running mean and variance replaced by
    their averages over the target images ``paths`` (cumulative average over batches of
    ``batch_size``; images preprocessed as ``pre`` says); weights are untouched. Returns the
    number of batch-norm layers re-estimated. Leaves ``features`` in eval mode.

    Raises:
        EdgeTLError: fewer than two images, or a network without batch norm.
    """
    from edge_tl.progress import progress
    from edge_tl.runtime.preprocess import batch_inputs

    bns = [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise EdgeTLError("AdaBN re-estimates batch norm, and this network has none")
    if len(paths) < 2:
        raise EdgeTLError(f"AdaBN needs at least 2 target images, got {len(paths)}")
    momenta = [m.momentum for m in bns]
    features.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the mean over all batches
        m.train()
    try:
        starts = range(0, len(paths), batch_size)
        for i in progress(starts, desc=desc):
            batch = paths[i : i + batch_size]
            if len(batch) < 2:  # batch norm in training mode needs two samples
                continue
            features(torch.from_numpy(batch_inputs(batch, pre)))
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        features.eval()
    return len(bns)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits[n, K]`` against integer ``labels[n]``."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def iter_target_inputs(data: Any, batches: list[np.ndarray]) -> Iterator[torch.Tensor]:
    """The target batches as network inputs (cached boundary activations or images)."""
    return data.inputs_of(TARGET, batches)


# ---- scoring and the picture ---------------------------------------------------------------
PLOT_POINTS = 300
"""At most this many images per domain in ``domains.png``."""


def embed_domains(
    features: nn.Module, source_test: Dataset, target: TargetData, use_onnx: bool = True
) -> dict[str, np.ndarray]:
    """Embeddings ``float32[n, D]`` of the source test images (``"source"``) and of the
    target's test images, or of up to :data:`PLOT_POINTS` of its unlabelled ones when it has
    no labels (``"target"``), through ``features`` as it is now (eval mode)."""
    from edge_tl.train.cache import cache_activations

    pre = features.spec.preprocess
    tpaths = list(target.test.paths) if target.test is not None else target.unlabeled[:PLOT_POINTS]
    emb = cache_activations(
        features,
        list(source_test.paths) + tpaths,
        pre,
        None,
        desc="embedding source and target",
        use_onnx=use_onnx,
    )
    return {"source": emb[: len(source_test)], "target": emb[len(source_test) :]}


def finish(
    features: nn.Module,
    head: Any,
    source_test: Dataset,
    target: TargetData,
    config: Any,
    before: dict[str, np.ndarray] | None,
) -> tuple[dict[str, Any], Any]:
    """After training: AdaBN when ``config.adapt`` says so, then the scores of the adapted
    model (``metrics``: ``target_test_accuracy`` and macro F1 on the target's held-out part
    when it has labels, ``source_test_accuracy_adapted`` on the source's test split through
    the final weights) and a function that draws ``domains.png`` into a folder.

    ``before``: embeddings (:func:`embed_domains`) of the network training started from;
    for AdaBN the trained network before re-estimation is used instead.
    """
    from edge_tl.runtime.evaluation import macro_f1
    from edge_tl.train.plots import plot_domains

    pre = features.spec.preprocess
    metrics: dict[str, Any] = {
        "adapt": config.adapt,
        "adapt_weight": config.adapt_weight,
        "target": target.spec,
        "n_target_unlabeled": len(target.unlabeled),
    }
    before_name = "before: pretrained backbone"
    if config.adapt == "adabn":
        before = embed_domains(features, source_test, target, config.onnx_cache)
        before_name = "before: trained, source BN statistics"
        metrics["adabn_layers"] = adabn(features, target.unlabeled, pre)
    after = embed_domains(features, source_test, target, config.onnx_cache)
    metrics["source_test_accuracy_adapted"] = accuracy(
        head.logits(after["source"]), source_test.labels
    )
    if target.test is not None:
        logits = head.logits(after["target"])
        metrics["target_test_accuracy"] = accuracy(logits, target.test.labels)
        metrics["target_test_macro_f1"] = macro_f1(
            logits.argmax(1), target.test.labels, len(source_test.classes)
        )
        metrics["n_target_test"] = len(target.test)
    after_name = (
        f"after: {config.adapt}" if config.adapt != "none" else "after: trained, no adaptation"
    )

    def draw(folder: Path) -> None:
        rng = np.random.default_rng(0)
        pick = {k: np.sort(rng.permutation(len(v))[:PLOT_POINTS]) for k, v in after.items()}
        tlabels = (
            target.test.labels[pick["target"]]
            if target.test is not None
            else np.full(len(pick["target"]), -1)
        )
        domain = np.r_[np.zeros(len(pick["source"]), int), np.ones(len(pick["target"]), int)]
        labels = np.r_[source_test.labels[pick["source"]], tlabels]
        panels = [
            (name, np.concatenate([emb["source"][pick["source"]], emb["target"][pick["target"]]]))
            for name, emb in ((before_name, before), (after_name, after))
            if emb is not None
        ]
        acc = metrics.get("target_test_accuracy")
        title = f"source {source_test.name} vs target {Path(target.spec).name}" + (
            f" (target test accuracy {acc:.3f})" if acc is not None else ""
        )
        plot_domains(panels, domain, labels, source_test.classes, folder / "domains.png", title)

    return metrics, draw
