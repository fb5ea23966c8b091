"""The Open Inference Protocol v2 (KServe v2, as NVIDIA Triton, OpenVINO Model Server and
Seldon MLServer speak it) for edge_tl's one input: request parsing, response encoding and
the protocol's error.

One input, ``image``: datatype ``BYTES``, shape ``[N]``, each element one image file's bytes
(JPEG, PNG, ...). In a JSON request an element is the file's base64 text; with the
binary-data extension (the ``Inference-Header-Content-Length`` header, each input's
``binary_data_size`` parameter, as ``tritonclient.http`` sends it) the elements follow the
JSON header as raw bytes, each prefixed by its length (4 bytes, little-endian).

Outputs are encoded in JSON (``data``: a flat row-major list) or, when the request asks
for them (``binary_data_output``, or ``binary_data`` per requested output), as raw bytes
after the JSON header (FP32 little-endian; BYTES length-prefixed as above).

References: the KServe v2 protocol (https://github.com/kserve/open-inference-protocol,
``docs/inference_rest.md``) and Triton's binary-data extension
(``docs/protocol/extension_binary_data.md`` in triton-inference-server/server).
Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "HEADER_LENGTH",
    "INPUT_NAME",
    "InferRequest",
    "ProtocolError",
    "Tensor",
    "encode_response",
    "load_json",
    "parse_infer_request",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
INPUT_DATATYPE = "BYTES"
MAX_IMAGES = 64
"""Images in one infer request, at most (a camera sends one; a batch of a few is fine)."""


OPTIONAL_OUTPUTS = {
    "top_k_labels": '"top_k": K',
    "top_k_scores": '"top_k": K',
    "map": '"map": true',
}
"""Outputs in a model's metadata that a request gets only with a parameter."""


