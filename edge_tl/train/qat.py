"""Quantization-aware fine-tuning: train through the rounding the INT8 artifact will do.

Simulates the ONNX Runtime / OpenVINO INT8 scheme with PyTorch's own fake-quantize ops
(straight-through gradients), no extra dependency:

* weights of every convolution and linear layer: symmetric per-output-channel INT8, the
  scale from the channel's current max |w| (batch norm folded into the convolution at export
  scales each channel, which per-channel symmetric scales absorb exactly);
* activations: asymmetric per-tensor UINT8 at each activation function's output and at
  each batch-norm output that no activation follows (linear bottlenecks, residual
  branches), with running min/max ranges as MinMax calibration would measure them.

The weights learn to sit where rounding hurts least; the export still calibrates the real
artifact on real images with its recipe, and the fidelity report measures the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["QAT", "enable_qat"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Hardtanh)
NORMS = (nn.BatchNorm2d,)
MOMENTUM = 0.01


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric INT8 fake quantization of a weight tensor."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        scale = (w.detach().abs().amax(dim=dims) / 127.0).clamp_min(1e-12).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


@dataclass
class ActFakeQuant:
    """Per-tensor UINT8 fake quantization with a running (EMA) min/max observer."""

    lo: float | None = None
    hi: float | None = None

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        if module.training or self.lo is None:
            x = out.detach()
            lo, hi = float(x.min()), float(x.max())
            if self.lo is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo += MOMENTUM * (lo - self.lo)
                self.hi += MOMENTUM * (hi - self.hi)
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # zero must be representable
        scale = max(hi - lo, 1e-8) / 255.0
        zero = int(round(-lo / scale))
        return torch.fake_quantize_per_tensor_affine(out, scale, zero, 0, 255)


@dataclass
class QAT:
    """Fake quantization attached to a model; :meth:`remove` leaves plain float weights."""

    model: nn.Module
    weights: list[nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for m in self.weights:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        for h in self.hooks:
            h.remove()
        self.weights, self.hooks = [], []


def enable_qat(model: nn.Module, example: torch.Tensor) -> QAT:
    """Attach INT8 fake quantization to ``model`` (run once on ``example`` to see which
    batch-norm outputs feed an activation and so are not quantized themselves).

    Parameters keep their identity (an optimiser built before or after sees the same
    tensors); state-dict keys of the weights gain ``parametrizations.weight.original``
    until :meth:`QAT.remove`.
    """
    order: list[nn.Module] = []
    probes = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if isinstance(m, ACTIVATIONS + NORMS)
    ]
    was_training = model.training
    with torch.no_grad():
        model.eval()(example)
    model.train(was_training)
    for h in probes:
        h.remove()
    feeds_activation = {
        id(a) for a, b in zip(order, order[1:], strict=False) if isinstance(b, ACTIVATIONS)
    }
    qat = QAT(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and not parametrize.is_parametrized(m):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
            qat.weights.append(m)
        if isinstance(m, ACTIVATIONS) or (isinstance(m, NORMS) and id(m) not in feeds_activation):
            qat.hooks.append(m.register_forward_hook(ActFakeQuant()))
    return qat
