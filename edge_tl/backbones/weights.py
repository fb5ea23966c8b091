"""Weights files: read one (``.safetensors``, or a torch state dict loaded weights-only),
load it strictly, and the SHA-256 that runs and bundles record.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge_tl.backbones.registry import MULTI, get_spec
from edge_tl.bundle import sha256
from edge_tl.errors import EdgeTLError

__all__ = ["load_strict", "read_state_dict", "weights_sha256"]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors``, or a torch state dict loaded weights-only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/safetensors errors of many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgeTLError(
            f"weights file {path} cannot be read ({first}); pass a state dict saved with "
            "torch.save(model.state_dict()) or safetensors"
        ) from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EdgeTLError(f"weights file {path} holds no state dict of tensors; check --weights")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Load ``state`` into ``net``; any missing, unexpected or mis-shaped key is an error."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label} {', '.join(keys[:4])}{more}")
        raise EdgeTLError(f"{what} does not fit: {'; '.join(parts)}; {fix}")
    net.load_state_dict(state, strict=True)


def weights_sha256(name: str, weights: str | Path | None = None) -> str:
    """SHA-256 of the pretrained weights file, recorded in run folders and bundles (of a
    multi-source backbone: each source's, joined by ``+``)."""
    spec = get_spec(name)
    if spec.sources and weights is None:
        return MULTI.join(sha256(get_spec(s).weights_path()) for s in spec.sources)
    return sha256(spec.weights_path(weights))