class ProtocolError(Exception):
    """A request the server refuses: ``status`` (400, 401, 404, 413, ...) and a one-line
    ``message``, answered as the protocol's ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())  # one line, always


@dataclass
class InferRequest:
    """A parsed infer request: the images' bytes, the request's ``parameters``, its ``id``,
    and how each output should come back (``outputs``: name -> binary or not; None: all
    outputs, ``binary_default`` for each)."""

    images: list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    outputs: dict[str, bool] | None = None
    binary_default: bool = False


@dataclass
class Tensor:
    """One output tensor: ``name``, ``datatype`` (``FP32`` or ``BYTES``) and its values
    (``float32`` array, or a nested list of ``str`` for BYTES) of ``shape``."""

    name: str
    datatype: str
    shape: list[int]
    values: Any


def load_json(body: bytes, message: str) -> Any:
    """``body`` parsed as JSON.

    Raises:
        ProtocolError: 400 with ``message`` for bytes that are not JSON, or JSON nested too
            deeply for the parser (``[[[[...`` a hundred thousand deep: a RecursionError,
            which would otherwise be a 500).
    """
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(400, message) from None
    except RecursionError:
        raise ProtocolError(400, f"{message}: nested too deeply") from None


def _flag(value: Any, what: str) -> bool:
    """``value`` of a true/false parameter (absent: false).

    Raises:
        ProtocolError: 400 for anything but a JSON boolean (the text ``"false"`` is truthy
            in Python and would silently turn binary output on).
    """
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{what} must be true or false, not {str(value)[:40]!r}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """``(JSON header, binary tail)`` of a request body."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise ProtocolError(
                400,
                f"{HEADER_LENGTH} is {header_length!r}; it must be the length of the JSON "
                f"header within the {len(body)}-byte body",
            )
        head, tail = body[:n], body[n:]
    request = load_json(head, "the request body is not JSON (an inference request)")
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request body must be a JSON object with 'inputs'")
    return request, tail


def _unpack_bytes(raw: bytes, n: int) -> list[bytes]:
    """``n`` elements of a binary BYTES tensor: each a 4-byte little-endian length, then
    that many bytes."""
    out, pos = [], 0
    for _ in range(n):
        if pos + 4 > len(raw):
            break
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            break
        out.append(raw[pos : pos + size])
        pos += size
    if len(out) != n or pos != len(raw):
        raise ProtocolError(
            400,
            f"input 'image' has {len(raw)} bytes of binary data that do not hold {n} "
            "length-prefixed elements (4-byte little-endian length, then the bytes)",
        )
    return out


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body (``header_length``: the ``Inference-Header-Content-Length``
    header, for the binary-data extension).

    Raises:
        ProtocolError: 400 for a body that is not a request, an input other than one
            ``image`` of datatype BYTES and shape ``[N]`` (1 <= N <= :data:`MAX_IMAGES`),
            data that is not N base64 texts, or binary data that does not match its sizes.
    """
    request, tail = _split_body(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "the request has no 'inputs'; send one input named 'image'")
    names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
    if names != [INPUT_NAME]:
        wrong = ", ".join(repr(n) for n in names)
        raise ProtocolError(
            400,
            f"unexpected input {wrong}: the model takes one input named 'image' "
            "(datatype BYTES, shape [N], one image file per element)",
        )
    tensor = inputs[0]
    if tensor.get("datatype") != INPUT_DATATYPE:
        raise ProtocolError(
            400,
            f"input 'image' has datatype {tensor.get('datatype')!r}; it must be 'BYTES' "
            "(each element one image file)",
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or isinstance(shape[0], bool)
        or not 1 <= shape[0] <= MAX_IMAGES
    ):
        raise ProtocolError(
            400,
            f"input 'image' has shape {shape!r}; it must be [N], N images, 1 <= N <= {MAX_IMAGES}",
        )
    n = shape[0]
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "input 'image' has 'parameters' that are not a JSON object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(tail) or "data" in tensor:
            raise ProtocolError(
                400,
                f"input 'image' declares binary_data_size {size!r} but {len(tail)} bytes "
                "follow the JSON header (and it must not also have 'data')",
            )
        images = _unpack_bytes(tail, n)
    else:
        if tail:
            raise ProtocolError(
                400, "binary data follows the JSON header but no input declares binary_data_size"
            )
        data = tensor.get("data")
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
            data = data[0]  # [[...]]: the protocol allows nested lists
        if not isinstance(data, list) or len(data) != n:
            got = f"{len(data)} elements" if isinstance(data, list) else "no list"
            raise ProtocolError(
                400, f"input 'image' has shape [{n}] but its 'data' holds {got}; send {n}"
            )
        images = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ProtocolError(
                    400, f"element {i} of input 'image' is not a base64 text of an image file"
                )
            try:
                images.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise ProtocolError(
                    400, f"element {i} of input 'image' is not valid base64"
                ) from None
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "'parameters' of the request is not a JSON object")
    outputs = request.get("outputs")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise ProtocolError(400, "'outputs' must be a list of objects with a 'name'")
        wanted = {}
        for o in outputs:
            params = o.get("parameters") or {}
            if not isinstance(params, dict):
                raise ProtocolError(
                    400, f"output {o['name'][:40]!r} has 'parameters' that are not a JSON object"
                )
            wanted[o["name"]] = _flag(
                params.get("binary_data"), f"output {o['name'][:40]!r}'s binary_data"
            )
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(400, "the request's 'id' must be a string")
    return InferRequest(
        images=images,
        parameters=parameters,
        id=rid,
        outputs=wanted,
        binary_default=_flag(parameters.get("binary_data_output"), "binary_data_output"),
    )


def _binary(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        flat = np.asarray(t.values, dtype=object).reshape(-1)
        parts = [s.encode() if isinstance(s, str) else bytes(s) for s in flat]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.ascontiguousarray(t.values, dtype="<f4").tobytes()


def _json_data(t: Tensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [str(s) for s in np.asarray(t.values, dtype=object).reshape(-1)]
    return [float(v) for v in np.asarray(t.values, np.float32).reshape(-1)]


def encode_response(
    model: str, version: str, tensors: list[Tensor], request: InferRequest
) -> tuple[bytes, int | None]:
    """``(body, JSON header length or None)`` of an infer response with ``tensors`` (those
    the request asked for, each in JSON or binary as it asked).

    Raises:
        ProtocolError: 400 for a requested output the model does not have.
    """
    by_name = {t.name: t for t in tensors}
    if request.outputs is None:
        chosen = [(t, request.binary_default) for t in tensors]
    else:
        unknown = [n for n in request.outputs if n not in by_name]
        if unknown:
            hint = OPTIONAL_OUTPUTS.get(unknown[0])
            raise ProtocolError(
                400,
                f"unknown output {unknown[0]!r}; this request answers {', '.join(by_name)}"
                + (f" (add {hint} to the request's 'parameters' for it)" if hint else ""),
            )
        chosen = [(by_name[n], b) for n, b in request.outputs.items()]
    outputs, tail = [], []
    for t, binary in chosen:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            raw = _binary(t)
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            out["data"] = _json_data(t)
        outputs.append(out)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not tail:
        return head, None
    return head + b"".join(tail), len(head)
