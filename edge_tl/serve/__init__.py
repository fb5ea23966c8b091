"""``edge-tl serve``: the device as a service.

The Open Inference Protocol v2 over REST (what NVIDIA Triton, OpenVINO Model Server,
KServe and Seldon MLServer speak, so their clients work unchanged), learning endpoints
beyond it (teach a class, add good images to an anomaly bank, roll back), Prometheus
metrics, structured access logs and a web page at ``/``. Device side: imports the
runtime and the floor, never torch, the workstation or the export side. Needs the
``serve`` extra (FastAPI, uvicorn, python-multipart, prometheus-client).

Modules: :mod:`.app` (the ASGI app), :mod:`.protocol` (the protocol's requests, responses
and errors), :mod:`.models` (the bundles served and what infer computes),
:mod:`.learning` (the learning endpoints), :mod:`.security` (token, limits),
:mod:`.metrics` (metrics, access log).

Example:
    >>> from edge_tl.serve import ServeConfig, run
    >>> run(ServeConfig(bundles=["bundles/neu_int8"], token_file="token"))  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_tl.serve.app import ServeConfig, create_app

__all__ = [
    "CONFIG_ENV",
    "ServeConfig",
    "app_from_env",
    "check_listen",
    "create_app",
    "log_json",
    "run",
]

CONFIG_ENV = "EDGE_TL_SERVE_CONFIG"
"""How ``--workers N`` hands the configuration to each worker process (JSON)."""
GRACEFUL_SECONDS = 30
MAX_CONNECTIONS = 256
"""Open connections and tasks at once; uvicorn answers 503 beyond it (a client that opens
connections without end would otherwise hold the server's memory and file handles)."""
QUIET_ENV = "EDGE_TL_QUIET"


class _JsonLines(logging.Formatter):
    """One JSON object per line: a message that is one already (the access log) as it is,
    any other as ``{"ts", "level", "logger", "msg"}``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{") and msg.endswith("}"):
            return msg
        return json.dumps(
            {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": msg,
            }
        )


JSON_LOGGERS = ("edge_tl", "edge_tl.serve", "uvicorn", "uvicorn.error", "python_multipart")
"""Loggers written as JSON lines by a server: its own, the runtime's (a warning while
learning), uvicorn's, and python-multipart's (it logs a warning for a malformed form,
which would otherwise reach stderr as a bare line among the JSON ones)."""


def log_json(level: int = logging.INFO) -> None:
    """The server's own logs, the runtime's, uvicorn's and python-multipart's as JSON
    lines on stderr (idempotent)."""
    for name in JSON_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(h.formatter, _JsonLines) for h in log.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_JsonLines())
            log.handlers = [handler]
        log.setLevel(level)
        log.propagate = False


def app_from_env() -> Any:
    """The app for one worker process of ``--workers N`` (uvicorn's factory): the
    configuration from :data:`CONFIG_ENV`."""
    log_json()
    raw = json.loads(os.environ[CONFIG_ENV])
    return create_app(ServeConfig(**raw))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_listen(host: str, port: int) -> None:
    """Fail early, in one line, when the server could not listen on ``host:port``.

    Raises:
        EdgeTLError: ``port`` outside 0..65535, or the address in use or not this
            machine's (uvicorn would otherwise print a traceback, or log the error after
            starting up and exit with another status).
    """
    import socket

    from edge_tl.errors import EdgeTLError

    if not 0 <= port <= 65535:
        raise EdgeTLError(f"--port must be in 0..65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise EdgeTLError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            fix = (
                "pick another --port, or stop the process that holds it"
                if e.errno == errno.EADDRINUSE
                else "give --host an address of this machine (127.0.0.1, 0.0.0.0, ...)"
            )
            raise EdgeTLError(
                f"cannot listen on {host}:{port} ({e.strerror or e}); {fix}"
            ) from None


def run(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
) -> None:
    """Serve ``config`` with uvicorn until SIGINT or SIGTERM; then requests in flight
    finish (up to 30 s) before the process exits.

    Raises:
        EdgeTLError: a bad configuration (before anything listens), or a bundle that fails
            to load (the server stops).
    """
    import uvicorn

    from edge_tl.errors import EdgeTLError

    if workers < 1:
        raise EdgeTLError(f"--workers must be at least 1, not {workers}")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise EdgeTLError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for flag, f in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if f is not None and not Path(f).is_file():
            raise EdgeTLError(f"{flag} {f} does not exist; pass a PEM file")
    check_listen(host, port)
    # the runtime's progress bars (embedding support images, ...) would write bare lines
    # among the JSON ones at every learning call; workers inherit this
    os.environ[QUIET_ENV] = "1"
    log_json()
    if host not in LOOPBACK and ssl_certfile is None:
        logging.getLogger("edge_tl.serve").warning(
            "listening on %s without TLS: requests, the bearer token among them, cross the "
            "network in clear text; pass --ssl-certfile/--ssl-keyfile or put the server "
            "behind a TLS reverse proxy",
            host,
        )
    app = create_app(config)  # checks the bundles, names and token before listening
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,  # the app writes its own JSON access log, without headers
        "timeout_graceful_shutdown": GRACEFUL_SECONDS,
        "limit_concurrency": MAX_CONNECTIONS,
        "ssl_certfile": None if ssl_certfile is None else str(ssl_certfile),
        "ssl_keyfile": None if ssl_keyfile is None else str(ssl_keyfile),
    }
    if workers > 1:
        raw = asdict(config)
        raw["bundles"] = [str(b) for b in config.bundles]
        raw["token_file"] = None if config.token_file is None else str(config.token_file)
        raw["trust"] = None if config.trust is None else [str(t) for t in config.trust]
        os.environ[CONFIG_ENV] = json.dumps(raw)
        uvicorn.run("edge_tl.serve:app_from_env", factory=True, workers=workers, **common)
        return
    server = uvicorn.Server(uvicorn.Config(app, **common))
    registry = app.state.registry

    def stop_on_failure() -> None:
        registry.done.wait()
        if registry.failed:
            server.should_exit = True

    import threading

    threading.Thread(target=stop_on_failure, daemon=True).start()
    server.run()
    if registry.failed:
        raise EdgeTLError(registry.failed)
