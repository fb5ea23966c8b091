"""How the device turns an input into the encoder's input, as data: :class:`Preprocess`
(an image) and :class:`TextPreprocess` (a text), the ``preprocess`` table of a manifest or run.

Torch-free, a floor module; re-exported by :mod:`edge_tl.spec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge_tl.errors import EdgeTLError
from edge_tl.spec_fields import FIX, _from_dict, _one_of, _short

__all__ = ["Preprocess", "TextPreprocess", "read_preprocess"]

MAX_INPUT_SIZE = 4096
"""The largest input side a bundle may ask for, in pixels."""
PREPROCESS_CHOICES = {
    "resize": ("squash",),
    "interpolation": ("bilinear", "bicubic"),
    "colour": ("RGB",),
    "layout": ("NCHW",),
}


@dataclass(frozen=True)
class Preprocess:
    """How the device turns an image file into the input tensor, as data.

    ``resize="squash"`` resizes the whole image to ``size x size`` (no crop: a defect at
    the border stays in view). Pixels (0..255, RGB) are normalised as ``(p - mean) / std``.
    ``draft``: a JPEG at least twice ``size`` on both sides is first decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (:func:`edge_tl.images.read_image` ``reduce_to``), faster
    but other pixels than a full decode; off unless the run chose it (older manifests have
    no such field and decode at full size).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bilinear"
    colour: str = "RGB"
    layout: str = "NCHW"
    draft: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_INPUT_SIZE:
            raise EdgeTLError(
                f"preprocess: size = {_short(self.size)} is not between 1 and {MAX_INPUT_SIZE}"
            )
        if not all(self.std):
            raise EdgeTLError(f"preprocess: std = {_short(self.std)} divides by zero")
        for name, allowed in PREPROCESS_CHOICES.items():
            _one_of("preprocess", name, getattr(self, name), allowed)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "preprocess", fix: str = FIX) -> Preprocess:
        p = _from_dict(cls, d, where, fix)
        return dataclasses.replace(p, mean=tuple(p.mean), std=tuple(p.std))


TEXT_POOLING = ("mean", "cls")
MAX_TEXT_LENGTH = 4096
"""The longest token sequence a text bundle may ask for."""


@dataclass(frozen=True)
class TextPreprocess:
    """How the device turns a text into the encoder's inputs and its output into an
    embedding, as data (a text bundle's ``preprocess``; ``modality`` tells it from an image
    bundle's :class:`Preprocess`).

    ``tokenizer`` is the bundle's Hugging Face ``tokenizer.json`` (read by the Rust
    ``tokenizers`` library on the device, so no torch and no ``transformers``): texts are
    truncated to ``max_length`` tokens, special tokens included, and a batch is padded to
    its longest text. The encoder takes ``inputs`` (int64 ``[batch, tokens]``) and gives
    ``hidden_output`` (float32 ``[batch, tokens, dim]``), pooled by ``pooling`` (``mean``
    over the attention mask, as sentence-transformers does; ``cls``: the first token) and
    L2-normalised when ``normalize``.
    """

    tokenizer: str
    max_length: int
    modality: str = "text"
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    hidden_output: str = "last_hidden_state"
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        _one_of("preprocess", "modality", self.modality, ("text",))
        _one_of("preprocess", "pooling", self.pooling, TEXT_POOLING)
        if not 2 <= self.max_length <= MAX_TEXT_LENGTH:
            raise EdgeTLError(
                f"preprocess: max_length = {_short(self.max_length)} is not between 2 and "
                f"{MAX_TEXT_LENGTH}"
            )
        if "input_ids" not in self.inputs or "attention_mask" not in self.inputs:
            raise EdgeTLError(
                f"preprocess: inputs = {_short(self.inputs)} must name input_ids and attention_mask"
            )

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], where: str = "preprocess", fix: str = FIX
    ) -> TextPreprocess:
        p = _from_dict(cls, d, where, fix)
        return dataclasses.replace(p, inputs=tuple(p.inputs))


def read_preprocess(d: Any, where: str, fix: str = FIX) -> Preprocess | TextPreprocess:
    """The ``preprocess`` table of a manifest or run: text when it says ``modality = "text"``,
    else an image's."""
    if isinstance(d, dict) and d.get("modality") == "text":
        return TextPreprocess.from_dict(d, where, fix)
    return Preprocess.from_dict(d, where, fix)
