"""No request can take the server down (fast tier: a real uvicorn on 127.0.0.1, the tiny random model).

Each crash once found by hand or by the fuzzer has a regression test: sampling with a tiny
``top_p`` or temperature, a lone surrogate in a text, a seed over 64 bits. A fault inside one
request fails that request; a fault escaping a step fails that step and the worker carries on;
a worker that cannot go on makes the process exit with status 70 (so that it is restarted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch

from talora.server.engine.generation import sample_token
from tests.server.support import GENERATE, free_port, serve, wait_ready

GEN = f"/v1/tasks/{GENERATE}/generate"


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-46, 1e-8, 0.7, 2.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46, 1e-8, 0.5, 1.0])
def test_sampling_is_defined_for_every_accepted_value(temperature, top_p):
    logits = torch.log_softmax(torch.randn(300, generator=torch.Generator().manual_seed(1)), -1)
    logits[7] = float("-inf")
    token = sample_token(logits, temperature, top_p, torch.Generator().manual_seed(0))
    assert 0 <= token < 300 and token != 7
    if top_p < 1e-8 or temperature < 1e-8:
        assert token == int(torch.argmax(logits))  # the nucleus or the temperature leaves only the best


def test_sampling_refuses_nan_logits():
    with pytest.raises(ValueError, match="NaN"):
        sample_token(torch.full((5,), float("nan")), 1.0, 1.0, torch.Generator())


@pytest.mark.parametrize("path,body", [
    (GEN, {"text": "a", "top_p": 1e-300, "max_new_tokens": 2}),
    (GEN, {"text": "a", "temperature": 1e-300, "max_new_tokens": 2}),
    ("/v1/completions", {"model": GENERATE, "prompt": "a", "top_p": 1e-46, "max_tokens": 2}),
    ("/v1/completions", {"model": "spam", "prompt": ["a", "b"], "top_p": 5e-324, "max_tokens": 2}),
])
def test_tiny_top_p_and_temperature_answer_and_the_server_lives(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200
    assert client.post("/v1/tasks/spam/predict", json={"text": "still serving"}).status_code == 200


@pytest.mark.parametrize("path,body,field", [
    ("/v1/tasks/spam/predict", {"text": "\ud800 abc"}, "text"),
    ("/v1/tasks/spam/predict", {"text": ["ok", "\ud800 abc"]}, "text[1]"),
    (GEN, {"text": "\ud800 abc", "max_new_tokens": 2}, "text"),
    (GEN, {"text": "ok", "stop": "\udfff", "max_new_tokens": 2}, "stop"),
    ("/v1/completions", {"model": GENERATE, "prompt": "\ud800 abc", "max_tokens": 2}, "prompt"),
])
def test_lone_surrogates_are_a_422_naming_the_field(client, path, body, field):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["error"]["message"] if path == "/v1/completions" else r.json()["detail"]
    assert detail.startswith(f"{field}:") and "unicode" in detail.lower()


@pytest.mark.parametrize("path,extra", [(GEN, {"text": "a", "max_new_tokens": 2}),
                                        ("/v1/completions", {"model": GENERATE, "prompt": "a", "max_tokens": 2})])
def test_seed_must_fit_64_bits(client, path, extra):
    r = client.post(path, json={**extra, "seed": 2**70})
    assert r.status_code == 422
    assert "seed" in r.text and "less than 18446744073709551616" in r.text
    for seed in (0, 2**64 - 1):
        assert client.post(path, json={**extra, "seed": seed}).status_code == 200


def test_a_failing_sampler_fails_its_own_generation_only(server, client, monkeypatch):
    from talora.server.engine.sequences import Sequence

    engine, real = server.engine, Sequence.push

    def push(seq, token, eos_ids):  # the host side of taking the device's pick
        if seq.job.params.seed == 13:
            raise RuntimeError("injected sampling fault")
        return real(seq, token, eos_ids)

    monkeypatch.setattr(Sequence, "push", push)
    bad = client.post(GEN, json={"text": "a", "max_new_tokens": 3, "seed": 13})
    good = client.post(GEN, json={"text": "a", "max_new_tokens": 3, "seed": 14})
    assert bad.status_code == 500 and "injected sampling fault" in bad.json()["detail"]
    assert good.status_code == 200 and engine.alive()
    assert engine.metrics.registry.get_sample_value("talora_job_failures_total", {"reason": "sample"}) >= 1


def test_a_fault_escaping_the_step_fails_that_step_and_the_worker_carries_on(server, client, monkeypatch):
    engine = server.engine
    runner = engine.loaded.runner
    real = runner._finish_scores
    calls = []

    def finish(score_jobs, outputs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault after the forward")
        return real(score_jobs, outputs)

    monkeypatch.setattr(runner, "_finish_scores", finish)
    bad = client.post("/v1/tasks/spam/predict", json={"text": "one"})
    assert bad.status_code == 500 and "injected fault" in bad.json()["detail"]
    assert client.post("/v1/tasks/spam/predict", json={"text": ["two", "three"]}).status_code == 200
    assert client.post(GEN, json={"text": "a", "max_new_tokens": 4}).status_code == 200
    assert engine.alive() and runner.pool.free_tokens == runner.pool.capacity
    assert client.get("/health").json() == {"status": "ok"}


def test_a_worker_that_cannot_go_on_reports_it(tiny_bundle, tiny_server_model, monkeypatch):
    stops = []
    with serve(tiny_bundle, tiny_server_model, max_failed_steps=2) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        srv.engine.on_fatal = stops.append
        monkeypatch.setattr(srv.engine.loaded.runner, "_forward", lambda plan, *args: 1 / 0)
        codes = [c.post("/v1/tasks/spam/predict", json={"text": t}).status_code for t in ("a", "b")]
        srv.engine._threads[0].join(10)  # the worker gives up right after failing the second step
        assert codes == [500, 500] and len(stops) == 1 and not srv.engine.alive()
        assert c.get("/health").status_code == 503 and c.get("/ready").status_code == 503
        r = c.post("/v1/tasks/spam/predict", json={"text": "c"})
        assert r.status_code == 503 and "worker" in r.json()["detail"]  # at once, not after a timeout


def test_talora_serve_exits_70_when_its_worker_stops(tiny_bundle, tiny_server_model, tmp_path):
    port = free_port()
    script = textwrap.dedent(f"""
        import sys
        from talora.server import cli
        from talora.server.engine import runner
        runner.Runner._forward = lambda self, plan, *args: 1 / 0
        sys.exit(cli.main(["--model", {tiny_server_model.name!r}, "--bundle", {str(tiny_bundle)!r},
                           "--port", "{port}", "--max-failed-steps", "1", "--torch-threads", "1"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, lambda: proc.stdout.read().decode())
        r = httpx.post(f"http://127.0.0.1:{port}/v1/tasks/spam/predict", json={"text": "x"}, timeout=30)
        assert r.status_code in (500, 503)
        assert proc.wait(30) == 70
    finally:
        proc.kill()
    assert b"exiting with status 70" in proc.stdout.read()


@pytest.mark.parametrize("task,body,status", [
    ("spam", '{"path": "\\ud800x"}', 400),
    ("spam", '{"path": "' + "a" * 5000 + '"}', 400),
    ("spam", '{"path": "' + "a" * 250 + '"}', 400),
    ("spam", '{"path": "a\\nb"}', 400),
    ("x" * 300, "", 400),
    ("%ED%A0%80", "", 400),
])
def test_admin_paths_from_requests_are_4xx(tiny_bundle, tiny_server_model, task, body, status):
    with serve(tiny_bundle, tiny_server_model, admin_token="t") as srv:
        headers = {"authorization": "Bearer t", "content-type": "application/json"}
        r = httpx.put(f"{srv.url}/v1/adapters/{task}", content=body.encode(), headers=headers, timeout=30)
        assert r.status_code == status, r.text
        assert r.json()["detail"].startswith(("path:", "task:"))
