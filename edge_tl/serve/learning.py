"""Learning over HTTP, beyond the protocol, under each model's path: the same operations,
atomicity and versioning as ``edge-tl learn``, ``anomaly`` and ``rollback``.

Every endpoint needs ``Authorization: Bearer <token>``. Each change goes through the
runtime (:class:`~edge_tl.runtime.Classifier`, :class:`~edge_tl.runtime.AnomalyDetector`):
a new version under the store's file lock, written atomically (temporary file, fsync,
rename), with this model's own lock held so that the server's changes run one at a time;
``infer`` sees it as soon as it is committed, and a refused change writes nothing.

Uploads (``multipart/form-data``) are parsed in memory (python-multipart's parser, the
body already bounded by the server's limit): no file is ever written for them.

==========================================  =============================================
``POST /v2/models/{name}/learn``            multipart ``label`` + ``images``: a new class,
                                            or more examples of a known one
``POST /v2/models/{name}/remove``           ``{"label": L}``: forget a class
``POST /v2/models/{name}/relabel``          ``{"from": A, "to": B}``: rename a class
``POST /v2/models/{name}/good``             multipart ``images``: grow the anomaly bank
                                            (or build one when the bundle has none)
``POST /v2/models/{name}/calibrate``        ``{"false_alarm": r}``: re-calibrate the bank
``GET  /v2/models/{name}/versions``         ``?kind=head|anomaly``: the versions
``POST /v2/models/{name}/rollback``         ``{"to": N, "kind": ...}``, both optional
==========================================  =============================================

Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from edge_tl.errors import EdgeTLError
from edge_tl.serve.metrics import Metrics
from edge_tl.serve.models import Registry, ServedModel
from edge_tl.serve.protocol import ProtocolError, load_json
from edge_tl.serve.security import check_bearer, decode_images, server_label

__all__ = ["MAX_UPLOAD_IMAGES", "read_form", "router"]

MAX_UPLOAD_IMAGES = 200
KINDS = ("head", "anomaly")

_MULTIPART = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string"},
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                    },
                }
            }
        },
    }
}


def _json_body(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": fields},
                }
            },
        }
    }


def read_form(
    body: bytes, content_type: str | None
) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """``(text fields, [(file name, bytes)] of the parts named "images")`` of a
    ``multipart/form-data`` body, parsed in memory.

    Raises:
        ProtocolError: 400 for another content type, a body that does not parse, or more
            than :data:`MAX_UPLOAD_IMAGES` images.
    """
    ctype, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ProtocolError(
            400, "send multipart/form-data (a form with 'label' and image files 'images')"
        )
    parts: list[dict[str, Any]] = []
    header: dict[str, Any] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.get("field", b"").lower()] = header.get("value", b"")
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types
        raise ProtocolError(400, f"the form does not parse ({type(e).__name__})") from None
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    for part in parts:
        _, opts = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        if name == "images":
            shown = filename.decode("utf-8", "replace") if filename else f"image {len(files)}"
            # only a name for messages: never a path on this machine
            files.append((shown.replace("/", "_").replace("\\", "_")[:100], bytes(part["data"])))
        elif filename is None:
            try:
                fields[name] = bytes(part["data"]).decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(400, f"form field {name!r} is not UTF-8 text") from None
    if len(files) > MAX_UPLOAD_IMAGES:
        raise ProtocolError(
            400, f"{len(files)} images in one call; send at most {MAX_UPLOAD_IMAGES}"
        )
    return fields, files


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    data = load_json(body, "the request body is not JSON")
    if not isinstance(data, dict):
        raise ProtocolError(400, "the request body must be a JSON object")
    return data


def _kind(served: ServedModel, value: Any) -> str:
    if value is None:
        return "anomaly" if served.kind == "anomaly" else "head"
    if value not in KINDS:
        raise ProtocolError(400, f"kind must be 'head' or 'anomaly', not {str(value)[:40]!r}")
    return value


def router(registry: Registry, metrics: Metrics, token: str | None) -> APIRouter:
    """The learning endpoints (see the module docstring) on ``registry``'s models."""
    api = APIRouter(tags=["learning"])

    async def change(
        request: Request, name: str, op: str, work: Callable[[ServedModel], Any]
    ) -> Any:
        """Authorise, then run ``work(served)`` in a thread under the model's lock; its
        state's summary is the answer."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        served = registry.get(name)
        served.require()

        def locked() -> Any:
            with served.lock:
                try:
                    state = work(served)
                finally:
                    served.committed()
                return state.summary()

        try:
            out = await run_in_threadpool(locked)
        except (ProtocolError, EdgeTLError):
            metrics.learning.labels(name, op, "refused").inc()
            raise
        metrics.learning.labels(name, op, "ok").inc()
        return out

    async def images_of(
        request: Request, name: str, need_label: bool
    ) -> tuple[str | None, list[Any]]:
        check_bearer(request.headers.get("authorization"), token, "learning")
        registry.get(name).require()
        body = await request.body()
        fields, files = read_form(body, request.headers.get("content-type"))
        label = None
        if need_label:
            if "label" not in fields:
                raise ProtocolError(400, "the form has no 'label' (the class to teach)")
            label = server_label(fields["label"])
        if not files:
            raise ProtocolError(400, "the form has no image files named 'images'")
        config = request.app.state.config
        decoded = await run_in_threadpool(decode_images, files, config.max_pixels)
        return label, decoded

    async def refused_on_error(name: str, op: str, pending: Any) -> Any:
        """``await pending``; a bad upload (label, image) counts as a refused operation once
        the caller is authorised."""
        try:
            return await pending
        except ProtocolError as e:
            if e.status not in (401, 403, 404):
                metrics.learning.labels(name, op, "refused").inc()
            raise

    @api.post("/v2/models/{name}/learn", openapi_extra=_MULTIPART)
    async def learn(name: str, request: Request) -> dict[str, Any]:
        """Teach a class from a few images (multipart: ``label``, files ``images``): a new
        class, or more examples of one the head knows. The answer is the new head
        version's record."""
        label, images = await refused_on_error(name, "learn", images_of(request, name, True))

        def work(served: ServedModel) -> Any:
            clf = served.require().classifier
            if clf.state is None:  # a bundle without a head: a first one from these images
                return clf.learn({label: images}, head="prototype")
            return clf.add({label: images})

        return await change(request, name, "learn", work)

    @api.post("/v2/models/{name}/remove", openapi_extra=_json_body({"label": {"type": "string"}}))
    async def remove(name: str, request: Request) -> dict[str, Any]:
        """Forget a class (``{"label": L}``): its weights, prototype and support images."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        label = (await _json(request)).get("label")
        if not isinstance(label, str):
            raise ProtocolError(400, 'send {"label": "<class to remove>"}')
        return await change(
            request, name, "remove", lambda s: s.require().classifier.remove_class(label)
        )

    @api.post(
        "/v2/models/{name}/relabel",
        openapi_extra=_json_body({"from": {"type": "string"}, "to": {"type": "string"}}),
    )
    async def relabel(name: str, request: Request) -> dict[str, Any]:
        """Rename a class (``{"from": A, "to": B}``)."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        body = await _json(request)
        old, new = body.get("from"), body.get("to")
        if not isinstance(old, str) or not isinstance(new, str):
            raise ProtocolError(400, 'send {"from": "<class>", "to": "<new name>"}')
        server_label(new, "the new class name")
        return await change(
            request, name, "relabel", lambda s: s.require().classifier.relabel(old, new)
        )

    @api.post("/v2/models/{name}/good", openapi_extra=_MULTIPART)
    async def good(name: str, request: Request) -> dict[str, Any]:
        """Add good images to the anomaly bank (multipart files ``images``; a new variant,
        new lighting) and re-calibrate its threshold; on a bundle without a bank, build
        one from them. The answer is the new bank version's record."""
        _, images = await refused_on_error(name, "good", images_of(request, name, False))

        def work(served: ServedModel) -> Any:
            det = served.require().detector
            if det.state is None:
                return det.fit(images)
            return det.add(images)

        return await change(request, name, "good", work)

    @api.post(
        "/v2/models/{name}/calibrate", openapi_extra=_json_body({"false_alarm": {"type": "number"}})
    )
    async def calibrate(name: str, request: Request) -> dict[str, Any]:
        """Re-calibrate the bank's threshold for another false-alarm rate on good parts
        (``{"false_alarm": r}``, 0 < r < 1)."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        rate = (await _json(request)).get("false_alarm")
        if (
            not isinstance(rate, (int, float))
            or isinstance(rate, bool)
            or not math.isfinite(rate)
            or not 0 < rate < 1
        ):
            raise ProtocolError(400, f"false_alarm must be a number in (0, 1), not {rate!r}")
        return await change(
            request, name, "calibrate", lambda s: s.require().detector.set_false_alarm(float(rate))
        )

    @api.get("/v2/models/{name}/versions")
    async def versions(name: str, request: Request, kind: str | None = None) -> dict[str, Any]:
        """The head's (``kind=head``) or bank's (``kind=anomaly``; default: the model's
        face) versions, oldest first, with the one in force."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        served = registry.get(name)
        model = served.refresh()
        which = _kind(served, kind)
        store = model.detector.store if which == "anomaly" else model.classifier.store

        def listing() -> dict[str, Any]:
            try:
                current = store.current()
            except EdgeTLError:
                current = None
            return {"kind": which, "current": current, "versions": store.history()}

        return await run_in_threadpool(listing)

    @api.post(
        "/v2/models/{name}/rollback",
        openapi_extra=_json_body(
            {"to": {"type": "integer"}, "kind": {"type": "string", "enum": list(KINDS)}}
        ),
    )
    async def rollback(name: str, request: Request) -> dict[str, Any]:
        """Make an earlier version current (``{"to": N}``; default: the one before the
        current), of the head or the bank (``"kind"``; default: the model's face). Nothing
        is deleted."""
        check_bearer(request.headers.get("authorization"), token, "learning")
        body = await _json(request)
        served = registry.get(name)
        served.require()
        which = _kind(served, body.get("kind"))
        to = body.get("to")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
            raise ProtocolError(400, f"'to' must be a version number (1, 2, ...), not {to!r}")

        def work(s: ServedModel) -> Any:
            model = s.require()
            face = model.detector if which == "anomaly" else model.classifier
            return face.rollback(to)

        return await change(request, name, f"rollback {which}", work)

    return api
