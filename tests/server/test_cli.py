"""``talora-serve`` as a process (SIGTERM drains the request in flight, one log line per request),
and ``/metrics`` parsed with prometheus_client's parser adding up to the requests sent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.support import CLASSIFY, GENERATE, free_port, serve, wait_ready


def test_metrics_parse_and_add_up(tier_bundle, tier_model):
    sent: dict[tuple[str, str], int] = {}
    with serve(tier_bundle, tier_model) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        def call(method, path, endpoint, **kwargs):
            r = client.request(method, path, **kwargs)
            sent[(endpoint, str(r.status_code))] = sent.get((endpoint, str(r.status_code)), 0) + 1

        for task in ("sentiment", "topic", "sentiment"):
            call("POST", f"/v1/tasks/{task}/predict", "/v1/tasks/{task}/predict", json={"text": "a fine day"})
        call("POST", "/v1/tasks/nope/predict", "/v1/tasks/{task}/predict", json={"text": "x"})
        call("POST", "/v1/tasks/spam/predict", "/v1/tasks/{task}/predict", json={"texts": "x"})
        call("POST", f"/v1/tasks/{GENERATE}/generate", "/v1/tasks/{task}/generate",
             json={"text": "Hi", "max_new_tokens": 3, "temperature": 0})
        call("GET", "/v1/tasks", "/v1/tasks")
        call("GET", "/health", "/health")
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["talora_requests"].samples if s.name == "talora_requests_total"]
    assert sum(s.value for s in requests) == sum(sent.values()) == 8
    got = {}
    for s in requests:
        key = (s.labels["endpoint"], s.labels["status"])
        got[key] = got.get(key, 0) + s.value
    assert got == sent
    by_task = {s.labels["task"]: s.value for s in requests if s.labels["status"] == "200"
               and s.labels["endpoint"] == "/v1/tasks/{task}/predict"}
    assert by_task == {"sentiment": 2, "topic": 1}

    def value(family, sample=None, **labels):
        for s in families[family].samples:
            if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise KeyError(family)

    assert value("talora_queue_seconds", "talora_queue_seconds_count") == 4  # 3 predicts + 1 generation
    assert value("talora_prefill_seconds", "talora_prefill_seconds_count") == 4
    assert value("talora_request_seconds", "talora_request_seconds_count", endpoint="/v1/tasks/{task}/predict") == 5
    assert value("talora_tokens", "talora_tokens_total", phase="decode") >= 2
    assert value("talora_adapter_loads", "talora_adapter_loads_total", source="store", result="ok") == \
        len(CLASSIFY) + 1
    assert value("talora_resident_tasks") <= 3 and value("talora_loaded_tasks") == len(CLASSIFY) + 1
    assert value("talora_slot_misses", "talora_slot_misses_total") >= 3
    assert value("talora_slot_hits", "talora_slot_hits_total") >= 1
    assert value("talora_tokens_per_second") > 0
    assert value("talora_batch_rows", "talora_batch_rows_count") >= 3


def test_sigterm_drains_the_request_in_flight(tier_bundle, tier_model, tmp_path):
    port = free_port()
    log_file = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", "from talora.server.cli import main; raise SystemExit(main())",
           "--model", tier_model.name, "--bundle", str(tier_bundle), "--port", str(port), "--torch-threads", "1",
           "--num-slots", "2"]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        polls = wait_ready(url, proc, log_file.read_text)
        body = {"text": "Once upon a time", "max_new_tokens": 20, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/tasks/{GENERATE}/generate", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            events = [json.loads(next(x for x in lines if x.startswith("data: "))[6:])]
            proc.send_signal(signal.SIGTERM)
            events += [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: exit by that signal
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert resp.status_code == 200 and events[-1]["type"] == "done"
    assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 20
    assert len(events) >= 10  # tokens kept coming after SIGTERM
    assert "Finished server process" in log_file.read_text()
    lines = [x for x in log_file.read_text().splitlines() if "talora.server.requests" in x]
    assert len(lines) == polls + 1 and "status=200 task=echo" in lines[-1]
