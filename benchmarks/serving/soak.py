"""Soak test: normal traffic alone, then normal and hostile traffic together, against one talora-serve.

The script starts ``talora-serve`` on 127.0.0.1 (the embedded default model and the demo bundle
unless ``--model`` / ``--bundle`` say otherwise) and runs two phases of ``--minutes`` / 2 each:

1. **calm**: ``--clients`` normal clients in closed loop, each sending a one-text predict (or, one
   request in eight, a short greedy generate) to a demo task and waiting for the answer;
2. **attack**: the same normal clients, and beside them every hostile pattern the server has met:
   bodies declaring 100 MB, chunked bodies past the limit, bodies that stall, request heads sent
   half (hundreds of connections held open), connections beyond the cap, 422 bait (huge lists of
   the wrong type, JSON nested 100k deep), one client sending 64 texts of the request character
   limit again and again, generations abandoned after 0.2 s, bad admin uploads and PUTs.

It reports, per phase, the normal requests sent, failed (any answer but 200: the goal is 0), and
their p50/p99 latency; the ratio of p99 under attack to p99 calm; what the hostile requests were
answered; and the server's open file descriptors and resident memory before and after. Every
loop is bounded in count and time, and traffic goes to 127.0.0.1 only.

    python -m benchmarks.serving.soak --minutes 4             # the demo, 2 min calm + 2 min under attack
    python -m benchmarks.serving.soak --minutes 1 --clients 2 --model DIR --bundle DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import machine_info, write_json

ADMIN_TOKEN = "soak-token"
TEXTS = ["质量非常好，物流也很快，非常满意", "The match ended in a draw after extra time.",
         "Shares fell sharply after the bank's quarterly results.", "I want to book a flight to Berlin",
         "this phone is terrible, the battery died in a day", "Parliament passed the budget on Tuesday."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="total time; half calm, half under attack")
    p.add_argument("--clients", type=int, default=4, help="normal clients (closed loop)")
    p.add_argument("--model", default=None, help="talora-serve --model (default: the embedded default)")
    p.add_argument("--bundle", default=None, help="talora-serve --bundle (default: the demo bundle)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--slow-connections", type=int, default=300, help="request heads sent half, held open")
    p.add_argument("--seed", type=int, default=0, help="seed of the normal clients' choices")
    p.add_argument("--server-args", default="", help="more talora-serve flags, e.g. '--max-batch-tokens 512'")
    p.add_argument("--out", type=Path, default=SERVING_RESULTS / "soak.json", help="summary JSON")
    return p.parse_args(argv)


# ----- the server ------------------------------------------------------------------------------
class Server:
    """``talora-serve`` in a subprocess on a free port of 127.0.0.1, with an empty store of its own."""

    def __init__(self, args: argparse.Namespace, store: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "talora.server.cli", "--host", "127.0.0.1", "--port", str(self.port),
               "--torch-threads", str(args.threads), "--admin-token", ADMIN_TOKEN, "--log-level", "warning",
               "--header-timeout-s", "5", "--body-timeout-s", "5", "--store", str(store)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--bundle", args.bundle] if args.bundle else []
        cmd += shlex.split(args.server_args)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"talora-serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("talora-serve did not become ready")

    def resources(self) -> dict[str, int]:
        """Open file descriptors and resident memory (KiB) of the server process."""
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return {"open_fds": fds, "rss_kib": rss}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----- normal traffic --------------------------------------------------------------------------
QUESTION = "What is it about?"


def body_for(task: str, tasks: dict[str, dict], text: str, **fields: Any) -> dict[str, Any]:
    """A request body for ``task``, with a question where its template asks one."""
    asks = "{question}" in tasks[task]["template"]
    return {"text": text, **({"question": QUESTION} if asks else {}), **fields}


async def normal_client(url: str, tasks: dict[str, dict], until: float, rng: random.Random, index: int,
                        out: list[tuple[float, int]]) -> None:
    """Closed loop: one request at a time; records (latency s, status) of each (status 0: no answer)."""
    classify = [t for t, info in tasks.items() if info["kind"] == "classify"]
    generate = [t for t, info in tasks.items() if info["kind"] != "classify"]
    headers = {"X-Client-Id": f"normal-{index}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                if generate and rng.random() < 1 / 8:
                    task = rng.choice(generate)
                    r = await client.post(f"/v1/tasks/{task}/generate", json=body_for(
                        task, tasks, rng.choice(TEXTS), max_new_tokens=8, temperature=0))
                else:
                    task = rng.choice(classify)
                    r = await client.post(f"/v1/tasks/{task}/predict", json=body_for(task, tasks, rng.choice(TEXTS)))
                status = r.status_code
            except httpx.TransportError:
                status = 0
            out.append((time.monotonic() - start, status))


async def normal_traffic(url: str, tasks: dict[str, dict], seconds: float, clients: int,
                         seed: int) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(normal_client(url, tasks, until, random.Random(seed * 1000 + i), i, out)
                           for i in range(clients)))
    return out


# ----- hostile traffic -------------------------------------------------------------------------
async def raw(port: int, data: bytes, hold_s: float = 0.0, read_s: float = 30.0) -> int:
    """Send ``data`` on a fresh connection, keep it ``hold_s`` s, and return the answer's status (0: none)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    try:
        writer.write(data)
        await writer.drain()
        if hold_s:
            await asyncio.sleep(hold_s)
        line = await asyncio.wait_for(reader.readline(), read_s)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


