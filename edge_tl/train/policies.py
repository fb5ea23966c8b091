"""Fine-tuning strategies as data: which parameters learn, at what rate, from which epoch.

Every strategy works on every backbone through :class:`~edge_tl.backbones.FeatureModel`'s
split (stem -> blocks in stages -> head modules -> pooling -> post-pool layers):

- ``linear-probe``: nothing in the backbone learns; a softmax head on cached embeddings.
- ``finetune`` (default): the last ``train_stages`` stages, the head modules and the head.
- ``full``: everything.
- ``selective``: the stages listed in ``stages`` and/or parameters matching ``params``
  (``fnmatch`` patterns on names such as ``net.layer4.*``).
- ``bn-only``: normalisation scales and shifts (statistics re-estimated on the new data).
- ``bias-only``: additive biases only, statistics frozen (TinyTL's memory-light tuning).
- ``gradual``: like ``finetune``, but the head learns alone first and one more stage
  unfreezes every ``unfreeze_every`` epochs (ULMFiT).
- ``from-scratch``: the same architecture from random weights; the negative-transfer
  baseline.

Learning rates are discriminative: the head at ``lr_head``; the last stage and head
modules at ``lr_backbone``; each earlier stage ``layer_decay`` times the one after it.
Norm scales and all biases get no weight decay.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from edge_tl.backbones import FeatureModel
from edge_tl.errors import EdgeTLError
from edge_tl.spec import STRATEGIES

__all__ = ["Policy", "Unit", "make_policy", "set_train_modes", "units_of"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Unit:
    """A piece of the backbone that trains as one: the stem, a stage, or the head modules."""

    name: str
    depth: int  # stages from the end; the learning rate is lr_backbone * layer_decay**depth
    modules: list[nn.Module]
    unfreeze_epoch: int = 1
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)


@dataclass
class Policy:
    """What a strategy trains. ``boundary``: the first block anything trains in (cache
    activations at its input); ``None`` when the stem trains (train from images)."""

    strategy: str
    boundary: int | None
    units: list[Unit]
    train_modes: list[nn.Module]  # modules in training mode (normalisation statistics move)
    pretrained: bool = True

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for u in self.units for _, p in u.params]


def units_of(features: FeatureModel) -> list[Unit]:
    """The backbone cut into stem, stages and head modules, deepest first."""
    starts = features.stage_starts
    n = len(starts)
    units = [Unit("stem", n, list(features.stem_modules))]
    for s, a in enumerate(starts):
        b = starts[s + 1] if s + 1 < n else len(features.blocks)
        units.append(Unit(f"stage{s}", n - 1 - s, list(features.blocks[a:b])))
    units.append(Unit("head_modules", 0, [*features.head_modules, *features.post_modules]))
    return units


def _first_block(features: FeatureModel, units: list[Unit]) -> int | None:
    """The freeze boundary: the input of the earliest block holding a trainable parameter."""
    starts = features.stage_starts
    for u in units:
        if not u.params:
            continue
        if u.name == "stem":
            return None
        if u.name == "head_modules":
            return len(features.blocks)
        s = int(u.name[5:])
        for i in range(starts[s], len(features.blocks)):
            if any(p.requires_grad for p in features.blocks[i].parameters()):
                return i
    return len(features.blocks)


def make_policy(
    features: FeatureModel,
    strategy: str,
    train_stages: int = 2,
    stages: tuple[int, ...] = (),
    params: tuple[str, ...] = (),
    unfreeze_every: int = 1,
) -> Policy:
    """Mark the strategy's parameters trainable (``requires_grad``) and describe them.

    Raises:
        EdgeTLError: unknown strategy, a stage out of range, or a selection that matches
            nothing.
    """
    if strategy not in STRATEGIES:
        raise EdgeTLError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    units = units_of(features)
    n_stages = len(features.stage_starts)
    names = {id(p): k for k, p in features.named_parameters()}
    for p in features.parameters():
        p.requires_grad_(False)

    def take(u: Unit, keep=lambda m, name: True) -> None:
        for m in u.modules:
            for sub in m.modules():
                for name, p in sub.named_parameters(recurse=False):
                    if keep(sub, name) and not p.requires_grad:
                        p.requires_grad_(True)
                        u.params.append((names[id(p)], p))

    train_modes: list[nn.Module] = []
    if strategy in ("finetune", "gradual"):
        if not 1 <= train_stages <= n_stages:
            raise EdgeTLError(
                f"--train-stages {train_stages} is outside 1..{n_stages}, the stages of "
                f"{features.spec.name}"
            )
        chosen = units[1 + n_stages - train_stages :]
        for k, u in enumerate(reversed(chosen)):  # head modules, last stage, ...
            take(u)
            train_modes += u.modules
            if strategy == "gradual":
                u.unfreeze_epoch = 1 + k * unfreeze_every
    elif strategy in ("full", "from-scratch"):
        for u in units:
            take(u)
        train_modes = [features]
    elif strategy == "bn-only":
        for u in units:
            take(u, lambda m, name: isinstance(m, _NORMS))
        if not any(u.params for u in units):
            raise EdgeTLError(
                f"{features.spec.name} has no normalisation layers; use bias-only or finetune"
            )
        train_modes = [m for m in features.modules() if isinstance(m, _NORMS)]
    elif strategy == "bias-only":
        for u in units:
            take(u, lambda m, name: name == "bias")
    elif strategy == "selective":
        if not stages and not params:
            raise EdgeTLError(
                "selective needs --stages (e.g. 5,6) and/or --params (e.g. 'net.layer4.*')"
            )
        for s in stages:
            if not -n_stages <= s < n_stages:
                raise EdgeTLError(
                    f"--stages {s} is outside 0..{n_stages - 1}, the stages of {features.spec.name}"
                )
            s %= n_stages
            take(units[1 + s])
            train_modes += units[1 + s].modules
            if s == n_stages - 1:  # the head modules belong to the last stage
                take(units[-1])
                train_modes += units[-1].modules
        if params:
            before = sum(len(u.params) for u in units)
            for u in units:
                take(u, lambda m, name, u=u: _matches(names, m, name, params))
            if sum(len(u.params) for u in units) == before and not stages:
                example = ", ".join(list(dict(features.named_parameters()))[-3:])
                raise EdgeTLError(
                    f"--params {','.join(params)} matched no parameter of "
                    f"{features.spec.name}; names look like: {example}"
                )
            for u in units:
                if u.params:
                    train_modes += [m for m in u.modules if _has_trainable(m)]
    policy = Policy(strategy, None, units, train_modes, pretrained=strategy != "from-scratch")
    policy.boundary = _first_block(features, units)
    return policy


def _matches(names: dict[int, str], module: nn.Module, name: str, patterns) -> bool:
    p = getattr(module, name)
    full = names.get(id(p), "")
    return any(fnmatch.fnmatchcase(full, pat) for pat in patterns)


def _has_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def set_train_modes(features: FeatureModel, policy: Policy, epoch: int, freeze_bn: bool) -> None:
    """Frozen layers in eval mode (their statistics must not move); trainable ones in
    training mode from their unfreeze epoch on. ``freeze_bn`` keeps every norm in eval."""
    features.eval()
    active = {id(m) for u in policy.units if u.unfreeze_epoch <= epoch for m in u.modules}
    for m in policy.train_modes:
        if policy.strategy != "gradual" or id(m) in active:
            m.train()
    if freeze_bn:
        for m in features.modules():
            if isinstance(m, _NORMS):
                m.eval()
