"""Deadlines, abandoned requests and request limits over real HTTP (fast tier, tiny model): the deadline
starts when the request arrives and covers tokenising; a client that goes away has its jobs
cancelled (predict, generate and completions, not only streams); a request is held to
``max_request_chars`` before it is tokenised and ``max_request_tokens`` after; a template with
``{question}`` needs a question."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import torch

from talora.adapters.formats.bundle import export_task, model_from_bundle
from tests.server.support import GENERATE, add_random_task, build_bundle, serve

PREDICT = "/v1/tasks/spam/predict"
GEN = f"/v1/tasks/{GENERATE}/generate"
QA_TEMPLATE = "Context: {text}\nQuestion: {question}\nAnswer:"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` s (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


class Hold:
    """Wraps the runner's step: records each admitted job's (client, task) in order, and holds the worker
    in its first step that admits a job until ``release()``."""

    def __init__(self, runner, monkeypatch):
        self.order: list[tuple[str, str]] = []
        self.entered, self.gate = threading.Event(), threading.Event()
        real = runner.step

        def step(admitted):
            self.order += [(getattr(item.job, "client", "-"), item.job.adapter.task) for item in admitted]
            if admitted and not self.gate.is_set():
                self.entered.set()
                assert self.gate.wait(120), "the test never released the worker"
            return real(admitted)

        monkeypatch.setattr(runner, "step", step)

    def wait_entered(self) -> None:
        assert self.entered.wait(60), "the worker never started a step"

    def release(self) -> None:
        self.gate.set()


def post_raw(port: int, path: str, body: dict, client_id: str | None = None) -> socket.socket:
    """Send a POST on a socket of our own, to be closed before the answer (the client going away)."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + (f"X-Client-Id: {client_id}\r\n" if client_id else "") + "\r\n")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def cancelled(server, reason: str) -> float:
    return server.engine.metrics.requests_cancelled.labels(reason)._value.get()


def statuses(server, task: str, endpoint: str, status: int) -> float:
    return server.engine.metrics.requests.labels(task, endpoint, str(status))._value.get()


@pytest.fixture(scope="module")
def qa_bundle(tmp_path_factory, tiny_server_model):
    """``tiny_bundle``'s tasks and two whose template asks a question: ``qa`` (generate), ``qa_label``."""
    loaded = tiny_server_model
    folder = build_bundle(tmp_path_factory.mktemp("qa-bundle"), loaded)
    model, bundle, _ = model_from_bundle(loaded.model, folder, loaded.fingerprint, tasks=[])
    gen = torch.Generator().manual_seed(7)
    add_random_task(model, "qa", gen, gate_std=0.05)
    export_task(model, "qa", folder, bundle, kind="generate", template=QA_TEMPLATE, max_input_tokens=32)
    add_random_task(model, "qa_label", gen)
    export_task(model, "qa_label", folder, bundle, kind="classify", labels=["yes", "no"],
                verbalizers={"yes": " yes", "no": " no"}, template=QA_TEMPLATE, max_input_tokens=32)
    return folder


@pytest.fixture(scope="module")
def server(qa_bundle, tiny_server_model):
    """A long request timeout (only a cancellation ends a request early) and a small token limit."""
    with serve(qa_bundle, tiny_server_model, request_timeout_s=120, max_request_tokens=64) as srv:
        yield srv


def slow_steps(runner, monkeypatch, seconds: float) -> None:
    """Every step takes at least ``seconds``, and no generation ends at an EOS: only its length or a
    cancellation ends it."""
    real = runner._forward

    def forward(plan, *args):
        time.sleep(seconds)
        return real(plan, *args)

    monkeypatch.setattr(runner, "_forward", forward)
    monkeypatch.setattr(runner, "eos_ids", set())


# ----- deadlines -------------------------------------------------------------------------------

def test_the_deadline_starts_at_arrival_and_covers_tokenising(qa_bundle, tiny_server_model, monkeypatch):
    with serve(qa_bundle, tiny_server_model, request_timeout_s=2) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        engine = srv.engine
        encoded: list[str] = []
        submitted: list[int] = []
        real_encode, real_submit = engine.encode, engine.submit

        def slow_encode(adapter, text, question=None):  # 6 texts: 4.8 s of tokenising, over the 2 s timeout
            encoded.append(text)
            time.sleep(0.8)
            return real_encode(adapter, text, question)

        def submit(jobs):
            submitted.append(len(jobs))
            real_submit(jobs)

        monkeypatch.setattr(engine, "encode", slow_encode)
        monkeypatch.setattr(engine, "submit", submit)
        r = c.post(PREDICT, json={"text": [f"text {i}" for i in range(6)]})
        assert r.status_code == 504 and "2.0 s" in r.json()["detail"], r.text
        assert len(encoded) < 6 and submitted == []  # tokenising stopped at the deadline; nothing was queued
        assert cancelled(srv, "timeout") == 1
        monkeypatch.setattr(engine, "encode", real_encode)
        assert c.post(PREDICT, json={"text": "fine"}).status_code == 200 and submitted == [1]


# ----- abandoned requests ----------------------------------------------------------------------

