"""A text encoder on the workstation: a Hugging Face BERT-family model and its pooling in torch.

The one PyTorch reference for text: training embeds with it, and the export checks the ONNX /
OpenVINO artifacts against it. Pooling is sentence-transformers' (Reimers & Gurevych 2019):
the mean of the last hidden states under the attention mask, then L2 normalisation; the
device repeats it in numpy (:func:`edge_tl.runtime.text.pool`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_tl.errors import EdgeTLError, require
from edge_tl.runtime.text import check_texts
from edge_tl.spec import TextPreprocess

__all__ = ["load_encoder", "pool_torch", "tokenize", "embed_texts"]


def load_encoder(folder: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face folder (``AutoModel``, fast tokenizer),
    offline (``local_files_only``), weights from safetensors, the model in eval mode.

    Raises:
        EdgeTLError: ``transformers`` missing, or the folder does not hold a model.
    """
    transformers = require("transformers", "nlp")
    folder = Path(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeTLError(f"cannot load a text model from {folder}: {first}") from None
    return model.eval(), tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], pre: TextPreprocess) -> dict[str, torch.Tensor]:
    """``transformers``' tokenization of ``texts`` as the bundle does it: truncated at
    ``pre.max_length`` tokens, padded to the longest text, int64 tensors named as
    ``pre.inputs``."""
    enc = tokenizer(
        check_texts(texts),
        truncation=True,
        max_length=pre.max_length,
        padding=True,
        return_tensors="pt",
    )
    return {k: enc[k] for k in pre.inputs if k in enc}


def pool_torch(hidden: torch.Tensor, mask: torch.Tensor, pre: TextPreprocess) -> torch.Tensor:
    """``[N, T, D]`` token vectors -> ``[N, D]`` embeddings, pooled as ``pre`` says."""
    if pre.pooling == "cls":
        emb = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=1) if pre.normalize else emb


def embed_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    pre: TextPreprocess,
    batch_size: int = 64,
) -> np.ndarray:
    """``float32[N, D]`` FP32 PyTorch embeddings of ``texts`` (no gradients).

    Texts are sorted by length into batches (less padding), and returned in input order.

    Raises:
        EdgeTLError: an empty text.
    """
    texts = check_texts(texts)
    if not texts:
        return np.zeros((0, model.config.hidden_size), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = tokenize(tokenizer, [texts[j] for j in idx], pre)
            hidden = model(**enc).last_hidden_state
            out[idx] = pool_torch(hidden, enc["attention_mask"], pre).float().numpy()
    return out
