"""Training settings: one flat frozen dataclass, checked before any image is read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge_tl.backbones import DEFAULT_BACKBONE, get_spec
from edge_tl.errors import EdgeTLError
from edge_tl.spec import DEFAULT_STRATEGY, STRATEGIES, SplitRecord
from edge_tl.train.augment import parse_augment

__all__ = ["BALANCE", "PRECISIONS", "TrainConfig"]

BALANCE = ("none", "sampler", "loss")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are the ones ``edge-tl train`` uses (README, "Why these
    defaults", gives the measurements behind them: ``benchmarks/defaults.py``)."""

    backbone: str = DEFAULT_BACKBONE
    strategy: str = DEFAULT_STRATEGY
    weights: str | None = None
    epochs: int = 8
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    layer_decay: float = 0.8
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    dropout: float = 0.2
    train_stages: int = 2
    image_size: int = 0
    """Input side in pixels (0: the backbone's native size, ``BackboneSpec.size``); recorded
    in the run's preprocessing, so export and the device resize to it too."""
    stages: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    unfreeze_every: int = 1
    patience: int = 4
    balance: str = "none"
    augment: str = "auto"
    views: int = 1
    cache: bool = True
    freeze_bn: bool = False
    test_frac: float = 0.2
    val_frac: float = 0.1
    train_per_class: int = 0
    seed: int = 0
    onnx_cache: bool = True
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    qat: bool = False
    target_unlabeled: str | None = None
    """Domain adaptation: the target images (:func:`edge_tl.train.adapt.open_target`)."""
    adapt: str | None = None
    """none, adabn, coral, dann, mcc (:mod:`edge_tl.train.adapt`); the default method when
    only ``target_unlabeled`` is given."""
    adapt_weight: float | None = None
    """λ of coral / dann / mcc (default per method: ``adapt.DEFAULT_WEIGHTS``)."""
    tasks: tuple[str, ...] = ()
    """Multi-task: the tasks to learn from a multi-label source (:mod:`edge_tl.multitask`);
    empty: one task, the data's classes."""
    task_weights: tuple[float, ...] = ()
    """Multi-task loss weights, one per task (empty: all 1, the plain sum that Kurin et al.,
    NeurIPS 2022, find as good as specialised multi-task optimisers)."""

    def __post_init__(self) -> None:
        if get_spec(self.backbone).sources and self.strategy not in ("linear-probe", "auto"):
            raise EdgeTLError(
                f"{self.backbone} is a multi-source backbone: its embeddings are concatenated "
                "for a linear probe; use --strategy linear-probe (or fine-tune one backbone)"
            )
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "task_weights", tuple(float(w) for w in self.task_weights))
        if self.task_weights:
            from edge_tl.multitask import parse_weights

            if len(self.tasks) < 2:
                raise EdgeTLError("--task-weights weighs two or more --tasks; drop it")
            parse_weights(",".join(map(str, self.task_weights)), len(self.tasks))
        if len(self.tasks) > 1 and self.balance == "loss":
            raise EdgeTLError(
                "--balance loss weighs one task's classes; with several --tasks use "
                "--balance sampler (it balances the task-class combinations) or none"
            )
        if self.strategy not in STRATEGIES:
            raise EdgeTLError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.strategy == "auto":
            from edge_tl.train.auto import check_auto, fixed_strategy

            check_auto(self)
            # --qat and loop adaptation train inside fine-tuning: auto resolves to finetune
            object.__setattr__(self, "strategy", fixed_strategy(self) or "auto")
        for name, choices in (("balance", BALANCE), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise EdgeTLError(
                    f"--{name} {getattr(self, name)!r} is not one of {', '.join(choices)}"
                )
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgeTLError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        for name in ("epochs", "train_stages", "unfreeze_every", "views"):
            if getattr(self, name) < 1:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("patience", "train_per_class", "workers"):
            if getattr(self, name) < 0:
                raise EdgeTLError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.image_size and not 32 <= self.image_size <= 1024:
            raise EdgeTLError(
                f"--image-size {self.image_size} is outside 32..1024 pixels; "
                "use 0 for the backbone's native size"
            )
        if self.batch_size < 2:
            raise EdgeTLError("--batch-size must be at least 2 (batch norm needs two samples)")
        check_optimizer(self)
        if self.strategy == "selective" and not self.stages and not self.params:
            raise EdgeTLError(
                "selective needs --stages (e.g. 5,6) and/or --params (e.g. 'net.layer4.*')"
            )
        parse_augment(self.augment, grey=True)  # a typo fails now, not after caching
        if self.qat and self.strategy in ("linear-probe", "from-scratch"):
            raise EdgeTLError(
                f"--qat fine-tunes a pretrained backbone through INT8 rounding; it does not "
                f"apply to {self.strategy} (use finetune, full, selective, ...)"
            )
        self._check_adapt()
        if self.strategy == "linear-probe" and not self.cache:
            raise EdgeTLError("linear-probe always caches embeddings; drop --no-cache")

    def _check_adapt(self) -> None:
        from edge_tl.train.adapt import DEFAULT_METHOD, DEFAULT_WEIGHTS, LOOP_METHODS, METHODS

        if self.target_unlabeled is None:
            for flag, value in (("--adapt", self.adapt), ("--adapt-weight", self.adapt_weight)):
                if value is not None:
                    raise EdgeTLError(
                        f"{flag} adapts to target images; give them with --target-unlabeled "
                        "TARGET (a folder of images, an ImageFolder or elpv:mono / elpv:poly)"
                    )
            return
        method = self.adapt if self.adapt is not None else DEFAULT_METHOD
        if method not in METHODS:
            raise EdgeTLError(f"--adapt {method!r} is not one of {', '.join(METHODS)}")
        if self.adapt_weight is not None and method not in LOOP_METHODS:
            raise EdgeTLError(
                f"--adapt-weight weighs the loss of {', '.join(LOOP_METHODS)}; --adapt "
                f"{method} has none (drop --adapt-weight)"
            )
        if self.adapt_weight is not None and not self.adapt_weight > 0:
            raise EdgeTLError("--adapt-weight must be positive")
        if method in LOOP_METHODS and self.strategy in ("linear-probe",):
            raise EdgeTLError(
                f"--adapt {method} trains the backbone on target batches, and linear-probe "
                "trains no backbone layer; use --strategy finetune, or --adapt adabn / none"
            )
        if method in LOOP_METHODS and self.qat:
            raise EdgeTLError(f"--adapt {method} and --qat do not combine; drop one")
        if self.tasks:
            raise EdgeTLError(
                "--target-unlabeled adapts a one-task model (multi-task adaptation is not built); "
                "drop --tasks"
            )
        weight = self.adapt_weight
        if weight is None and method in LOOP_METHODS:
            weight = DEFAULT_WEIGHTS[method]
        object.__setattr__(self, "adapt", method)
        object.__setattr__(self, "adapt_weight", weight)

    @property
    def split(self) -> SplitRecord:
        """The run's split (train / val / test) as the contract records it."""
        return SplitRecord(self.test_frac, self.val_frac, self.seed, self.train_per_class)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"], d["params"] = list(self.stages), list(self.params)
        for key in ("tasks", "task_weights"):  # a one-task run's record stays as it was
            if d[key]:
                d[key] = list(d[key])
            else:
                del d[key]
        return d

    @property
    def weights_per_task(self) -> tuple[float, ...]:
        """The loss weight of each task (1 each unless ``task_weights``)."""
        return self.task_weights or (1.0,) * len(self.tasks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        )


def check_optimizer(config: Any) -> None:
    """Refuse optimizer settings out of range (``layer_decay``, ``dropout``,
    ``label_smoothing``, the learning rates, ``weight_decay``) in one line naming the flag;
    the image and the text config share it."""
    if not 0 < config.layer_decay <= 1:
        raise EdgeTLError("--layer-decay must be in (0, 1]")
    if not 0 <= config.dropout < 1:
        raise EdgeTLError("--dropout must be in [0, 1)")
    if not 0 <= config.label_smoothing < 1:
        raise EdgeTLError("--label-smoothing must be in [0, 1)")
    if not (config.lr_head > 0 and config.lr_backbone > 0 and config.weight_decay >= 0):
        raise EdgeTLError(
            "--lr-head and --lr-backbone must be positive and --weight-decay 0 or more"
        )
