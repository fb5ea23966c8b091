"""``edge-tl serve`` without a model in memory: the protocol's parsing and encoding, the
token, the limits and the class-name rule, and the app's answers before its bundles are
loaded (in-process, through httpx's ASGI transport). The server on real bundles is
tests/test_serve_live.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from edge_tl.errors import EdgeTLError  # noqa: E402
from edge_tl.serve import ServeConfig, create_app  # noqa: E402
from edge_tl.serve.learning import read_form  # noqa: E402
from edge_tl.serve.protocol import (  # noqa: E402
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    encode_response,
    parse_infer_request,
)
from edge_tl.serve.security import decode_image, read_token, server_label  # noqa: E402

TOKEN = "s3cret-token-for-tests-0123456789"


def _png(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _json_request(data, name="image", datatype="BYTES", shape=None) -> bytes:
    shape = [len(data)] if shape is None else shape
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    return json.dumps(body).encode()


# ---- the protocol ----------------------------------------------------------------------
def test_json_and_binary_requests_give_the_same_images():
    png = _png()
    j = parse_infer_request(_json_request([base64.b64encode(png).decode()] * 2))
    raw = b"".join(struct.pack("<I", len(png)) + png for _ in range(2))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"top_k": 2},
        }
    ).encode()
    b = parse_infer_request(head + raw, str(len(head)))
    assert j.images == b.images == [png, png]
    assert b.parameters == {"top_k": 2}


@pytest.mark.parametrize(
    "body, words",
    [
        (_json_request(["aGk="], name="input_1"), "unexpected input 'input_1'"),
        (_json_request(["aGk="], datatype="FP32"), "datatype 'FP32'"),
        (_json_request(["aGk="], shape=[1, 1]), "shape [1, 1]"),
        (_json_request(["aGk="], shape=[2]), "holds 1 elements"),
        (_json_request(["not base64!"]), "not valid base64"),
        (b"{not json", "not JSON"),
        (json.dumps({"inputs": []}).encode(), "no 'inputs'"),
    ],
)
def test_wrong_requests_get_a_400_naming_the_problem(body, words):
    with pytest.raises(ProtocolError) as e:
        parse_infer_request(body)
    assert e.value.status == 400
    assert words in e.value.message and "\n" not in e.value.message


def test_binary_data_that_does_not_match_its_sizes_is_refused():
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 10},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="binary_data_size"):
        parse_infer_request(head + b"x" * 9, str(len(head)))
    with pytest.raises(ProtocolError, match="length-prefixed"):
        parse_infer_request(head + struct.pack("<I", 99) + b"x" * 6, str(len(head)))
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        parse_infer_request(head, "999999")


def test_outputs_come_back_in_json_or_binary_as_asked():
    tensors = [
        Tensor("label", "BYTES", [2], ["a", "bé"]),
        Tensor("score", "FP32", [2], np.array([0.5, 0.25], np.float32)),
    ]
    body, n = encode_response("m", "1", tensors, InferRequest(images=[]))
    assert n is None
    out = json.loads(body)["outputs"]
    assert out[0]["data"] == ["a", "bé"] and out[1]["data"] == [0.5, 0.25]
    req = InferRequest(images=[], outputs={"score": True})
    body, n = encode_response("m", "1", tensors, req)
    head = json.loads(body[:n])
    assert [o["name"] for o in head["outputs"]] == ["score"]
    assert np.frombuffer(body[n:], "<f4").tolist() == [0.5, 0.25]
    body, n = encode_response("m", "1", tensors, InferRequest(images=[], binary_default=True))
    raw = body[n:]
    assert raw[:4] == struct.pack("<I", 1) and raw[4:5] == b"a"
    with pytest.raises(ProtocolError, match="unknown output 'map'.*add \"map\": true"):
        encode_response("m", "1", tensors, InferRequest(images=[], outputs={"map": False}))
    with pytest.raises(ProtocolError, match="unknown output 'nope'; this request answers"):
        encode_response("m", "1", tensors, InferRequest(images=[], outputs={"nope": False}))


# ---- security --------------------------------------------------------------------------
def test_token_file_rules(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_token(f) == TOKEN
    f.write_text("short\n")
    with pytest.raises(EdgeTLError, match="no usable token") as e:
        read_token(f)
    assert "short" not in str(e.value)  # never shown
    with pytest.raises(EdgeTLError, match="cannot be read"):
        read_token(tmp_path / "missing")


@pytest.mark.parametrize("label", ["../x", "a/b", "a\\b", "..", "", "x" * 101, "unknown", "a\nb"])
def test_class_names_with_paths_or_control_characters_are_refused(label):
    with pytest.raises(ProtocolError) as e:
        server_label(label)
    assert e.value.status == 400 and "\n" not in e.value.message


def test_images_are_decoded_in_memory_and_bombs_refused_from_the_header():
    img = decode_image(_png(), "a.png")
    assert img.size == (32, 24)
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")  # 25 MP of zeros, ~25 KB
    with pytest.raises(ProtocolError) as e:
        decode_image(buf.getvalue(), "bomb.png", limit=1_000_000)
    assert e.value.status == 413 and "bomb.png is 5,000 x 5,000" in e.value.message
    for data, words in ((b"", "is empty"), (b"%PDF-1.4 not an image", "not a readable image")):
        with pytest.raises(ProtocolError, match=words):
            decode_image(data, "upload.bin")


def test_multipart_forms_are_parsed_in_memory():
    png = _png()
    boundary = "XyZ"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\nscratches\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
        f'filename="../../etc/a.png"\r\nContent-Type: image/png\r\n\r\n',
    ]
    body = "".join(parts).encode() + png + f"\r\n--{boundary}--\r\n".encode()
    fields, files = read_form(body, f"multipart/form-data; boundary={boundary}")
    assert fields == {"label": "scratches"}
    assert files == [(".._.._etc_a.png", png)]
    with pytest.raises(ProtocolError, match="multipart/form-data"):
        read_form(b"{}", "application/json")


# ---- the app before its bundles are loaded ---------------------------------------------
def _app(tmp_path, **kw):
    bundle = tmp_path / "b1"
    bundle.mkdir(exist_ok=True)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = ServeConfig(bundles=[bundle], token_file=token, **kw)
    return create_app(config, load=False)


def _call(app, method, url, **kw):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def test_not_ready_until_loaded_and_errors_are_one_line_json(tmp_path):
    app = _app(tmp_path, max_body_mb=0.01)
    assert _call(app, "GET", "/v2/health/live").json() == {"live": True}
    assert _call(app, "HEAD", "/v2/health/live").status_code == 200  # load balancers' probe
    assert _call(app, "HEAD", "/v2/health/ready").status_code == 503
    r = _call(app, "GET", "/v2/health/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    meta = _call(app, "GET", "/v2").json()
    assert meta["name"] == "edge_tl" and "binary_tensor_data" in meta["extensions"]
    r = _call(app, "POST", "/v2/models/nope/infer", content=b"{}")
    assert r.status_code == 404 and r.json() == {
        "error": "unknown model 'nope'; this server has b1"
    }
    r = _call(app, "POST", "/v2/models/b1/infer", content=_json_request(["aGk="]))
    assert r.status_code == 503 and "still loading" in r.json()["error"]
    r = _call(app, "POST", "/v2/models/b1/infer", content=b"x" * 20_000)
    assert r.status_code == 413 and "over this server's limit" in r.json()["error"]
    assert _call(app, "GET", "/openapi.json").json()["paths"]["/v2/models/{name}/learn"]
    assert b"edge_tl_requests_total" in _call(app, "GET", "/metrics").content


def test_learning_needs_the_token_and_is_off_without_one(tmp_path):
    app = _app(tmp_path)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
    ):
        r = _call(app, "POST", "/v2/models/b1/remove", json={"label": "x"}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
    r = _call(
        app,
        "POST",
        "/v2/models/b1/remove",
        json={"label": "x"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 503  # let through; the bundle is not loaded here
    open_app = create_app(ServeConfig(bundles=[tmp_path / "b1"]), load=False)
    r = _call(open_app, "GET", "/v2/models/b1/versions")
    assert r.status_code == 403 and "--token-file" in r.json()["error"]


def test_bad_settings_are_refused_before_listening(tmp_path):
    with pytest.raises(EdgeTLError, match="does not exist"):
        create_app(ServeConfig(bundles=[tmp_path / "missing"]), load=False)
    (tmp_path / "a").mkdir()
    with pytest.raises(EdgeTLError, match="needs --token-file"):
        create_app(ServeConfig(bundles=[tmp_path / "a"], token_for_infer=True), load=False)
    with pytest.raises(EdgeTLError, match="not usable in a URL"):
        create_app(ServeConfig(bundles=[tmp_path / "a"], names=["a b"]), load=False)
    with pytest.raises(EdgeTLError, match="two bundles are named"):
        create_app(ServeConfig(bundles=[tmp_path / "a", tmp_path / "a"]), load=False)


def test_token_for_infer_guards_inference_and_metadata_but_not_health(tmp_path):
    app = _app(tmp_path, token_for_infer=True)
    body = _json_request(["aGk="])
    assert _call(app, "POST", "/v2/models/b1/infer", content=body).status_code == 401
    assert _call(app, "GET", "/v2/models/b1").status_code == 401
    ok = _call(
        app,
        "POST",
        "/v2/models/b1/infer",
        content=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert ok.status_code == 503  # let through; the bundle is not loaded here
    assert _call(app, "GET", "/v2/health/live").status_code == 200


# ---- hostile requests: a 400 with one line, never a 500 --------------------------------
_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"outputs": [{"name": "label", "parameters": 5}]}, "not a JSON object"),
        ({"outputs": [{"name": "label", "parameters": {"binary_data": "false"}}]}, "true or"),
        ({"parameters": {"binary_data_output": "false"}}, "binary_data_output must be true"),
        ({"id": {"a": 1}}, "'id' must be a string"),
    ],
)
def test_outputs_flags_and_id_of_the_wrong_type_are_refused(extra, words):
    body = json.loads(_json_request(["aGk="]))
    body.update(extra)
    with pytest.raises(ProtocolError) as e:
        parse_infer_request(json.dumps(body).encode())
    assert e.value.status == 400 and words in e.value.message


def test_json_nested_too_deeply_is_a_400_not_a_500(tmp_path):
    with pytest.raises(ProtocolError, match="nested too deeply") as e:
        parse_infer_request(_DEEP)
    assert e.value.status == 400
    app = _app(tmp_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = _call(app, "POST", "/v2/models/b1/remove", content=_DEEP, headers=auth)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]


def test_a_bomb_over_pillows_own_limit_is_a_413_too():
    # 20,000 x 20,000 grey PNG of zeros (~390 KB): over twice Pillow's limit, so Pillow
    # refuses it inside Image.open, before the server's own header check
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    side = 20_000
    z, row = zlib.compressobj(9), b"\0" * (side + 1)  # row by row: little memory
    rows = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ProtocolError) as e:
        decode_image(png, "bomb.png")
    assert e.value.status == 413 and "bomb.png" in e.value.message
    assert "smaller image" in e.value.message


def test_metrics_labels_stay_bounded_under_a_scan(tmp_path):
    app = _app(tmp_path)
    for i in range(5):
        _call(app, f"SCAN{i}", f"/probe/{i}")
        _call(app, "GET", f"/v2/models/nope{i}/ready")
    text = _call(app, "GET", "/metrics").text
    assert "SCAN" not in text and 'method="other"' in text
    assert "nope" not in text and "/probe" not in text


def test_a_port_in_use_or_out_of_range_is_one_line_before_anything_starts():
    import socket

    from edge_tl.serve import check_listen

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(EdgeTLError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
            check_listen("127.0.0.1", port)
    with pytest.raises(EdgeTLError, match="--port must be in 0..65535"):
        check_listen("127.0.0.1", 70000)
    with pytest.raises(EdgeTLError, match="not an address of this machine"):
        check_listen("no-such-host.invalid", 8080)
    check_listen("127.0.0.1", 0)  # free: no error


def test_a_server_logs_only_json_lines():
    import logging

    from edge_tl.serve import JSON_LOGGERS, log_json

    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in JSON_LOGGERS
    }
    try:
        log_json()
        for name in JSON_LOGGERS:  # python-multipart's warning on a bad form among them
            log = logging.getLogger(name)
            assert log.handlers and not log.propagate, name
            line = log.handlers[0].format(
                logging.LogRecord(name, logging.WARNING, "", 0, "Expected boundary", None, None)
            )
            assert json.loads(line)["msg"] == "Expected boundary"
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = (
                handlers,
                propagate,
            )


def test_a_request_of_many_large_images_is_refused_before_any_is_decoded():
    from edge_tl.serve.security import decode_images

    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")  # 6 MP of zeros, a few KB
    big = buf.getvalue()
    assert len(decode_images([("a.png", big), ("b.png", big)], 6_000_000, 12_000_000)) == 2
    with pytest.raises(ProtocolError) as e:
        decode_images([(f"{i}.png", big) for i in range(64)], 6_000_000, 12_000_000)
    assert e.value.status == 413 and "in all (at 2.png)" in e.value.message
    # the budget always lets one image of the largest allowed size through
    assert len(decode_images([("a.png", big)], limit=6_000_000, budget=1)) == 1
