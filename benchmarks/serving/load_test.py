"""Open-loop HTTP load test of talora-serve: Poisson arrivals, Zipf task popularity, a rate sweep.

For each arrival rate, requests are sent at exponential inter-arrival times (open loop: a slow
server does not slow the sender) to ``POST /v1/tasks/<task>/predict``, with the task drawn from a
Zipf(1.0) law over the served tasks and the text drawn from real task inputs of 16..128 tokens.
Per rate it writes one JSONL row: offered and achieved rate, p50/p95/p99 latency of successful
requests, goodput (successes within ``--slo-ms`` per second) and errors by status. It then plots
latency against offered load (PNG) and reports the knee: the highest rate up to which every rate
of the sweep has no errors, p99 within the SLO and its backlog at the end of sending cleared
within the SLO. ``--from-jsonl`` rebuilds summary, knee and plot from the JSONL rows of earlier
runs (e.g. two sweeps over different rate ranges) without sending anything.

``--hot-swap-every-s S`` replaces adapters (``PUT /v1/adapters/<task>`` alternating between two
versions in the store) every S seconds while one rate runs, and reports failed requests and the
latency blip: p99 of requests sent within 0.5 s after a swap against p99 of the rest.

With ``--start-server`` the script builds a random 64-task bundle (with alternate versions),
starts ``talora-serve`` on 127.0.0.1 in a subprocess and stops it at the end.

    python -m benchmarks.serving.load_test --start-server --rates 1,2,4,8 --duration-s 30
    python -m benchmarks.serving.load_test --start-server --rates 3 --duration-s 30 --hot-swap-every-s 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import append_jsonl, machine_info, pyplot, write_json
from benchmarks.harness.request_set import real_request_set, zipf_weights

ADMIN_TOKEN = "load-test-token"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (127.0.0.1 only)")
    p.add_argument("--start-server", action="store_true", help="build a random bundle and start talora-serve")
    p.add_argument("--port", type=int, default=8765, help="port of the started server")
    add_flags(p, threads=1, helps={"threads": "torch threads of the started server"})
    p.add_argument("--num-tasks", type=int, default=64, help="tasks in the started server's bundle")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="frozen model of the started server: the embedded default or a checkpoint folder")
    p.add_argument("--server-args", default="",
                   help="more talora-serve flags for the started server, e.g. '--device cuda --cuda-graphs'")
    p.add_argument("--generate", type=int, default=0,
                   help="send POST /v1/completions for this many greedy tokens instead of predict (0: predict)")
    p.add_argument("--rates", default="1,2,4,8", help="comma list of arrival rates, requests/s")
    p.add_argument("--duration-s", type=float, default=30.0, help="sending time per rate")
    p.add_argument("--slo-ms", type=float, default=2000.0, help="latency bound counted as goodput")
    p.add_argument("--timeout-s", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--hot-swap-every-s", type=float, default=0.0, help="replace adapters this often (0: off)")
    p.add_argument("--swap-tasks", type=int, default=8, help="how many of the most popular tasks get swapped")
    add_flags(p, seed=0, jsonl=SERVING_RESULTS / "load_test.jsonl",
              helps={"seed": "seed of arrivals, tasks and texts", "jsonl": "rows per rate"})
    p.add_argument("--plot", type=Path, default=SERVING_RESULTS / "load_test.png", help="latency-vs-load PNG")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BASE", "OTHER"),
                   help="send nothing: compare the sweeps of two summaries per rate (goodput, p99), into --summary")
    p.add_argument("--from-jsonl", action="store_true",
                   help="send nothing: rebuild the summary, knee and plot from the sweep rows in --jsonl")
    p.add_argument("--summary", type=Path, default=SERVING_RESULTS / "load_test.json",
                   help="summary JSON; a sweep fills its 'sweep' entry, a hot-swap run its 'hot_swap' entry")
    return p.parse_args(argv)


def request_texts(num: int, seed: int) -> list[str]:
    """Real task inputs cut to 16..128 tokens (the serve_bench length law), as text."""
    from talora.adapters.model.loading import load_model

    tokenizer: Any = load_model().tokenizer
    requests = real_request_set(tokenizer, num, 16, 128, seed)
    return [tokenizer.decode(r.input_ids) for r in requests]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run_rate(client, rate: float, args, tasks: list[str], texts: list[str], swap=None) -> dict:
    """Send Poisson arrivals at ``rate`` for ``duration_s``; returns the row of this rate."""

    rng = random.Random(args.seed + int(rate * 1000))
    weights = zipf_weights(len(tasks))
    results: list[tuple[float, float, int]] = []  # (sent, latency, status)
    failures: list[dict] = []  # each failed request: when, task, status, what came back

    async def one(task: str, text: str) -> None:
        sent = time.monotonic()
        try:
            if args.generate:
                response = await client.post("/v1/completions", json={
                    "model": task, "prompt": text, "max_tokens": args.generate, "temperature": 0})
            else:
                response = await client.post(f"/v1/tasks/{task}/predict", json={"text": text})
            status, detail = response.status_code, response.text[:300] if response.status_code != 200 else ""
        except Exception as exc:  # noqa: BLE001 - any transport failure is an error of this request
            status, detail = -1, f"{type(exc).__name__}: {exc}"[:300]
        results.append((sent, time.monotonic() - sent, status))
        if status != 200:
            failures.append({"sent_s": sent - started, "task": task, "status": status, "detail": detail})

    started = time.monotonic()
    swapper = asyncio.create_task(swap(started)) if swap else None
    pending, next_at = [], started
    while True:
        next_at += rng.expovariate(rate)
        if next_at - started > args.duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        task = rng.choices(tasks, weights=weights)[0]
        pending.append(asyncio.create_task(one(task, rng.choice(texts))))
    sending_s = time.monotonic() - started
    if swapper:
        swapper.cancel()
    await asyncio.gather(*pending)
    ok = [lat for _, lat, status in results if status == 200]
    errors: dict[str, int] = {}
    for _, _, status in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    span = max(sending_s, max((s + lat for s, lat, _ in results), default=started) - started)
    return {"offered_rate": rate, "sent": len(results), "sent_rate": len(results) / sending_s, "ok": len(ok),
            "errors": errors, "drain_s": span - sending_s,
            "achieved_rate": len(ok) / span, "goodput": sum(1 for lat in ok if lat * 1e3 <= args.slo_ms) / span,
            "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)), "p99_ms": _ms(percentile(ok, 99)),
            "mean_ms": _ms(statistics.fmean(ok) if ok else None), "slo_ms": args.slo_ms,
            "max_ms": _ms(max(ok) if ok else None), "duration_s": args.duration_s,
            "failures": failures[:50], "loadavg_1_5_15": os.getloadavg(), "_results": results}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def make_swapper(client, tasks: list[str], every_s: float, log: list[tuple[float, int]]):
    """Coroutine factory: PUT alternate versions of ``tasks`` round-robin every ``every_s``."""
    async def swap(started: float) -> None:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        for count in range(10**9):
            await asyncio.sleep(max(0.0, started + (count + 1) * every_s - time.monotonic()))
            task = tasks[count % len(tasks)]
            path = f"alt/{task}" if (count // len(tasks)) % 2 == 0 else task
            at = time.monotonic()
            try:
                response = await client.put(f"/v1/adapters/{task}", json={"path": path}, headers=headers)
                status = response.status_code
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a transport failure is a failed swap
                status = -1
            log.append((at, status))
    return swap


def swap_report(row: dict, swaps: list[tuple[float, int]], window_s: float = 0.5) -> dict:
    """Failed requests, and p99 latency of requests sent within ``window_s`` after a swap vs the rest."""
    swap_times = [at for at, _ in swaps]
    near: list[float] = []
    far: list[float] = []
    for sent, latency, status in row["_results"]:
        if status != 200:
            continue
        after = any(0 <= sent - at <= window_s for at in swap_times)
        (near if after else far).append(latency)
    return {"swaps": len(swaps), "swap_failures": sum(1 for _, s in swaps if s != 200), "window_s": window_s,
            "failed_requests": row["sent"] - row["ok"], "p99_ms_after_swap": _ms(percentile(near, 99)),
            "max_ms_after_swap": _ms(max(near, default=None)), "max_ms_otherwise": _ms(max(far, default=None)),
            "p99_ms_otherwise": _ms(percentile(far, 99)), "p50_ms_after_swap": _ms(percentile(near, 50)),
            "p50_ms_otherwise": _ms(percentile(far, 50)), "requests_after_swap": len(near)}


def drain_s(row: dict) -> float:
    """Seconds from the end of sending until the last answer: how far the server fell behind."""
    if row.get("drain_s") is not None:
        return row["drain_s"]
    # rows without it: from the achieved rate (answers over the whole span) and the sending time
    span = row["ok"] / row["achieved_rate"] if row["ok"] and row["achieved_rate"] else float("inf")
    return span - row["duration_s"]


def keeps_up(row: dict) -> bool:
    """No errors, p99 within the SLO, and the backlog at the end of sending cleared within the SLO.

    The count of a Poisson window varies (25 s at 1 request/s: 25 ± 5 arrivals), so the achieved
    rate is not compared with the offered one; a server that falls behind shows as a growing
    backlog (drain time) and latency.
    """
    return (not row["errors"] and row["p99_ms"] is not None and row["p99_ms"] <= row["slo_ms"]
            and drain_s(row) * 1e3 <= row["slo_ms"])


def find_knee(rows: list[dict]) -> float | None:
    """The highest offered rate below which every rate of the sweep keeps up (``keeps_up``)."""
    knee = None
    for row in sorted(rows, key=lambda r: r["offered_rate"]):
        if not keeps_up(row):
            break
        knee = row["offered_rate"]
    return knee


def plot(rows: list[dict], path: Path, knee: float | None) -> None:
    plt = pyplot()

    rates = [r["offered_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        values = [float("nan") if r[key] is None else r[key] for r in rows]
        ax.plot(rates, values, marker="o", label=key.replace("_ms", ""))
    ax.set_xlabel("offered load, requests/s (Poisson)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    if knee is not None:
        ax.axvline(knee, color="grey", linestyle="--", label=f"knee {knee:g} req/s")
    twin = ax.twinx()
    twin.plot(rates, [r["goodput"] for r in rows], color="black", marker="x", linestyle=":", label="goodput")
    twin.set_ylabel("goodput, requests/s within SLO")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1], loc="upper left")
    ax.set_title("talora-serve, prefill/score requests, Zipf(1.0) over tasks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    """Random bundle (with alternates) + ``talora-serve`` on 127.0.0.1:``port``; returns (process, tasks)."""
    import httpx

    from benchmarks.harness.bundle import task_name, write_random_bundle
    from talora.adapters.model.config import TaloraConfig
    from talora.adapters.model.loading import load_model

    loaded = load_model(args.model)
    cfg = TaloraConfig(shared_prompt_len=64, task_prompt_len=16, rank=8)
    bundle = write_random_bundle(loaded.model, loaded.fingerprint, workdir / "bundle", args.num_tasks, cfg,
                                 args.seed, alternates=args.swap_tasks)
    cmd = [sys.executable, "-m", "talora.server.cli", "--bundle", str(bundle), "--model", args.model,
           "--host", "127.0.0.1", "--port", str(args.port),
           "--torch-threads", str(args.threads), "--num-slots", str(args.num_tasks), "--max-queue", "100000",
           "--request-timeout-s", str(args.timeout_s), "--log-level", "warning", *shlex.split(args.server_args)]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TALORA_ADMIN_TOKEN": ADMIN_TOKEN})
    args.url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"talora-serve exited: {(workdir / 'server.log').read_text()[-2000:]}")
        try:
            listing = httpx.get(f"{args.url}/v1/tasks", timeout=2)
            # ready once every task's KV is in a slot: the worker warms them after start-up
            if listing.status_code == 200 and all(t["resident"] for t in listing.json()["tasks"]):
                return proc, [task_name(i) for i in range(args.num_tasks)]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("talora-serve did not become ready in 300 s")


async def sweep(args, tasks: list[str], texts: list[str]) -> list[dict]:
    import httpx


    rows = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout_s, limits=limits) as client:
        await client.post(f"/v1/tasks/{tasks[0]}/predict", json={"text": texts[0]})  # warm-up
        for rate in [float(r) for r in args.rates.split(",") if r]:
            swaps: list[tuple[float, int]] = []
            swap = make_swapper(client, tasks[: args.swap_tasks], args.hot_swap_every_s, swaps) \
                if args.hot_swap_every_s > 0 else None
            row = await run_rate(client, rate, args, tasks, texts, swap)
            if swap:
                row["hot_swap"] = swap_report(row, swaps)
            row.pop("_results")
            row.update(kind="hot_swap" if swap else "sweep", num_tasks=len(tasks), machine=machine_info(args.threads))
            append_jsonl(args.jsonl, row)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "machine"}, flush=True)
    return rows


def compare_sweeps(base: dict, other: dict) -> list[dict]:
    """Per offered rate of two ``sweep`` entries (e.g. eager and ``--cuda-graphs``): goodput and p99 of
    each and their ratios ``other / base``."""
    def ratio(ref: dict, row: dict, key: str) -> float | None:
        a, b = ref.get(key), row.get(key)
        return None if not a or b is None else b / a

    rows = []
    by_rate = {r["offered_rate"]: r for r in base["rows"]}
    for row in other["rows"]:
        ref = by_rate.get(row["offered_rate"])
        if ref is not None:
            rows.append({"offered_rate": row["offered_rate"], "goodput": [ref["goodput"], row["goodput"]],
                         "p99_ms": [ref["p99_ms"], row["p99_ms"]], "errors": [ref["errors"], row["errors"]],
                         "goodput_ratio": ratio(ref, row, "goodput"), "p99_ratio": ratio(ref, row, "p99_ms")})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        import json

        base, other = (json.loads(Path(f).read_text())["sweep"] for f in args.compare)
        rows = compare_sweeps(base, other)
        for row in rows:
            print(f"{row['offered_rate']:g} req/s: goodput {row['goodput'][0]:.2f} -> {row['goodput'][1]:.2f} "
                  f"({row['goodput_ratio']}), p99 {row['p99_ms'][0]} -> {row['p99_ms'][1]} ms ({row['p99_ratio']})")
        write_json(args.summary, {"base": str(args.compare[0]), "other": str(args.compare[1]), "rows": rows})
        return
    if args.from_jsonl:
        import json

        rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("kind") == "sweep"]
        no_names: list[str | None] = [None] * (rows[0]["num_tasks"] if rows else 0)
        report(args, rows, no_names, argv)
        return
    texts = request_texts(512, args.seed)
    with tempfile.TemporaryDirectory(prefix="load_test_") as tmp:
        proc, tasks = start_server(args, Path(tmp)) if args.start_server else (None, None)
        if tasks is None:
            import httpx

            tasks = [t["task"] for t in httpx.get(f"{args.url}/v1/tasks", timeout=10).json()["tasks"]]
        try:
            rows = asyncio.run(sweep(args, tasks, texts))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    report(args, rows, tasks, argv)


def report(args, rows: list[dict], tasks: list, argv) -> None:
    """Knee and plot (a sweep), and the summary JSON entry of this run."""
    command = " ".join(["python -m benchmarks.serving.load_test", *(argv if argv is not None else sys.argv[1:])])
    summary = {"command": command, "model": args.model, "server_args": args.server_args,
               "request": f"completions, {args.generate} greedy tokens" if args.generate else "predict",
               "slo_ms": args.slo_ms, "num_tasks": len(tasks), "threads": args.threads,
               "machine": rows[0]["machine"] if rows else None,
               "rows": [{k: v for k, v in r.items() if k not in ("machine",)} for r in rows]}
    for row in summary["rows"]:
        row["drain_s"], row["keeps_up"] = drain_s(row), keeps_up(row)
    if args.hot_swap_every_s <= 0:
        knee = find_knee(rows) if rows else None
        if len(rows) > 1:
            plot(rows, args.plot, knee)
            summary["plot"] = args.plot.name
        summary["knee_requests_per_s"] = knee
        print(f"knee: {knee} requests/s (no errors, p99 and backlog drain <= {args.slo_ms} ms); plot: {args.plot}")
    else:
        summary["hot_swap_every_s"] = args.hot_swap_every_s
    write_summary(args.summary, "hot_swap" if args.hot_swap_every_s > 0 else "sweep", summary)


def write_summary(path: Path, key: str, entry: dict) -> None:
    """Set ``key`` of the summary JSON at ``path``, keeping its other entries."""
    import json


    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = entry
    write_json(path, data)


if __name__ == "__main__":
    main()
