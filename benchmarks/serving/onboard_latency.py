"""What a training job costs serving: predict latency with and without one job running (issue 39).

The script starts ``talora-serve`` on 127.0.0.1 (the embedded default model and the demo bundle unless
``--model`` / ``--bundle`` say otherwise; an empty store of its own; ``--torch-threads`` for serving,
``--training-threads`` for the job's worker), then:

1. **idle**: ``--requests`` sequential one-text predicts to a demo classify task: p50 and p99;
2. **training**: queues a job of ``--per-label`` synthetic support tickets per label (``support_tickets``:
   billing, access, shipping) through ``POST /v1/training/jobs`` and, once its worker has logged a step,
   the same predicts again while it runs (they stop early if the job ends): p50 and p99;
3. waits for the job and reports its dev and test scores against the test majority rate.

The result (both latency rows, their p99 ratio, the job's result and timings) goes to
``benchmarks/results/serving/onboard_latency.json``. Run it on an otherwise idle machine with at least
``torch_threads + training_threads`` cores: other load makes the numbers meaningless.

    python -m benchmarks.serving.onboard_latency                       # SmolLM2-135M, the demo bundle, 1 + 1 threads
    python -m benchmarks.serving.onboard_latency --requests 100 --model DIR --bundle DIR
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import write_json

ADMIN_TOKEN = "onboard-bench"
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
_TOPICS = {
    "billing": (["I was charged twice for", "Please refund", "Why is there an extra fee on", "My invoice is wrong for",
                 "Cancel the subscription and refund", "The card payment failed for"],
                ["my last order", "the March invoice", "the annual plan", "my account", "the premium upgrade",
                 "order 4417"]),
    "access": (["I cannot log in to", "The password reset link does not work for", "Two-factor codes never arrive for",
                "I am locked out of", "The app logs me out of", "My username is not recognised by"],
               ["my account", "the mobile app", "the web dashboard", "the admin console", "my team workspace",
                "the new laptop"]),
    "shipping": (["My parcel has not arrived for", "The tracking number is wrong for", "The box was damaged for",
                  "Delivery was sent to the wrong address for", "The courier never came for", "Still waiting on"],
                 ["my last order", "order 4417", "the replacement part", "the gift", "the annual plan kit",
                  "the return label"]),
}


def support_tickets(per_label: int, seed: int = 0) -> list[dict]:
    """``per_label`` distinct synthetic support tickets of each of billing, access and shipping, shuffled."""
    rng = random.Random(seed)
    rows = []
    for label, (starts, objects) in _TOPICS.items():
        texts: set[str] = set()
        while len(texts) < per_label:
            ending = rng.choice(["", " since Monday.", ", please help.", " again.", " - urgent!", " today."])
            texts.add(f"{rng.choice(starts)} {rng.choice(objects)}{ending} (ticket {rng.randrange(10_000)})")
        rows += [{"text": text, "label": label} for text in sorted(texts)]
    rng.shuffle(rows)
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving.onboard_latency",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="talora-serve --model (default: the embedded default)")
    p.add_argument("--bundle", default=None, help="talora-serve --bundle (default: the demo bundle)")
    p.add_argument("--requests", type=int, default=200, help="predicts per phase")
    p.add_argument("--per-label", type=int, default=40, help="training tickets per label (3 labels)")
    p.add_argument("--torch-threads", type=int, default=1, help="threads of the serving process")
    p.add_argument("--training-threads", type=int, default=1, help="threads of the training worker")
    p.add_argument("--out", type=Path, default=SERVING_RESULTS / "onboard_latency.json")
    return p.parse_args(argv)


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    return {"requests": len(values), "p50_ms": round(pick(0.5), 2), "p99_ms": round(pick(0.99), 2)}


def _predicts(client: httpx.Client, task: str, texts: list[str], n: int, until=None) -> list[float]:
    times = []
    for i in range(n):
        if until is not None and not until():
            break
        tic = time.perf_counter()
        answer = client.post(f"/v1/tasks/{task}/predict", json={"text": texts[i % len(texts)]})
        times.append(time.perf_counter() - tic)
        answer.raise_for_status()
    return times


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory() as store:
        port_cmd = [sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                    "print(s.getsockname()[1])"]
        port = int(subprocess.check_output(port_cmd).decode())
        cmd = [sys.executable, "-m", "talora.server.cli", "--port", str(port), "--store", store,
               "--torch-threads", str(args.torch_threads), "--training-threads", str(args.training_threads),
               "--admin-token", ADMIN_TOKEN, "--log-level", "warning"]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--bundle", args.bundle] if args.bundle else []
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return _run(args, f"http://127.0.0.1:{port}", proc, log)
        finally:
            proc.terminate()
            proc.wait(60)


def _run(args, url: str, proc: subprocess.Popen, log) -> int:
    client = httpx.Client(base_url=url, timeout=120)
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError("talora-serve did not become ready:\n" + log.read().decode(errors="replace")[-4000:])
        try:
            if client.get("/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    task = next(t["task"] for t in client.get("/v1/tasks").json()["tasks"] if t["kind"] == "classify")
    texts = [row["text"] for row in support_tickets(20, seed=1)]
    _predicts(client, task, texts, 10)  # warm-up
    idle = _percentiles(_predicts(client, task, texts, args.requests))
    print(f"idle: {idle}", flush=True)
    tic = time.monotonic()
    job = client.post("/v1/training/jobs", headers=AUTH, json={"task": "tickets",
                                                               "examples": support_tickets(args.per_label)}).json()
    job_url = f"/v1/training/jobs/{job['id']}"

    def running() -> bool:
        state = client.get(job_url, headers=AUTH).json()
        return state["status"] == "running" and bool(state["progress"].get("step"))

    while not running():
        status = client.get(job_url, headers=AUTH).json()["status"]
        if status not in ("queued", "running"):
            raise RuntimeError(f"the training job ended before its first step: {status}")
        time.sleep(0.5)
    busy = _percentiles(_predicts(client, task, texts, args.requests, until=running))
    print(f"training: {busy}", flush=True)
    while (done := client.get(job_url, headers=AUTH).json())["status"] in ("queued", "running", "installing"):
        time.sleep(2)
    result = done["result"]
    summary = {"server": {"model": args.model or "smollm2-135m-instruct", "bundle": args.bundle or "demo",
                          "torch_threads": args.torch_threads, "training_threads": args.training_threads},
               "task": task, "idle": idle, "training": busy,
               "p99_ratio": round(busy["p99_ms"] / idle["p99_ms"], 3) if idle["p99_ms"] else None,
               "job": {"status": done["status"], "error": done["error"], "examples": done["examples"],
                       "seconds": round(time.monotonic() - tic, 1), "dev": result.get("dev"),
                       "test": result.get("test"), "test_majority_rate": result.get("test_majority_rate"),
                       "steps": result.get("steps")}}
    write_json(args.out, summary)
    print(summary, flush=True)
    return 0 if done["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
