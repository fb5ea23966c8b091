"""Which convolutions of an ONNX Runtime QDQ INT8 graph saturate on x86-64 CPUs with AVX2 and
no VNNI, found on any host by replaying their integer arithmetic in numpy.

ONNX Runtime's u8s8 GEMM on AVX2 (MLAS ``MlasGemmU8S8KernelAvx2``) multiplies u8 activations
by s8 weights with ``VPMADDUBSW``, which adds each *adjacent pair* of products along the
reduction axis into a signed 16-bit lane with saturation, before ``VPMADDWD`` widens the pairs
to 32 bits exactly. A pair ``a[k] * w[k] + a[k+1] * w[k+1]`` (``a`` raw u8 in [0, 255], zero
point included; ``w`` s8) beyond [-32768, 32767] is clipped: the accumulator is wrong. CPUs
with VNNI (``VPDPBUSD``) or ARM dot-product kernels accumulate exactly, so an export host with
VNNI never sees it; this module computes, for each convolution MLAS runs as a GEMM (groups =
1; the depthwise kernel widens before multiplying and is exact), what that clipping does on
real inputs. Source: ONNX Runtime, "Quantize ONNX models: when to use reduce_range"
(onnxruntime.ai); Intel oneDNN developer guide, "Nuances of int8 computations".

Example:
    >>> rows = saturation_report("int8.onnx", calib[:8])  # doctest: +SKIP
    >>> [r["name"] for r in rows if r["relative_error"] > 0.01]  # doctest: +SKIP
    ['node_Conv_873', 'node_Conv_807', ...]
    >>> pair_safe("int8.onnx", "pre.onnx", None, "int8-safe.onnx")  # doctest: +SKIP

Reduction order: ONNX Runtime's QLinearConv runs channels-last, its im2col orders the
reduction axis as (kernel row, kernel column, input channel), and MLAS packs it in groups of
four; pairs are reduction indices (2j, 2j + 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["accumulators", "columns", "gemm_convolutions", "pair_safe", "saturation_report"]

_I16 = (-32768, 32767)


def gemm_convolutions(model: Any) -> list[dict[str, Any]]:
    """The QDQ graph's convolutions that MLAS runs as u8s8 GEMMs: name, the u8 activation
    tensor (the ``QuantizeLinear`` output feeding them), its scale and zero point, s8
    weights as ``int8[Cout, Cin, kh, kw]``, the convolution's strides, pads, dilations, and
    the ``DequantizeLinear`` nodes of its weights and int32 bias (or None)."""
    from onnx import numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("group") is not None and attrs["group"].i != 1:
            continue
        a_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or w_dq is None:
            continue
        if a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        w = inits.get(w_dq.input[0])
        zp = inits.get(a_dq.input[2]) if len(a_dq.input) > 2 else None
        if w is None or zp is None:
            continue
        weights = numpy_helper.to_array(w)
        zero = numpy_helper.to_array(zp)
        if weights.dtype != np.int8 or zero.dtype != np.uint8 or weights.ndim != 4:
            continue
        b_dq = producer.get(node.input[2]) if len(node.input) > 2 else None
        if b_dq is not None and (b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in inits):
            continue
        kh, kw = weights.shape[2:]
        out.append(
            {
                "name": node.name,
                "weight_dq": w_dq,
                "bias_dq": b_dq,
                "activation_scale": float(numpy_helper.to_array(inits[a_dq.input[1]]).ravel()[0]),
                "activation": a_dq.input[0],
                "zero_point": int(zero.reshape(-1)[0]),
                "weights": weights,
                "strides": tuple(attrs["strides"].ints) if "strides" in attrs else (1, 1),
                "pads": tuple(attrs["pads"].ints) if "pads" in attrs else (0, 0, 0, 0),
                "dilations": tuple(attrs["dilations"].ints) if "dilations" in attrs else (1, 1),
                "shape": f"conv {kh}x{kw} {weights.shape[1]}->{weights.shape[0]}",
            }
        )
    return out


def columns(a: np.ndarray, conv: dict[str, Any]) -> np.ndarray:
    """im2col of ``uint8[N, C, H, W]`` as ``int32[N * Ho * Wo, kh * kw * C]`` (channels-last
    reduction order), padded with the activation's zero point (the quantized 0.0)."""
    n, c, _, _ = a.shape
    kh, kw = conv["weights"].shape[2:]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    x = np.pad(
        a.transpose(0, 2, 3, 1),
        ((0, 0), (top, bottom), (left, right), (0, 0)),
        constant_values=conv["zero_point"],
    )
    ho = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        x[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.concatenate(taps, axis=3).reshape(n * ho * wo, kh * kw * c).astype(np.int32)


def accumulators(cols: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(exact, avx2)`` int32 accumulators ``[M, Cout]`` of ``cols @ w.T`` for raw u8
    activations ``cols`` (``[M, K]``) and s8 weights ``w`` (``[Cout, K]``): exact, and as
    ``VPMADDUBSW`` + ``VPMADDWD`` form them (adjacent pairs clipped to int16, then summed)."""
    cols, w = cols.astype(np.int32), w.astype(np.int32)
    if cols.shape[1] % 2:  # MLAS pads the reduction axis with zeros
        cols = np.pad(cols, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 0), (0, 1)))
    pairs = cols[:, 0::2, None] * w[:, 0::2].T[None] + cols[:, 1::2, None] * w[:, 1::2].T[None]
    return pairs.sum(1), np.clip(pairs, *_I16).sum(1)


def _replay(cols: np.ndarray, w: np.ndarray, zero_point: int, chunk: int = 2048) -> dict:
    """How much the AVX2 accumulation of ``cols @ w.T`` differs from the exact one."""
    wsum = w.astype(np.int64).sum(1)
    err_sq = signal_sq = 0.0
    hit = total = 0
    for s in range(0, len(cols), chunk):
        exact, avx2 = accumulators(cols[s : s + chunk], w)
        err = avx2 - exact
        signal = exact - zero_point * wsum[None]  # the output before scale and bias
        err_sq += float((err.astype(np.float64) ** 2).sum())
        signal_sq += float((signal.astype(np.float64) ** 2).sum())
        hit += int((err != 0).sum())
        total += err.size
    return {
        "outputs_clipped": hit / max(total, 1),
        "relative_error": float(np.sqrt(err_sq / max(signal_sq, 1e-30))),
    }


def saturation_report(qdq_onnx: str | Path, x: np.ndarray) -> list[dict[str, Any]]:
    """Per u8s8 GEMM convolution of ``qdq_onnx`` on inputs ``x`` (``float32[N, 3, H, W]``; a
    few images suffice): ``outputs_clipped`` (share of accumulators the AVX2 kernel gets
    wrong) and ``relative_error`` (RMS of the error over RMS of the exact accumulator, zero
    point removed), in graph order. The u8 activations come from ONNX Runtime with graph
    optimizations off (``QuantizeLinear`` is exact on every host).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(qdq_onnx))
    convs = gemm_convolutions(model)
    names = list(dict.fromkeys(c["activation"] for c in convs))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    acts = dict(zip(names, sess.run(names, feed), strict=True))
    report = []
    for conv in convs:
        w = conv["weights"].transpose(0, 2, 3, 1).reshape(len(conv["weights"]), -1)
        row = _replay(
            columns(acts[conv["activation"]], conv), w.astype(np.int32), conv["zero_point"]
        )
        report.append({"name": conv["name"], "shape": conv["shape"], **row})
    return report


def pair_safe(
    qdq_onnx: str | Path, float_onnx: str | Path, names: list[str] | None, dst: str | Path
) -> list[str]:
    """Requantize the weights of the u8s8 GEMM convolutions ``names`` (None: all of them) so
    that no adjacent pair can saturate ``VPMADDUBSW``, on any input: u8 activations are in
    [0, 255], so a pair's sum is largest when both weights have the same sign; each output
    channel's scale becomes its largest same-sign pair ``|w[2j]| + |w[2j+1]|`` over 127
    (instead of ``max|w| / 127``), so such a pair is at most 128 after rounding and every
    pair sum stays within ``255 * 128 = 32640 <= 32767``. Still 8-bit weights: a channel
    loses precision only by how much its largest same-sign pair exceeds its largest weight
    (``reduce_range``, 7-bit weights, always loses a bit). The bias is requantized to the
    new scale from the float graph ``float_onnx`` (the graph that was quantized). Writes
    ``dst``.

    Returns:
        The names of the convolutions changed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_onnx))
    floats = {i.name: i for i in onnx.load(str(float_onnx)).graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    wanted = None if names is None else set(names)
    changed = []

    def put(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for conv in gemm_convolutions(model):
        if wanted is not None and conv["name"] not in wanted:
            continue
        w_dq, b_dq = conv["weight_dq"], conv["bias_dq"]
        w_float = numpy_helper.to_array(floats[w_dq.input[0].removesuffix("_quantized")])
        cout = w_float.shape[0]
        pair = _largest_pair(w_float.transpose(0, 2, 3, 1).reshape(cout, -1))
        # never finer than ONNX Runtime's own scale, which it widens where the int32 bias
        # would overflow
        ort_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float64)
        scale = np.maximum(
            np.where(pair > 0, pair / 127.0, 1.0), np.broadcast_to(ort_scale, pair.shape)
        )
        q = np.clip(np.round(w_float / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
        put(w_dq.input[0], q)
        put(w_dq.input[1], scale.astype(np.float32))
        if b_dq is not None:
            name = b_dq.input[0].removesuffix("_quantized")
            b_float = (
                numpy_helper.to_array(floats[name])
                if name in floats
                else numpy_helper.to_array(inits[b_dq.input[0]])
                * numpy_helper.to_array(inits[b_dq.input[1]])
            )
            b_scale = (conv["activation_scale"] * scale).astype(np.float32)
            bq = np.clip(np.round(b_float / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            put(b_dq.input[0], bq)
            put(b_dq.input[1], b_scale)
        changed.append(conv["name"])
    onnx.save(model, str(dst))
    return changed


def _largest_pair(w: np.ndarray) -> np.ndarray:
    """Per row of ``w`` (``[Cout, K]``): the largest sum of same-sign magnitudes over the
    adjacent pairs ``(2j, 2j + 1)``. u8 activations are never negative, so a pair of
    opposite signs cannot add up beyond its larger product; a same-sign pair can."""
    w = w.astype(np.float64)
    if w.shape[1] % 2:
        w = np.pad(w, ((0, 0), (0, 1)))
    pos, neg = np.maximum(w, 0), np.maximum(-w, 0)
    return np.maximum((pos[:, 0::2] + pos[:, 1::2]).max(1), (neg[:, 0::2] + neg[:, 1::2]).max(1))
