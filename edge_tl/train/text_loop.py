"""Fine-tuning a BERT-family encoder with a linear head: ``finetune`` and ``full`` on text.

The model is the one the device runs: encoder -> mean pooling under the attention mask -> L2
normalisation (sentence-transformers' pooling, :func:`edge_tl.train.text_encoder.pool_torch`)
-> a linear head. Since the embedding has unit length, the head's logits are
``s * (z @ W.T) + b`` with a learned scale ``s`` (a cosine-style classifier, as NormFace,
Wang et al. 2017); ``s * W`` is what ships, so the device's head stays a plain
:class:`~edge_tl.runtime.heads.LinearHead`.

``finetune`` trains the last ``train_layers`` transformer layers (the rest stay in eval mode:
no dropout, the same features every epoch); ``full`` trains every layer and the word
embeddings. AdamW with layer-wise learning-rate decay (``lr_backbone`` for the last layer,
``layer_decay`` per layer towards the input; no weight decay on norms and biases), the head
at ``lr_head``, linear warm-up then cosine decay, label smoothing, batches bucketed by length
(less padding), early stopping on validation accuracy, an atomic checkpoint after every
epoch (only the trained tensors: the frozen ones are the pretrained weights). ``finetune``
runs the frozen layers once per text and caches their output (:class:`Embedder`), as the
image path caches activations at its freeze boundary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl.data import Dataset
from edge_tl.errors import EdgeTLError
from edge_tl.progress import progress
from edge_tl.runtime.evaluation import macro_f1
from edge_tl.runtime.heads import LinearHead
from edge_tl.spec import TextPreprocess
from edge_tl.train.epochs import Epochs
from edge_tl.train.runs import save_checkpoint
from edge_tl.train.text_config import TextTrainConfig
from edge_tl.train.text_encoder import pool_torch, tokenize

__all__ = ["Embedder", "TextClassifier", "fit_text", "length_batches", "token_lengths"]

_logger = logging.getLogger(__name__)

INITIAL_SCALE = 16.0
"""Starting logit scale on unit-length embeddings (NormFace's range is 16-30)."""
_BUCKET = 50
"""Batches per bucket: texts are shuffled, then sorted by length within a bucket."""


class TextClassifier(nn.Module):
    """Encoder + mean pooling + L2 normalisation + dropout + scaled linear head.

    ``forward(**inputs)`` takes the tokenizer's int64 ``[N, T]`` tensors and returns
    float32 logits ``[N, K]``.
    """

    def __init__(self, encoder: nn.Module, pre: TextPreprocess, n_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pre = pre
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(INITIAL_SCALE)))

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, D]`` pooled, normalised embeddings of tokenized texts (every layer runs)."""
        hidden = self.encoder(**inputs).last_hidden_state
        return pool_torch(hidden, inputs["attention_mask"], self.pre)

    def embed_from(self, hidden: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """``[N, D]`` embeddings from ``hidden[N, T, D]``, the input of layer ``start``
        (padded positions are masked out as keys and left out of the pooling)."""
        ext = self.encoder.get_extended_attention_mask(mask, mask.shape)
        for layer in layers_of(self.encoder)[start:]:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        return pool_torch(hidden, mask, self.pre)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of embeddings ``z[N, D]``: ``s * (dropout(z) @ W.T) + b``."""
        return self.log_scale.exp() * (self.dropout(z) @ self.head.weight.T) + self.head.bias

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(inputs))

    def linear_head(self) -> LinearHead:
        """The head as the device runs it: ``s * W`` and ``b`` on the embedding."""
        s = float(self.log_scale.detach().exp())
        w = self.head.weight.detach().float().cpu().numpy() * s
        return LinearHead.from_logits_layer(w, self.head.bias.detach().float().cpu().numpy())


def layers_of(encoder: nn.Module) -> list[nn.Module]:
    """The transformer layers of a BERT-family encoder, input side first."""
    return list(encoder.encoder.layer)


