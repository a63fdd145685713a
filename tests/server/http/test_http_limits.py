"""The HTTP limits hold against hostile and careless clients (a real uvicorn on 127.0.0.1, tiny model).

Each test is a case an attacker once used to kill or stall the server: a body far over the limit,
a body that stalls, a header sent half, thousands of connections, a 422 that copied every item of
a huge list, an unexpected error on a keep-alive connection, SIGTERM with requests past the drain,
and a busy port found only after the model had loaded. After each, the server still answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.support import GENERATE, free_port, serve

PREDICT = "/v1/tasks/spam/predict"
LIMITS = {"max_body_bytes": 64 * 1024, "header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_connections": 48,
          "max_upload_bytes": 16 * 1024}


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_server_model):
    with serve(tiny_bundle, tiny_server_model, admin_token="secret", **LIMITS) as srv:
        yield srv


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def head(method: str, path: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def still_serving(server) -> None:
    r = httpx.post(server.url + PREDICT, json={"text": "still serving"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path", [("POST", PREDICT), ("POST", "/v1/completions"),
                                         ("PUT", "/v1/adapters/spam")])
def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(server, method, path):
    sock = connect(server)
    sock.sendall(head(method, path, 100 * 2**20, "Authorization: Bearer secret\r\n"))  # 100 MB promised, none sent
    response = read_all(sock)  # answered at once, and the connection closed
    assert status_of(response) == 413
    message = json.dumps(body_of(response))
    assert "max_upload_bytes" in message if path.startswith("/v1/adapters") else "max_body_bytes" in message
    if path == "/v1/completions":
        assert body_of(response)["error"]["code"] == 413  # the OpenAI routes keep their error shape
    still_serving(server)


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    sock = connect(server)
    sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"[" + b"0," * 8000
    sent = 0
    try:
        while sent < 4 * LIMITS["max_body_bytes"]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading at the limit
    response = read_all(sock)
    assert status_of(response) == 413 and "max_body_bytes" in body_of(response)["detail"]
    still_serving(server)


def test_a_huge_invalid_list_gets_a_short_422_at_once(server):
    body = json.dumps({"text": [0] * 30_000})  # 90 KB: over the limit
    r = httpx.post(server.url + PREDICT, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    body = json.dumps({"text": [0] * 20_000})  # 60 KB of wrong items, under the limit
    start = time.monotonic()
    r = httpx.post(server.url + PREDICT, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422
    assert time.monotonic() - start < 10
    assert len(r.content) < 8_000  # not one error per item
    out = r.json()
    assert out["field"] == "text" and len(out["errors"]) <= 20
    assert all("function-after" not in str(e["loc"]) and "list[" not in str(e["loc"]) for e in out["errors"])
    still_serving(server)


def test_422_names_the_constraint_not_pydantic_branches(server):
    r = httpx.post(server.url + PREDICT, json={"text": "   "}, timeout=60)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("text: ") and "valid list" not in r.json()["detail"]
    assert all(e["loc"][:2] == ["body", "text"] for e in r.json()["errors"])


def test_a_stalled_body_gets_408_and_its_connection_closes(server):
    sock = connect(server)
    sock.sendall(head("POST", PREDICT, 100) + b'{"')  # Content-Length: 100, then 2 bytes and silence
    start = time.monotonic()
    response = read_all(sock)
    assert status_of(response) == 408 and "body_timeout_s" in body_of(response)["detail"]
    assert time.monotonic() - start < 15
    still_serving(server)


def test_half_sent_headers_are_closed_after_header_timeout_and_do_not_block_others(server):
    socks = []
    for _ in range(30):
        sock = connect(server)
        sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        socks.append(sock)
    still_serving(server)  # others are answered meanwhile
    start = time.monotonic()
    answers = [read_all(sock) for sock in socks]
    assert all(status_of(a) == 408 for a in answers), answers[:2]
    assert time.monotonic() - start < 20
    # a keep-alive connection that starts a second head and stops is closed too
    sock = connect(server)
    sock.sendall(head("GET", "/health"))
    time.sleep(0.3)
    sock.sendall(b"GET /health HTTP/1.1\r\nHo")
    data = read_all(sock)
    assert data.count(b"HTTP/1.1 200") == 1 and b"HTTP/1.1 408" in data


def test_connections_over_the_cap_are_refused_at_once_and_the_cap_frees_up(server):
    held = [connect(server) for _ in range(LIMITS["max_connections"] + 20)]
    refused = []
    for sock in held[LIMITS["max_connections"]:]:
        sock.settimeout(10)
        data = read_all(sock, timeout=10)
        refused.append(data)
    assert all(status_of(a) == 503 for a in refused), refused[:2]
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 20
    while True:  # the server notices the closed connections within a moment
        try:
            still_serving(server)
            break
        except (AssertionError, httpx.TransportError):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_an_unexpected_error_keeps_the_keep_alive_connection(server, monkeypatch):
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.engine, "adapters", broken)
    sock = connect(server)
    sock.sendall(head("GET", "/v1/tasks") + head("GET", "/health"))  # two pipelined requests
    sock.settimeout(30)
    data = b""
    while data.count(b"HTTP/1.1 ") < 2 or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    assert b"HTTP/1.1 500" in data and b"internal error: RuntimeError" in data
    assert b"HTTP/1.1 200" in data and b'"status":"ok"' in data
    sock.close()


def test_sigterm_past_the_drain_answers_503_json_and_ends_streams_with_an_error_event(tiny_bundle,
                                                                                      tiny_server_model):
    srv = serve(tiny_bundle, tiny_server_model, drain_timeout_s=1.0)
    with srv:
        runner = srv.engine.loaded.runner
        step = runner.step

        def slow_step(admitted):  # every step takes 50 ms: a 512-token generation outlasts the drain
            time.sleep(0.05)
            return step(admitted)

        runner.step = slow_step
        results: dict[str, httpx.Response | list[str]] = {}
        body = {"text": "abc", "max_new_tokens": 512, "temperature": 0}

        def plain():
            results["plain"] = httpx.post(srv.url + f"/v1/tasks/{GENERATE}/generate", json=body, timeout=60)

        def stream():
            with httpx.stream("POST", srv.url + f"/v1/tasks/{GENERATE}/generate", json={**body, "stream": True},
                              timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(runner.active) < 2:
            assert time.monotonic() < deadline, "the generations did not start"
            time.sleep(0.02)
        srv.server.should_exit = True  # what uvicorn does on SIGTERM
        for t in threads:
            t.join(60)
    plain_response = results["plain"]
    assert isinstance(plain_response, httpx.Response)
    assert plain_response.status_code == 503, plain_response.text
    assert plain_response.headers["retry-after"] == "1" and "detail" in plain_response.json()
    events = [json.loads(line.removeprefix("data:").strip()) for line in results["stream"]]
    assert events[-1]["type"] == "error" and events[-1]["status"] == 503


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "talora.server.cli", "--port", str(port),
                              "--model", str(tmp_path / "no-such-model")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr  # not the missing model: the port comes first
    assert time.monotonic() - start < 60
