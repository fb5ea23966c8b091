"""The ASGI app of ``edge-tl serve``: the Open Inference Protocol v2 over REST, the learning
endpoints, ``/metrics``, and the web page at ``/``.

:func:`create_app` builds it from a :class:`ServeConfig`; uvicorn runs it
(:func:`edge_tl.serve.run`). Every error is the protocol's ``{"error": "<one line>"}``
with its status. Torch-free.

Example:
    >>> app = create_app(ServeConfig(bundles=["bundles/neu_int8"]))  # doctest: +SKIP
    >>> # uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_tl import __version__
from edge_tl.errors import EdgeTLError
from edge_tl.serve import learning
from edge_tl.serve.metrics import Metrics
from edge_tl.serve.models import Registry
from edge_tl.serve.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_response,
    parse_infer_request,
)
from edge_tl.serve.security import (
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_PIXELS,
    BodyLimit,
    check_bearer,
    decode_images,
    read_token,
)

__all__ = ["SERVER_NAME", "ServeConfig", "create_app"]

SERVER_NAME = "edge_tl"
EXTENSIONS = ["binary_tensor_data", "model_repository", "edge_tl_learning"]
STATIC = Path(__file__).with_name("static")
_logger = logging.getLogger("edge_tl.serve")


@dataclass
class ServeConfig:
    """What ``edge-tl serve`` was asked for.

    ``token_file``: the bearer token's file (None: learning is off, answered 403);
    ``token_for_infer``: inference needs the token too; ``max_body_mb``: request body
    limit; ``max_pixels``: pixels of one uploaded image; ``trust``: public keys a bundle
    must be signed with (:mod:`edge_tl.signing`).
    """

    bundles: list[str | Path]
    names: list[str] = field(default_factory=list)
    token_file: str | Path | None = None
    token_for_infer: bool = False
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    trust: Any = None

    def check(self) -> None:
        """Raises: EdgeTLError for settings that do not go together."""
        if self.token_for_infer and self.token_file is None:
            raise EdgeTLError("--token-for-infer needs --token-file FILE, the bearer token")
        if not self.max_body_mb > 0:
            raise EdgeTLError(f"--max-body-mb must be above 0, not {self.max_body_mb}")
        if self.max_pixels < 1:
            raise EdgeTLError(f"--max-pixels must be at least 1, not {self.max_pixels}")


class _Wrapped:
    """``add_middleware`` takes a class: one around a plain ASGI wrapper function."""

    def __init__(self, app: Any, wrap: Any) -> None:
        self.inner = wrap(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.inner(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def create_app(config: ServeConfig, load: bool = True) -> FastAPI:
    """The server's app for ``config``: bundles checked now, loaded in the background when
    the app starts (``load``; readiness is false until every bundle is loaded).

    Raises:
        EdgeTLError: a bundle missing, names that clash or are not usable in a URL, an
            unreadable or too short token file, or settings that do not go together.
    """
    config.check()
    token = None if config.token_file is None else read_token(config.token_file)
    registry = Registry(config.bundles, config.names, config.trust)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load:
            registry.start()
        yield

    app = FastAPI(
        title="edge_tl serve",
        version=__version__,
        summary="Open Inference Protocol v2 over REST, with on-device learning.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.config = config
    app.state.token = token

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(EdgeTLError)
    async def edge_tl_error(request: Request, e: EdgeTLError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    def infer_allowed(request: Request) -> None:
        if config.token_for_infer:
            check_bearer(request.headers.get("authorization"), token, "inference")

    # ---- health and metadata ----------------------------------------------------------
    # HEAD too: load balancers' health checks (HAProxy, ...) often send it
    @app.get("/v2/health/live", tags=["health"])
    @app.head("/v2/health/live", include_in_schema=False)
    async def live() -> dict[str, bool]:
        """Live: the process answers."""
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    @app.head("/v2/health/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        """Ready (200) once every bundle is loaded and passed its self-test; 503 before."""
        if registry.ready:
            return JSONResponse({"ready": True})
        body: dict[str, Any] = {"ready": False}
        if registry.failed:
            body["error"] = registry.failed
        return JSONResponse(body, status_code=503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> dict[str, Any]:
        """The server's name, version and protocol extensions."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/models/{name}", tags=["metadata"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"], include_in_schema=False)
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        """A model's metadata: inputs, outputs, and ``parameters`` (kind, classes, the head or
        bank version in force)."""
        infer_allowed(request)
        return await run_in_threadpool(registry.get(name).metadata, __version__)

    @app.get("/v2/models/{name}/ready", tags=["health"])
    @app.head("/v2/models/{name}/ready", include_in_schema=False)
    async def model_ready(name: str) -> JSONResponse:
        """200 when the model is loaded, 503 while it loads or when it failed."""
        served = registry.get(name)
        ok = served.model is not None
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/repository/index", tags=["metadata"])
    async def repository_index() -> list[dict[str, Any]]:
        """Every model with its version in force and state (READY, LOADING, UNAVAILABLE)."""
        out = []
        for served in registry.models.values():
            if served.model is not None:
                out.append(
                    {"name": served.name, "version": str(served.version() or 0), "state": "READY"}
                )
            else:
                state = "UNAVAILABLE" if served.error else "LOADING"
                entry = {"name": served.name, "version": "", "state": state}
                if served.error:
                    entry["reason"] = served.error
                out.append(entry)
        return out

    # ---- inference --------------------------------------------------------------------
    @app.post(
        "/v2/models/{name}/infer",
        tags=["inference"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "example": {
                            "inputs": [
                                {
                                    "name": "image",
                                    "datatype": "BYTES",
                                    "shape": [1],
                                    "data": ["<base64 of a JPEG or PNG file>"],
                                }
                            ],
                            "parameters": {"top_k": 3},
                        }
                    },
                    "application/octet-stream": {},
                },
            }
        },
    )
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request) -> Response:
        """Classify images, or score them against the anomaly bank (see the README)."""
        infer_allowed(request)
        served = registry.get(name)
        served.require()
        body = await request.body()
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH))

        def work() -> tuple[bytes, int | None]:
            named = [(f"image {i}", b) for i, b in enumerate(parsed.images)]
            images = decode_images(named, config.max_pixels)
            tensors, version = served.infer(images, parsed.parameters)
            metrics.images.labels(name).inc(len(images))
            return encode_response(name, str(version or 0), tensors, parsed)

        out, header = await run_in_threadpool(work)
        if header is None:
            return Response(out, media_type="application/json")
        return Response(
            out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header)}
        )

    # ---- learning, metrics, the page ----------------------------------------------------
    app.include_router(learning.router(registry, metrics, token))

    @app.get("/metrics", tags=["operations"], include_in_schema=True)
    async def prometheus() -> Response:
        """Prometheus metrics (text format)."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return JSONResponse(
            {
                "name": SERVER_NAME,
                "version": __version__,
                "models": list(registry.models),
                "docs": "/docs",
            }
        )

    # the last added is the outermost: every request is counted, a body over the limit too
    app.add_middleware(BodyLimit, max_bytes=int(config.max_body_mb * 1024 * 1024))
    app.add_middleware(_Wrapped, wrap=metrics.middleware)
    return app