def _param_groups(model: TextClassifier, config: TextTrainConfig) -> list[dict[str, Any]]:
    """Freeze what the strategy keeps, and give the rest layer-wise decayed rates."""
    layers = layers_of(model.encoder)
    n = len(layers)
    model.encoder.requires_grad_(False)
    if config.strategy == "full":
        units = [(model.encoder, n)]  # embeddings, pooler, ...: a layer below the first
        units += [(layer, n - 1 - i) for i, layer in enumerate(layers)]
    else:
        units = [(layers[i], n - 1 - i) for i in range(n - config.train_layers, n)]
    for unit, _ in units:
        unit.requires_grad_(True)
    pooler = getattr(model.encoder, "pooler", None)
    if pooler is not None:  # BERT's [CLS] pooler: unused by mean pooling, never trained
        pooler.requires_grad_(False)
    groups = []
    seen: set[int] = set()
    for unit, depth in reversed(units):  # layers first, so the whole encoder takes the rest
        params = [p for p in unit.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        lr = config.lr_backbone * config.layer_decay**depth
        for decay in (True, False):
            ps = [p for p in params if (p.ndim > 1) == decay]
            if ps:
                wd = config.weight_decay if decay else 0.0
                groups.append({"params": ps, "lr": lr, "weight_decay": wd})
    groups.append(
        {"params": [model.head.weight], "lr": config.lr_head, "weight_decay": config.weight_decay}
    )
    groups.append(
        {"params": [model.head.bias, model.log_scale], "lr": config.lr_head, "weight_decay": 0.0}
    )
    return groups


def _set_modes(model: TextClassifier, config: TextTrainConfig) -> None:
    """Dropout only where weights learn: frozen layers give the same features every epoch."""
    model.train()
    if config.strategy != "full":
        model.encoder.eval()
        for layer in layers_of(model.encoder)[-config.train_layers :]:
            layer.train()


def length_batches(
    lengths: np.ndarray, batch_size: int, gen: torch.Generator | None
) -> list[np.ndarray]:
    """Index batches of texts of similar length (token counts ``lengths[N]``).

    With ``gen``: shuffled, sorted by length within buckets of ``_BUCKET`` batches, and the
    batches shuffled (each epoch sees other neighbours, padding stays short). Without: sorted
    by length (evaluation).
    """
    n = len(lengths)
    if gen is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    order = torch.randperm(n, generator=gen).numpy()
    span = batch_size * _BUCKET
    batches = []
    for i in range(0, n, span):
        chunk = order[i : i + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).numpy()
    return [batches[i] for i in perm]


def token_lengths(tokenizer: Any, texts: Sequence[str], pre: TextPreprocess) -> np.ndarray:
    """``int64[N]`` tokens per text, special tokens included, truncated at ``max_length``."""
    enc = tokenizer(list(texts), truncation=True, max_length=pre.max_length)
    return np.asarray([len(ids) for ids in enc["input_ids"]], np.int64)


class Embedder:
    """A batch's embeddings, through the layers that train.

    ``full``: texts tokenized per batch, every layer runs. ``finetune``: the frozen layers
    run once per text (in eval mode: no dropout, so their output never changes); their
    output, the input of the first trained layer, is cached unpadded (``float32[T_i, D]``
    per text, ~20 KB for a 13-token question) and each batch runs only the trained layers.
    Padding positions are masked as attention keys and left out of the pooling, so the
    cached path gives the full forward's embeddings (checked in tests/test_text_train.py).
    """

    def __init__(
        self,
        model: TextClassifier,
        tokenizer: Any,
        sets: dict[str, Dataset],
        lengths: dict[str, np.ndarray],
        config: TextTrainConfig,
        device: torch.device,
    ) -> None:
        self.model, self.tokenizer, self.sets, self.device = model, tokenizer, sets, device
        n = len(layers_of(model.encoder))
        self.start = None if config.strategy == "full" else n - config.train_layers
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.cache_seconds = 0.0
        if self.start is not None:
            t0 = time.perf_counter()
            for k, d in sets.items():
                self.cache[k] = self._hidden(d.paths, lengths[k], f"caching {k} texts")
            self.cache_seconds = round(time.perf_counter() - t0, 1)

    @torch.no_grad()
    def _hidden(self, texts: list[str], lengths: np.ndarray, desc: str) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        self.model.encoder.eval()
        batches = length_batches(lengths, 64, None)
        for idx in progress(batches, total=len(batches), desc=desc):
            enc = _inputs(self.tokenizer, texts, idx, self.model.pre, self.device)
            states = self.model.encoder(**enc, output_hidden_states=True).hidden_states
            h = states[self.start].float().cpu()
            for row, i in enumerate(idx):
                out[i] = h[row, : lengths[i]].clone()
        return out

    def __call__(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """``[len(idx), D]`` embeddings of texts ``idx`` of ``split``."""
        if self.start is None:
            texts = self.sets[split].paths
            return self.model.embed(
                _inputs(self.tokenizer, texts, idx, self.model.pre, self.device)
            )
        rows = [self.cache[split][i] for i in idx]
        hidden = nn.utils.rnn.pad_sequence(rows, batch_first=True).to(self.device)
        mask = torch.zeros(hidden.shape[:2], dtype=torch.int64)
        for r, t in enumerate(rows):
            mask[r, : len(t)] = 1
        return self.model.embed_from(hidden, mask.to(self.device), self.start)


def _inputs(tokenizer, texts, idx, pre, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tokenize(tokenizer, [texts[i] for i in idx], pre).items()}


@torch.no_grad()
def _evaluate(
    model: TextClassifier, embed: Embedder, split: str, lengths: np.ndarray, config
) -> tuple[float, float, np.ndarray]:
    """``(loss, accuracy, predictions)`` on ``split`` (NaN and empty when it is empty)."""
    ds = embed.sets[split]
    if len(ds) == 0:
        return float("nan"), float("nan"), np.zeros(0, np.int64)
    model.eval()
    logits = torch.zeros(len(ds), model.head.out_features)
    for idx in length_batches(lengths, max(config.batch_size, 64), None):
        logits[idx] = model.classify(embed(split, idx)).float().cpu()
    y = torch.from_numpy(ds.labels)
    pred = logits.argmax(1).numpy()
    return float(nn.functional.cross_entropy(logits, y)), float((pred == ds.labels).mean()), pred


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that learn (the frozen ones are the pretrained weights)."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def fit_text(
    model: TextClassifier,
    tokenizer: Any,
    sets: dict[str, Dataset],
    config: TextTrainConfig,
    device: torch.device,
    ckpt_file: Path,
    state: dict[str, Any] | None,
    fingerprint: str,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[LinearHead, list[dict[str, Any]], dict[str, Any]]:
    """Train ``model`` on ``sets["train"]``, keep the best ``sets["val"]`` epoch, test on
    ``sets["test"]``: ``(head, history, metrics)``, the kept weights loaded into ``model``.

    ``state`` (a checkpoint of this run) resumes after its last epoch; each epoch ends with
    an atomic checkpoint at ``ckpt_file``.
    """
    pre = model.pre
    groups = _param_groups(model, config)
    model.to(device)
    opt = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    lengths = {k: token_lengths(tokenizer, d.paths, pre) for k, d in sets.items()}
    embed = Embedder(model, tokenizer, sets, lengths, config, device)
    train = sets["train"]
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(length_batches(lengths["train"], config.batch_size, None))
    if state is not None:
        differ = set(_trained_state(model)) ^ set(state["model"])
        if differ:
            raise EdgeTLError(
                f"{ckpt_file} holds other trained tensors than this run trains (e.g. "
                f"{sorted(differ)[0]}); start over with --force"
            )
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
    e = Epochs.start(steps_per_epoch, config.epochs, state, gen)
    has_val = len(sets["val"]) > 0
    for epoch in range(e.first, config.epochs + 1):
        t0 = time.perf_counter()
        _set_modes(model, config)
        batches = length_batches(lengths["train"], config.batch_size, gen)
        total_loss, correct, seen = 0.0, 0, 0
        desc = f"epoch {epoch}/{config.epochs}"
        for idx in progress(batches, total=len(batches), desc=desc):
            e.set_lr(opt, base_lrs)
            yb = torch.from_numpy(train.labels[idx]).to(device)
            logits = model.classify(embed("train", idx))
            loss = loss_fn(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            e.step += 1
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, _ = _evaluate(model, embed, "val", lengths["val"], config)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(train_seconds, 2),
            "val_seconds": round(time.perf_counter() - t0 - train_seconds, 2),
        }
        e.end(row, lambda: _trained_state(model), has_val, config.patience, config.epochs)
        save_checkpoint(
            ckpt_file,
            e.checkpoint(config, fingerprint, epoch, _trained_state(model), opt, gen),
        )
        e.log(row, config.epochs)
        if on_epoch_end is not None:
            on_epoch_end(row)
        if e.stopping(config.patience):
            break
    model.load_state_dict(e.best, strict=False)
    _, test_acc, test_pred = _evaluate(model, embed, "test", lengths["test"], config)
    model.cpu().eval()
    history = e.history
    n_classes = model.head.out_features
    metrics = {
        "strategy": config.strategy,
        "test_accuracy": test_acc,
        "test_macro_f1": macro_f1(test_pred, sets["test"].labels, n_classes),
        **e.summary(has_val),
        "boundary": "text"
        if embed.start is None
        else f"layer {embed.start} input (cached): {config.train_layers} of "
        f"{len(layers_of(model.encoder))} layers train",
        "cache_seconds": embed.cache_seconds,
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in history])), 2),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "head_scale": round(float(model.log_scale.detach().exp()), 4),
        "mean_tokens": round(float(lengths["train"].mean()), 1),
        "device": str(device),
        "precision": "fp32",
    }
    return model.linear_head(), history, metrics
