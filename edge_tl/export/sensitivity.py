"""Which convolutions INT8 hurts most: the ranking accuracy control keeps in FP32 first.

Two rankings of an ORT QDQ model's convolutions:

- :func:`ort_sensitivity` (what the ladder uses): the model is quantized *once* (with the
  cached calibration); then, per convolution, the FP32 graph is run with that one
  convolution replaced by its INT8 version taken from the quantized model (input quantized
  with its calibrated scale, INT8 weights and bias, output re-quantized: ONNX Runtime runs
  it with the same integer kernel and engine options as the artifact). Its score is the
  embedding cosine lost on the sensitivity images (``loss``). Costs one session and one
  pass per convolution, no re-quantization: the layer-wise analysis of quantization
  toolkits ("quantize one layer at a time", e.g. TensorRT's and AIMET's per-layer
  sensitivity), the dual of the reference below.
- :func:`ort_sensitivity_full` (the reference it was validated against,
  ``benchmarks/export_speed.py``): per convolution, the embedding cosine gained when it
  alone stays in FP32; one ORT quantization and one INT8 pass per convolution (146 s for
  EfficientNet-Lite0's 49 convolutions on a 2-core AVX2 CPU).

Example:
    >>> ranking = ort_sensitivity(control, recipe)  # doctest: +SKIP
    >>> [r["name"] for r in ranking[:4]]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from edge_tl.export.fidelity import cosine
from edge_tl.export.quantize import conv_nodes, ort_preprocessed, quantize_ort
from edge_tl.progress import progress, step
from edge_tl.runtime.engine import OrtEngine
from edge_tl.spec import EMBEDDING, Recipe

__all__ = ["ort_sensitivity", "ort_sensitivity_full"]

_logger = logging.getLogger(__name__)

_BATCH = 16
_RENAMED_OUTPUT = "_QuantizeLinear_Input"


def ort_sensitivity(c: Any, base: Recipe) -> list[dict[str, Any]]:
    """Convolutions of ``c.fp32_onnx`` (an :class:`AccuracyControl`), most sensitive first,
    each with its ``loss``: the embedding cosine lost on the sensitivity images when it
    alone runs in INT8 (as ``base`` quantizes it, quantized once with the cached
    calibration) and every other layer in FP32. Convolutions ``base`` keeps in FP32 score 0.
    """
    assert c.calib is not None  # INT8 ladders only
    import onnx

    x, ref = c.sensitivity_set()
    t0 = time.perf_counter()
    trial = c.work / "sensitivity.onnx"
    with step("quantizing for the sensitivity pass"):
        quantize_ort(c.fp32_onnx, trial, c.calib, base, c.work)
    pre = ort_preprocessed(c.fp32_onnx, c.work)
    fp32, qdq = onnx.load(str(pre)), onnx.load(str(trial))
    copies = {
        k: v for k, v in _quantized_copies(fp32, qdq).items() if k not in base.nodes_to_exclude
    }
    probe = c.work / "sensitivity_probe.onnx"
    loss: dict[str, float] = {}
    for name, (nodes, inits, y, y_q) in progress(
        list(copies.items()), desc="sensitivity per convolution"
    ):
        variant = onnx.ModelProto()
        variant.CopyFrom(fp32)
        g = variant.graph
        for n in g.node:  # the FP32 consumers of the conv's output read the INT8 copy's
            for i, t in enumerate(n.input):
                if t == y:
                    n.input[i] = y_q
        g.node.extend(nodes)
        g.initializer.extend(inits)
        onnx.save(variant, str(probe))
        engine = OrtEngine(probe, base.engine_options)
        got = np.concatenate(
            [
                engine.run(x[i : i + _BATCH], (EMBEDDING,))[EMBEDDING]
                for i in range(0, len(x), _BATCH)
            ]
        )
        loss[name] = 1.0 - float(cosine(got, ref).mean())
    ranked = conv_nodes(pre)
    for node in ranked:
        node["loss"] = round(loss.get(str(node["name"]), 0.0), 6)
    _logger.info(
        f"  sensitivity pass: {len(copies)} convolutions, one INT8 at a time, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return sorted(ranked, key=lambda r: -r["loss"])


def _quantized_copies(fp32: Any, qdq: Any) -> dict[str, tuple[list[Any], list[Any], str, str]]:
    """Per convolution that ``qdq`` quantized (by node name): the nodes and initializers of
    its INT8 version on the FP32 graph's tensors (input quantized with its calibrated scale,
    INT8 weights and bias, output re-quantized: ONNX Runtime fuses them into its integer
    kernel), its FP32 output tensor and the copy's."""
    from onnx import helper

    g, q = fp32.graph, qdq.graph
    producer = {o: n for n in q.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in q.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    q_inits = {i.name: i for i in q.initializer}
    have = {i.name for i in g.initializer} | {t for n in g.node for t in n.output}
    have |= {i.name for i in g.input}
    out: dict[str, tuple[list[Any], list[Any], str, str]] = {}
    for conv in [n for n in q.node if n.op_type == "Conv"]:
        x_dq = producer.get(conv.input[0])
        x_q = producer.get(x_dq.input[0]) if x_dq is not None else None
        y = conv.output[0]
        x_fp32 = x_q.input[0] if x_q is not None else ""
        if x_fp32.endswith(_RENAMED_OUTPUT):  # ORT renames a graph output it quantizes
            x_fp32 = x_fp32[: -len(_RENAMED_OUTPUT)]
        if (
            x_dq is None
            or x_dq.op_type != "DequantizeLinear"
            or x_q is None
            or x_q.op_type != "QuantizeLinear"
            or x_fp32 not in have
            or y not in have
        ):
            continue  # kept in FP32, or a pattern this ranking does not know
        sfx = "__int8"
        copy = [x_q, x_dq]
        w_dq = producer.get(conv.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue  # FP32 weights: the conv is not quantized
        copy += [
            p
            for w in conv.input[1:]
            if (p := producer.get(w)) is not None and p.op_type == "DequantizeLinear"
        ]
        copy.append(conv)
        y_q = [n for n in consumers.get(y, []) if n.op_type == "QuantizeLinear"]
        if y_q:
            y_dq = [
                n for n in consumers.get(y_q[0].output[0], []) if n.op_type == "DequantizeLinear"
            ]
            if y_dq:
                copy += [y_q[0], y_dq[0]]
        ren = {t: t + sfx for n in copy for t in n.output}
        nodes, inits = [], []
        for n in copy:
            inputs = []
            for t in n.input:
                if n is x_q and t == x_q.input[0]:
                    inputs.append(x_fp32)  # the FP32 graph's own tensor
                    continue
                if t in q_inits and t not in have:
                    init = q_inits[t].__class__()
                    init.CopyFrom(q_inits[t])
                    init.name = t + sfx
                    inits.append(init)
                    ren[t] = t + sfx
                inputs.append(ren.get(t, t))
            nodes.append(
                helper.make_node(
                    n.op_type,
                    inputs,
                    [ren[t] for t in n.output],
                    name=n.name + sfx,
                    domain=n.domain,
                    **{a.name: helper.get_attribute_value(a) for a in n.attribute},
                )
            )
        out[conv.name] = (nodes, inits, y, ren[copy[-1].output[0]])
    return out


def ort_sensitivity_full(c: Any, base: Recipe) -> list[dict[str, Any]]:
    """Per convolution: the embedding cosine gained when it alone stays in FP32 (``gain``),
    most sensitive first; the reference :func:`ort_sensitivity` was validated against.

    Reuses the cached calibration, so each node costs one quantization without calibrating
    (about a second on a 2-core CPU) and one pass over a few images.
    """
    x, ref = c.sensitivity_set()
    trial = c.work / "sensitivity.onnx"
    assert c.calib is not None  # INT8 ladders only

    def cos_of(recipe: Recipe) -> float:
        quantize_ort(c.fp32_onnx, trial, c.calib, recipe, c.work)
        got = OrtEngine(trial, recipe.engine_options).run(x, (EMBEDDING,))[EMBEDDING]
        return float(cosine(got, ref).mean())

    t0 = time.perf_counter()
    base_cos = cos_of(base)
    nodes = conv_nodes(ort_preprocessed(c.fp32_onnx, c.work))
    for node in progress(nodes, desc="sensitivity per convolution"):
        if node["name"] in base.nodes_to_exclude:
            node["gain"] = 0.0
            continue
        one = dataclasses.replace(base, nodes_to_exclude=(*base.nodes_to_exclude, node["name"]))
        node["gain"] = round(cos_of(one) - base_cos, 6)
    _logger.info(
        f"  sensitivity pass: {len(nodes)} convolutions in {time.perf_counter() - t0:.0f} s"
    )
    return sorted(nodes, key=lambda r: -r["gain"])