@pytest.mark.parametrize("path,body,rows,status", [
    (GEN, {"text": "Count:", "max_new_tokens": 512, "temperature": 0}, 1, 499),
    ("/v1/completions", {"model": GENERATE, "prompt": ["Count:", "Again:"], "max_tokens": 512, "temperature": 0},
     2, 499),
    (GEN, {"text": "Count:", "max_new_tokens": 512, "temperature": 0, "stream": True}, 1, 200),
], ids=["generate", "completions", "stream"])
def test_an_abandoned_generation_is_cancelled(server, monkeypatch, path, body, rows, status):
    runner = server.engine.loaded.runner
    slow_steps(runner, monkeypatch, 0.1)  # 512 tokens: 51 s at least, far past the waits below
    before = cancelled(server, "disconnect")
    endpoint = "/v1/completions" if path == "/v1/completions" else "/v1/tasks/{task}/generate"
    logged = statuses(server, GENERATE, endpoint, status)
    sock = post_raw(server.port, path, body)
    wait_until(lambda: len(runner.active) == rows, "the generations run")
    if body.get("stream"):
        assert sock.recv(1) == b"H"  # the stream has started: from here Starlette watches the connection
    sock.close()
    wait_until(lambda: not runner.active, "the abandoned generations are dropped", timeout=30)
    # a request whose client left before its answer is logged 499 (nobody receives it); a stream, 200
    wait_until(lambda: statuses(server, GENERATE, endpoint, status) == logged + 1, f"the request is logged {status}")
    assert cancelled(server, "disconnect") == before + 1
    assert b"talora_active_sequences 0.0" in server.engine.metrics.render()


def test_an_abandoned_predict_leaves_the_queue_without_running(server, monkeypatch):
    runner, scheduler = server.engine.loaded.runner, server.engine.scheduler
    hold = Hold(runner, monkeypatch)
    before = cancelled(server, "disconnect")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        answers: list[httpx.Response] = []
        first = threading.Thread(target=lambda: answers.append(c.post(PREDICT, json={"text": "holds the worker"})))
        first.start()
        hold.wait_entered()
        sock = post_raw(server.port, PREDICT, {"text": ["a", "b", "c"]}, client_id="gone")
        wait_until(lambda: scheduler.waiting == (1, 3), "the predict is queued")
        sock.close()
        wait_until(lambda: cancelled(server, "disconnect") == before + 1, "the predict is cancelled")
        hold.release()
        first.join(60)
        wait_until(lambda: scheduler.waiting == (0, 0), "the queue empties")
    assert [r.status_code for r in answers] == [200]
    assert all(client != "id:gone" for client, _ in hold.order)


# ----- request limits --------------------------------------------------------------------------

def test_requests_over_max_request_chars_are_refused_before_tokenising(server, client, monkeypatch):
    engine = server.engine
    calls: list[str] = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda *a: (calls.append(a[1]), real(*a))[1])
    big = "x" * 100_000
    r = client.post(PREDICT, json={"text": [big, big, big]})
    assert r.status_code == 413, r.text
    assert r.json() == {"detail": "text: 300000 characters is over the server's limit of 262144 "
                                  "(max_request_chars)", "field": "text"}
    r = client.post("/v1/completions", json={"model": GENERATE, "prompt": [big, big, big], "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
    assert "(max_request_chars)" in r.json()["error"]["message"]
    # the question is part of every text's prompt: it counts once per text
    r = client.post("/v1/tasks/qa_label/predict", json={"text": ["a", "b", "c"], "question": big})
    assert r.status_code == 413 and r.json()["field"] == "question", r.text
    assert r.json()["detail"].startswith("question: 300003 characters (the question counts once per text)")
    assert calls == []
    assert client.post(PREDICT, json={"text": big}).status_code == 200  # within the limit


def test_requests_over_max_request_tokens_are_refused(server, client):
    # one text: at most 32 tokens of text (max_input_tokens) and 14 of template, within the 64 allowed
    assert client.post(PREDICT, json={"text": "y" * 1000}).status_code == 200
    r = client.post(PREDICT, json={"text": ["y" * 1000, "z" * 1000]})
    assert r.status_code == 413, r.text
    assert r.json() == {"detail": "text: 92 prompt tokens is over the server's limit of 64 (max_request_tokens)",
                        "field": "text"}
    r = client.post("/v1/completions", json={"model": GENERATE, "prompt": ["y" * 40] * 3, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/tasks/qa/generate", {"text": "Paris is in France.", "max_new_tokens": 2}),
    ("/v1/tasks/qa/generate", {"text": "Paris is in France.", "max_new_tokens": 2, "stream": True}),
    ("/v1/tasks/qa/generate", {"text": "Paris is in France.", "question": "  ", "max_new_tokens": 2}),
    ("/v1/tasks/qa_label/predict", {"text": ["Paris is in France."]}),
    ("/v1/completions", {"model": "qa", "prompt": "Paris is in France.", "max_tokens": 2}),
], ids=["generate", "stream", "blank", "predict", "completions"])
def test_a_template_with_a_question_needs_one(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json().get("error") or r.json()
    field = error.get("param", error.get("field"))
    message = error.get("message", error.get("detail"))
    assert field == "question" and message.startswith("question: task 'qa"), error
    r = client.post(path, json={**body, "question": "Where is Paris?"})
    assert r.status_code == 200, r.text