def _head(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


async def hostile_round(url: str, port: int, task: str, gen_task: str | None, tasks: dict[str, dict], slow: int,
                        answers: Counter) -> None:
    """One round of every hostile pattern; their answers are counted by pattern and status."""
    predict = f"/v1/tasks/{task}/predict"

    async def count(name: str, status_awaitable) -> None:
        answers[f"{name} {await status_awaitable}"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, headers={"X-Client-Id": "attacker"}) as client:
        async def post(path: str, method: str = "POST", **kw: Any) -> int:
            try:
                return (await client.request(method, path, **kw)).status_code
            except httpx.TransportError:
                return 0  # the server closed the connection before the client read an answer

        async def abandoned_generate() -> int:
            if gen_task is None:
                return -1
            try:
                r = await client.post(f"/v1/tasks/{gen_task}/generate", timeout=0.2, json=body_for(
                    gen_task, tasks, "a long story", max_new_tokens=256, temperature=0))
            except httpx.TimeoutException:
                return 499  # the client left, as intended
            return r.status_code

        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        big_text = "字" * (262_144 // 64)
        heavy = {"text": [big_text] * 64}
        deep = "[" * 100_000 + "]" * 100_000
        jobs = [
            count("declared 100 MB body", raw(port, _head("POST", predict, "Content-Length: 104857600\r\n"))),
            count("stalled body", raw(port, _head("POST", predict, "Content-Length: 100\r\n") + b'{"', read_s=30)),
            count("chunked past the limit", post(predict, content=_chunks(), headers={"content-type":
                                                                                     "application/json"})),
            count("huge wrong-type list", post(predict, content=json.dumps({"text": [0] * 400_000}),
                                               headers={"content-type": "application/json"})),
            count("nested 100k deep", post(predict, content=json.dumps({"text": "x"})[:-1] + ', "q": ' + deep + "}",
                                           headers={"content-type": "application/json"})),
            count("heavy 64 long texts", post(predict, json=heavy)),
            count("abandoned generate", abandoned_generate()),
            count("admin PUT without token", post(f"/v1/adapters/{task}", "PUT", json={})),
            count("admin bad upload", post(f"/v1/adapters/{task}", "PUT", headers=admin,
                                           files={"metadata": ("m.json", b'{"task": 1}'),
                                                  "tensors": ("t.safetensors", b"\0" * 100)})),
            *(count("half-sent head", raw(port, f"POST {predict} HTTP/1.1\r\nHost: soak\r\nX-Slow: ".encode(),
                                          read_s=60)) for _ in range(slow)),
        ]
        await asyncio.gather(*jobs)


async def _chunks():
    piece = b"[" + b"0," * 32_000
    for _ in range(200):  # 12.8 MB offered; the server stops reading at max_body_bytes
        yield piece


async def hostile_traffic(url: str, port: int, tasks: dict[str, dict], seconds: float, slow: int) -> Counter:
    answers: Counter = Counter()
    classify = sorted(t for t, info in tasks.items() if info["kind"] == "classify")
    gen_task = next((t for t, info in sorted(tasks.items()) if info["kind"] != "classify"), None)
    until, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < until and rounds < 1000:
        await hostile_round(url, port, classify[rounds % len(classify)], gen_task, tasks, slow, answers)
        rounds += 1
    answers["rounds"] = rounds
    return answers


# ----- the two phases --------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_summary(results: list[tuple[float, int]]) -> dict[str, Any]:
    ok = [latency for latency, status in results if status == 200]
    return {"sent": len(results), "failed": len(results) - len(ok),
            "failed_by_status": dict(Counter(str(s) for _, s in results if s != 200)),
            "p50_s": percentile(ok, 0.5), "p99_s": percentile(ok, 0.99)}


async def run(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    listing = httpx.get(server.url + "/v1/tasks", timeout=30).json()
    tasks = {t["task"]: t for t in listing["tasks"]}
    half = args.minutes * 60 / 2
    before = server.resources()
    print(f"calm: {args.clients} normal clients for {half:.0f} s", flush=True)
    calm = await normal_traffic(server.url, tasks, half, args.clients, args.seed)
    print(f"attack: the same clients and hostile traffic for {half:.0f} s", flush=True)
    attacked, hostile = await asyncio.gather(
        normal_traffic(server.url, tasks, half, args.clients, args.seed + 1),
        hostile_traffic(server.url, server.port, tasks, half, args.slow_connections))
    await asyncio.sleep(6)  # let the header and body timers close what the attack left
    after = server.resources()
    alive = httpx.get(server.url + "/health", timeout=30).status_code == 200
    calm_s, attack_s = phase_summary(calm), phase_summary(attacked)
    ratio = (attack_s["p99_s"] / calm_s["p99_s"]) if calm_s["p99_s"] and attack_s["p99_s"] else None
    return {"calm": calm_s, "attack": attack_s, "p99_attack_over_calm": ratio,
            "normal_failed_total": calm_s["failed"] + attack_s["failed"], "hostile_answers": dict(hostile),
            "server_before": before, "server_after": after, "alive_after": alive, "tasks": sorted(tasks),
            "minutes": args.minutes, "clients": args.clients, "server_args": args.server_args,
            "machine": machine_info(args.threads)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as store:
        server = Server(args, Path(store))
        try:
            server.wait_ready()
            summary = asyncio.run(run(args, server))
        finally:
            server.stop()
    write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("calm", "attack", "p99_attack_over_calm", "normal_failed_total",
                                             "alive_after", "server_before", "server_after")}, indent=2))
    print("hostile answers:", json.dumps(summary["hostile_answers"], indent=2, ensure_ascii=False))
    return 0 if summary["normal_failed_total"] == 0 and summary["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
