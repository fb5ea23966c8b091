"""Text on the device: tokenization by the bundle's ``tokenizer.json`` and pooling in numpy.

Torch-free and ``transformers``-free: the Rust ``tokenizers`` library reads the same
``tokenizer.json`` the workstation's ``transformers`` fast tokenizer was built from, so the
token ids are the ones the encoder was trained and exported with (a test compares them on
real texts). The encoder's ``[batch, tokens, dim]`` output is pooled here, as
sentence-transformers pools it (Reimers & Gurevych 2019: the mean of the token vectors under
the attention mask, then L2 normalisation for models trained with cosine losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.errors import EdgeTLError, require
from edge_tl.spec import TextPreprocess

__all__ = ["TextEncoder", "check_texts", "pool"]


def check_texts(texts: Sequence[Any], where: str = "text") -> list[str]:
    """``texts`` as a list of strings, refusing what cannot be a text input.

    Raises:
        EdgeTLError: an item that is not a string, or is empty after stripping white space
            (an empty text has no tokens but the special ones; its embedding would be the
            same for every such text), naming its position.
    """
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EdgeTLError(
                f"{where} {i + 1} is {type(t).__name__}, not a string; pass texts as strings"
            )
        if not t.strip():
            raise EdgeTLError(
                f"{where} {i + 1} is empty (nothing but white space); give it some words or "
                "leave it out"
            )
        out.append(t)
    return out


def pool(hidden: np.ndarray, mask: np.ndarray, pre: TextPreprocess) -> np.ndarray:
    """Pool the encoder's token vectors into one embedding per text.

    Args:
        hidden: ``float32[N, T, D]`` the encoder's ``hidden_output``.
        mask: ``int64[N, T]`` the attention mask (1 for a token, 0 for padding).
        pre: the bundle's text preprocessing (``pooling``, ``normalize``).

    Returns:
        ``float32[N, D]``; unit length when ``pre.normalize``.
    """
    hidden = np.asarray(hidden, np.float32)
    if pre.pooling == "cls":
        emb = hidden[:, 0]
    else:
        m = mask[..., None].astype(np.float32)
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if pre.normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


class TextEncoder:
    """Texts -> the encoder's named inputs, by the bundle's tokenizer.

    Args:
        bundle: the bundle folder.
        pre: its :class:`~edge_tl.spec.TextPreprocess`.

    Raises:
        EdgeTLError: ``tokenizers`` is not installed (``pip install 'edge_tl[text-device]'``)
            or the tokenizer file does not load.
    """

    def __init__(self, bundle: str | Path, pre: TextPreprocess) -> None:
        tokenizers = require("tokenizers", "text-device")
        path = Path(bundle) / pre.tokenizer
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise EdgeTLError(f"cannot read the tokenizer {path}: {e}") from None
        tok.enable_truncation(pre.max_length)
        padding = tok.padding or {}
        tok.enable_padding(
            pad_id=padding.get("pad_id", 0),
            pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
        )  # to the longest text of each batch: no fixed length
        self.tokenizer = tok
        self.pre = pre

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Named int64 ``[N, T]`` inputs (``T``: the longest text's tokens, at most
        ``max_length``) for ``texts``.

        Raises:
            EdgeTLError: an empty text or a non-string (:func:`check_texts`).
        """
        encs = self.tokenizer.encode_batch(check_texts(texts))
        arrays = {
            "input_ids": np.asarray([e.ids for e in encs], np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encs], np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encs], np.int64),
        }
        return {name: arrays[name] for name in self.pre.inputs}

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, unpadded (special tokens included)."""
        encs = self.tokenizer.encode_batch(check_texts(texts))
        return [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m] for e in encs]
