"""Training jobs through HTTP (issue 39): a task trained end to end on the tiny model by a worker process,
installed and served; the refusals of bad data, the 409 of a second job of a task, and the queue, the
restart, the cancel and the failed install of ``TrainingManager``."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from talora.server.metrics import Metrics
from talora.server.settings import Settings
from talora.server.training.manager import JobConflict, Submission, TrainingManager, _Running
from talora.server.training.store import JobRecord, JobStore
from tests.server.support import serve

TOKEN = "secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def tickets(n_per_label: int = 30) -> list[dict]:
    """A task the tiny random model can learn: the label is in the text's first characters."""
    rows = []
    for i in range(n_per_label):
        rows.append({"text": f"aaaa refund order {i}", "label": "billing"})
        rows.append({"text": f"zzzz login fails {i}", "label": "access"})
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("training-store")


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_server_model, store):
    with serve(tiny_bundle, tiny_server_model, store=store, admin_token=TOKEN, model=tiny_server_model.name,
               training_max_examples=500) as srv:
        yield srv


def _wait(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/training/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


def test_a_task_is_trained_installed_and_served(client, store):
    answer = client.post("/v1/training/jobs", headers=AUTH, json={"task": "tickets", "examples": tickets(),
                                                                  "steps": 24, "version": "tickets-v1"})
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["status"] == "queued" and job["label_counts"] == {"access": 30, "billing": 30}
    assert job["progress"]["splits"] == {"train": 48, "dev": 6, "test": 6}
    # a second job of the same task while the first is active: 409
    again = client.post("/v1/training/jobs", headers=AUTH, json={"task": "tickets", "examples": tickets()})
    assert again.status_code == 409 and "tickets" in again.json()["detail"]
    done = _wait(client, job["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["installed"] and result["version"] == "tickets-v1" and result["previous_version"] is None
    assert set(result["test_metrics"]) >= {"accuracy", "majority_rate"} and "accuracy" in result["dev_metrics"]
    assert done["progress"]["step"] == done["progress"]["steps"] == 24
    assert (store / "tickets.json").is_file() and (store / ".talora" / "jobs" / job["id"] / "job.json").is_file()
    info = client.get("/v1/tasks/tickets").json()
    assert info["version"] == "tickets-v1" and info["source"] == "store:tickets"
    assert info["training"]["job"] == job["id"] and info["training"]["test_metrics"] == result["test_metrics"]
    assert info["labels"] == ["access", "billing"]
    predicted = client.post("/v1/tasks/tickets/predict", json={"text": "aaaa refund please"})
    assert predicted.status_code == 200 and predicted.json()["version"] == "tickets-v1"
    assert predicted.json()["label"] in ("access", "billing")
    listed = client.get("/v1/training/jobs", headers=AUTH).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    with client.stream("GET", f"/v1/training/jobs/{job['id']}/events",
                       headers={**AUTH, "accept": "text/event-stream"}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "done" and events[-1]["job"]["status"] == "succeeded"
    metrics = client.get("/metrics").text
    assert 'talora_training_jobs_finished_total{status="succeeded"} 1.0' in metrics
    assert "talora_training_seconds_count 1.0" in metrics
    # the served version is the version asked for: a new job under it is refused before it trains
    same = client.post("/v1/training/jobs", headers=AUTH, json={"task": "tickets", "examples": tickets(),
                                                                "version": "tickets-v1"})
    assert same.status_code == 409 and "version" in same.json()["detail"]
    assert client.delete(f"/v1/training/jobs/{job['id']}", headers=AUTH).status_code == 200
    assert client.get(f"/v1/training/jobs/{job['id']}", headers=AUTH).status_code == 404


@pytest.mark.parametrize("change, field, words", [
    (lambda rows: rows + [dict(rows[3])], "examples", "row 61 (examples[60]) has the same text as row 4"),
    (lambda rows: [{**rows[0], "text": "   "}] + rows[1:], "examples", "row 1 (examples[0]) has an empty 'text'"),
    (lambda rows: rows[:-1] + [{**rows[-1], "label": "other"}], "examples", "not in labels"),
    (lambda rows: rows[:20] + [{"text": "lonely", "label": "rare"}], "examples", "fewer than 2 examples"),
    (lambda rows: rows[:10], "examples", "leave the dev and test split empty"),
    (lambda rows: rows[:8], "examples", "the examples have 8 examples; at least 10 are needed"),
])
def test_bad_examples_are_refused_naming_the_row(client, change, field, words):
    body = {"task": "bad_data", "examples": change(tickets()), "labels": ["access", "billing"]}
    if words == "fewer than 2 examples":
        body.pop("labels")
    answer = client.post("/v1/training/jobs", headers=AUTH, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and words in answer.json()["detail"], answer.json()


def test_request_refusals(client):
    rows = tickets()
    assert client.post("/v1/training/jobs", json={"task": "t", "examples": rows}).status_code == 401
    unknown = client.post("/v1/training/jobs", headers=AUTH, json={"task": "t", "kind": "rank", "examples": rows})
    assert unknown.status_code == 422 and unknown.json()["field"] == "kind"
    big = client.post("/v1/training/jobs", headers=AUTH, json={"task": "t", "examples": tickets(300)})
    assert big.status_code == 413 and "training_max_examples" in big.json()["detail"]
    template = client.post("/v1/training/jobs", headers=AUTH, json={"task": "t", "examples": rows,
                                                                    "template": "no field here"})
    assert template.status_code == 422 and template.json()["field"] == "template"
    lines = "\n".join(json.dumps(r) for r in rows[:3]) + "\n{broken\n"
    jsonl = client.post("/v1/training/jobs/jsonl", params={"task": "t"}, headers={**AUTH,
                        "content-type": "application/x-ndjson"}, content=lines)
    assert jsonl.status_code == 422 and "line 4" in jsonl.json()["detail"]
    assert client.get("/v1/training/jobs/0123456789abcdef", headers=AUTH).status_code == 404


def test_a_jsonl_job_is_cancelled_and_changes_nothing(client, store):
    lines = "\n".join(json.dumps(r) for r in tickets())
    answer = client.post("/v1/training/jobs/jsonl", params={"task": "uploaded", "install": "false", "steps": 400},
                         headers={**AUTH, "content-type": "application/x-ndjson"}, content=lines)
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["options"]["install"] is False and job["examples"] == 60
    cancelled = client.post(f"/v1/training/jobs/{job['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 200
    assert _wait(client, job["id"])["status"] == "cancelled"
    assert client.post(f"/v1/training/jobs/{job['id']}/cancel", headers=AUTH).status_code == 409
    assert client.get("/v1/tasks/uploaded").status_code == 404 and not (store / "uploaded.json").exists()


def test_an_extract_answer_must_be_in_its_text(client):
    rows = [{"text": f"The meeting is in room {i}.", "question": "Where is the meeting?", "label": f"room {i}"}
            for i in range(12)]
    rows[5]["label"] = "the roof"
    answer = client.post("/v1/training/jobs", headers=AUTH, json={"task": "rooms", "kind": "extract",
                                                                  "examples": rows})
    assert answer.status_code == 422 and "row 6 (examples[5])'s answer" in answer.json()["detail"], answer.text


def test_training_routes_are_off_without_a_manager(tiny_bundle, tiny_server_model, tmp_path):
    with serve(tiny_bundle, tiny_server_model, store=tmp_path, admin_token=TOKEN, training_max_running=0) as srv:
        answer = httpx.get(f"{srv.url}/v1/training/jobs", headers=AUTH)
    assert answer.status_code == 501


# ----- the manager alone (no worker process runs) ----------------------------------------------------
def _manager(store, tiny_bundle, **settings) -> TrainingManager:
    return TrainingManager(Settings(bundle=tiny_bundle, store=store, **settings), store, tiny_bundle, "m", "cpu",
                           Metrics(), install=lambda task: (None, True), current=lambda task: None)


def test_the_queue_is_capped_and_a_task_has_one_job_at_a_time(tmp_path, tiny_bundle):
    from talora.server.errors import QueueFull

    manager = _manager(tmp_path, tiny_bundle, training_max_queued=1)
    manager.submit(Submission(task="one", examples=tickets(6)))
    with pytest.raises(JobConflict):
        manager.submit(Submission(task="one", examples=tickets(6)))
    with pytest.raises(QueueFull, match="training_max_queued"):
        manager.submit(Submission(task="two", examples=tickets(6)))
    assert len(list((tmp_path / ".talora" / "jobs").iterdir())) == 1  # a refused job leaves no folder


def test_a_restart_requeues_queued_jobs_and_fails_interrupted_ones(tmp_path, tiny_bundle):
    store = JobStore(tmp_path)
    queued = JobRecord(id="00000000000000a1", task="q", kind="classify", status="queued", options={}, examples=10)
    running = JobRecord(id="00000000000000a2", task="r", kind="classify", status="running", options={}, examples=10,
                        progress={"pid": 999_999_999})
    for record in (queued, running):
        store.folder(record.id).mkdir(parents=True)
        store.save(record)
    manager = _manager(tmp_path, tiny_bundle, training_max_running=0)  # nothing is launched
    manager.start()
    try:
        assert manager.get(queued.id).status == "queued" and manager._queue == [queued.id]
        failed = manager.get(running.id)
        assert failed.status == "failed" and "interrupted" in failed.error
        assert json.loads((store.folder(running.id) / "job.json").read_text())["status"] == "failed"
    finally:
        manager.stop()


def test_cancel_stops_a_running_worker(tmp_path, tiny_bundle):
    manager = _manager(tmp_path, tiny_bundle, training_max_running=0)
    record = manager.submit(Submission(task="slow", examples=tickets(6)))
    manager._queue.remove(record.id)
    record.status = "running"
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    log_file = open(tmp_path / "worker.log", "ab")  # noqa: SIM115
    manager._running[record.id] = _Running(record, proc, time.monotonic(), log_file)
    manager.cancel(record.id)
    manager._tick()
    assert proc.poll() is not None and manager.get(record.id).status == "cancelled"
    with pytest.raises(JobConflict):
        manager.cancel(record.id)


def test_a_refused_install_leaves_the_store_as_it_was(tmp_path, tiny_bundle):
    (tmp_path / "spam.json").write_bytes(b"old json")
    (tmp_path / "spam.safetensors").write_bytes(b"old tensors")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "spam.json").write_bytes(b"new json")
    (trained / "spam.safetensors").write_bytes(b"new tensors")

    def refuse(task):
        assert (tmp_path / f"{task}.json").read_bytes() == b"new json"  # the load reads the new files
        raise ValueError("version: conflict")

    manager = _manager(tmp_path, tiny_bundle)
    manager._install = refuse
    with pytest.raises(ValueError):
        manager._install_files("spam", trained / "spam")
    assert (tmp_path / "spam.json").read_bytes() == b"old json"
    assert (tmp_path / "spam.safetensors").read_bytes() == b"old tensors"
    with pytest.raises(ValueError):
        manager._install_files("newtask", trained / "spam")  # no old files: the new ones are removed
    assert not (tmp_path / "newtask.json").exists()


@pytest.mark.slow
def test_a_real_task_beats_its_majority_rate(default_model, tmp_path):
    """The real default model and the demo bundle: 120 support tickets of three labels, trained through HTTP,
    installed and served; on the held-out test split the task beats its majority rate."""
    from benchmarks.serving.onboard_latency import support_tickets
    from talora.adapters.demo import demo_bundle_dir

    with serve(demo_bundle_dir(), default_model, store=tmp_path, admin_token=TOKEN, model=default_model.name,
               training_threads=2) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        answer = client.post("/v1/training/jobs", headers=AUTH, json={"task": "tickets",
                                                                      "examples": support_tickets(40)})
        assert answer.status_code == 200, answer.text
        done = _wait(client, answer.json()["id"], timeout=1800)
        assert done["status"] == "succeeded", done
        tested = done["result"]["test_metrics"]
        assert tested["accuracy"] > tested["majority_rate"] + 0.15, tested
        predicted = client.post("/v1/tasks/tickets/predict", json={"text": "Please refund the March invoice"})
        assert predicted.json()["version"] == done["result"]["version"]
