"""scale_out: talora on Ray Serve: two replicas against one, task-affine routing against random.

On a local Ray cluster bound to 127.0.0.1, for each task count (default 64 and 1,000 random
classify tasks of one random bundle on the embedded SmolLM2-135M-Instruct, float32, CPU) and each
setup, in one run:

  one          1 replica of 1 torch thread, requests multiplexed by task@version
  one_fair     1 replica of 2 torch threads (the threads of ``two`` together): the fair baseline
  two          2 replicas of 1 thread each, multiplexed by task@version (task-affine)
  two_random   2 replicas of 1 thread each, Serve's default routing (no model id)

Traffic: closed loop, ``--concurrency`` clients sending ``POST /v1/tasks/<task>/predict`` (one
text, 12..40 words) through Serve's HTTP proxy for ``--duration-s`` after ``--warmup-requests``;
tasks drawn from Zipf(``--zipf-exponent``) over the tasks, the same seeded sequence for every
setup. Measured: requests per second, latency p50/p99, and the slot hit rate (the replicas'
``talora_slot_hits / (hits + misses)`` over the measured phase, read from the ingress's merged
``/metrics``; a ``/metrics`` that fails or does not parse leaves the hit rate unknown and says why
in the row, and the run goes on). Every setup runs ``--repeats`` times, the setups' order rotated
each round; a row holds the median, the runs and their range. Ratios (medians of the same run,
with their range over the rounds): ``two_replicas_vs_one_fair`` = two / one_fair requests per
second (the fair comparison: the same threads in total), ``two_replicas_vs_one`` = two / one, and
``affine_vs_random_hit_rate`` = two / two_random hit rate, per task count. The load average of
the machine before and after each run is recorded (a shared machine's other jobs show there).

Kill rows (``--kills replica,ingress``, on the first task count, once): two replicas and two
ingresses, task-affine; the same closed loop, with a client that retries what docs/scale_out.md
promises (``retry_delay``: 503 with Retry-After, Serve's bare 500 for a dead ingress, a failed
connection; at most ``--kill-tries`` sends). After ``--kill-after-s`` of load one replica (or one
ingress) gets SIGKILL; the load goes on for ``--kill-duration-s``, and for a replica kill until the
replacement has answered (``--kill-timeout-s`` bounds it all). A row: requests, ``failed`` (final
answer not 200 after the retries), retries by status, ``seconds_to_replacement`` (the kill to Serve
reporting the replacement RUNNING), ``seconds_to_new_answer`` (the kill to the replacement's first
answer; replica kill only), ``new_replica_share`` (its share of the answers after that), and the
longest stretch without an answer after the kill.

    python -m benchmarks.serving.scale_out --tasks 64,1000 --duration-s 30 --concurrency 32
    python -m benchmarks.serving.scale_out --model /path/to/tiny --tasks 8 --duration-s 2   # a smoke run
    python -m benchmarks.serving.scale_out --replica-gpus 1 --cluster-cpus 4           # a machine with 2 GPUs
    python -m benchmarks.serving.scale_out --tasks 64 --setups "" --kills replica,ingress   # the kill rows only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.bundle import task_name, write_random_bundle
from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import append_jsonl, machine_info, package_version, ratio, write_json
from benchmarks.harness.request_set import assign_tasks

PREDICT = "/v1/tasks/{task}/predict"
SETUPS = {"one": (1, "task", 1), "one_fair": (1, "task", 2), "two": (2, "task", 1),
          "two_random": (2, "random", 1)}  # replicas, routing, torch threads per replica
RATIOS = {"two_replicas_vs_one_fair": ("two", "one_fair", "requests_per_s"),
          "two_replicas_vs_one": ("two", "one", "requests_per_s"),
          "affine_vs_random_hit_rate": ("two", "two_random", "slot_hit_rate")}
METRICS_TRIES = 3
KILLS = {"replica": "TaloraReplica", "ingress": "TaloraIngress"}  # kill row -> the Serve deployment killed
WORDS = ("the match was late and the crowd left early while prices rose again across the region as "
         "new rules for banks came into force and the film won praise from critics at the festival").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--tasks", default="64,1000", help="task counts, comma-separated")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"setups among {', '.join(SETUPS)}")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (the embedded default or a folder)")
    p.add_argument("--num-slots", type=int, default=8, help="task-KV slots per replica")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests one replica takes at once (default: --concurrency)")
    p.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per setup")
    p.add_argument("--warmup-requests", type=int, default=64, help="requests before measuring")
    p.add_argument("--zipf-exponent", type=float, default=1.0, help="task popularity ~ rank ** -exponent")
    p.add_argument("--cluster-cpus", type=int, default=2, help="CPUs of the local Ray cluster (one per replica "
                   "thread)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every setup (order rotated each round)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (a GPU machine: 1)")
    p.add_argument("--kills", default="replica,ingress", help=f"kill rows among {', '.join(KILLS)} ('' : none)")
    p.add_argument("--kill-after-s", type=float, default=5.0, help="seconds of load before the kill")
    p.add_argument("--kill-duration-s", type=float, default=20.0, help="seconds of load after the kill")
    p.add_argument("--kill-timeout-s", type=float, default=180.0, help="the most a kill row runs after the kill")
    p.add_argument("--kill-tries", type=int, default=6, help="sends of one request at most (the client's retries)")
    add_flags(p, seed=0, out=SERVING_RESULTS / "scale_out.json", jsonl=None,
              helps={"seed": "seed of the task sequence and the texts",
                     "jsonl": "also append one JSONL row per setup here"})
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(12, 40))) for _ in range(count)]


def make_store(model: str, folder: Path, num_tasks: int) -> Path:
    """A random bundle with ``num_tasks`` classify tasks (the store every replica reads)."""
    from talora.adapters.model.loading import load_model

    lm = load_model(model)
    return write_random_bundle(lm.model, lm.fingerprint, folder, num_tasks, base_model=lm.name)


async def drive(url: str, schedule: list[int], texts: list[str], concurrency: int, duration_s: float | None,
                limit: int | None = None) -> dict:
    """Closed loop: ``concurrency`` clients, each sending the next request of ``schedule`` until time is up."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    position = [0]
    start = time.perf_counter()
    end = start + duration_s if duration_s else float("inf")

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < end and (limit is None or position[0] < limit):
            i, position[0] = position[0], position[0] + 1
            task, text = task_name(schedule[i % len(schedule)]), texts[i % len(texts)]
            sent = time.perf_counter()
            try:
                r = await client.post(f"/v1/tasks/{task}/predict", json={"text": text})
                status = str(r.status_code)
            except httpx.TransportError as exc:
                status = type(exc).__name__
            if status == "200":
                latencies.append(time.perf_counter() - sent)
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - start, "completed": len(latencies), "errors": errors,
            "latencies": latencies}


class MetricsUnavailable(RuntimeError):
    """``/metrics`` did not answer 200 with Prometheus text in ``METRICS_TRIES`` tries."""


def parse_counts(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """({"hits", "misses"} summed over the replicas, predict requests by replica) of merged ``/metrics`` text;
    ``ValueError`` when it is not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, dict[str, float]] = {"talora_slot_hits": {}, "talora_slot_misses": {}, "talora_requests": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples if family.name in counts else []:
            if sample.name.endswith("_total") and sample.labels.get("endpoint", PREDICT) == PREDICT:
                by_replica = counts[family.name]
                replica = sample.labels.get("replica", "-")
                by_replica[replica] = by_replica.get(replica, 0.0) + sample.value
    hits, misses, requests = counts["talora_slot_hits"], counts["talora_slot_misses"], counts["talora_requests"]
    return {"hits": sum(hits.values()), "misses": sum(misses.values())}, requests


def replica_counts(url: str, wait_s: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """``parse_counts`` of the merged ``/metrics`` once every replica has pushed; ``MetricsUnavailable``."""
    import httpx

    if wait_s is None:
        from talora.server.backends.ray.serve import METRICS_PUSH_S

        wait_s = METRICS_PUSH_S + 0.5
    time.sleep(wait_s)  # every replica has pushed its counters since
    problem = ""
    for attempt in range(METRICS_TRIES):
        try:
            r = httpx.get(f"{url}/metrics", timeout=30)
            if r.status_code == 200:
                return parse_counts(r.text)
            problem = f"/metrics answered {r.status_code}"
        except (httpx.TransportError, ValueError) as exc:
            problem = f"/metrics failed: {type(exc).__name__}: {exc}"[:200]
        time.sleep(1.0 + attempt)
    raise MetricsUnavailable(problem)


def run_setup(url: str, args, store: Path, name: str, schedule: list[int], texts: list[str]) -> dict:
    from ray import serve

    from talora.server.backends.ray.serve import build_app
    from talora.server.backends.ray.support import RayOptions
    from talora.server.settings import Settings

    replicas, routing, threads = SETUPS[name]
    settings = Settings(model=args.model, bundle=store, num_slots=args.num_slots, torch_threads=threads,
                        max_queue=4 * args.concurrency, log_level="warning")
    options = RayOptions(replicas=replicas, replica_cpus=threads, replica_gpus=args.replica_gpus, routing=routing,
                         access_log=False, max_ongoing_requests=args.max_ongoing_requests or args.concurrency)
    load_before = os.getloadavg()
    serve.run(build_app(settings, options), name="talora", route_prefix="/")
    counts, metrics_error = [], None
    try:
        asyncio.run(drive(url, schedule, texts, args.concurrency, None, limit=args.warmup_requests))
        for phase in ("before", "after"):
            if phase == "after":
                measured = asyncio.run(drive(url, schedule[args.warmup_requests:], texts, args.concurrency,
                                             args.duration_s))
            try:
                counts.append(replica_counts(url))
            except MetricsUnavailable as exc:
                metrics_error = str(exc)
    finally:
        serve.delete("talora")
    lat = sorted(measured["latencies"]) or [float("nan")]
    row = {"setup": name, "replicas": replicas, "routing": routing, "threads_per_replica": threads,
           "num_tasks": len(set(schedule)), "requests_per_s": measured["completed"] / measured["seconds"],
           "completed": measured["completed"], "errors": measured["errors"], "seconds": measured["seconds"],
           "latency_p50_ms": 1e3 * statistics.median(lat), "latency_p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))],
           "slot_hits": None, "slot_misses": None, "slot_hit_rate": None, "replica_shares": [],
           "metrics_error": metrics_error, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    if metrics_error is None:
        (slots0, requests0), (slots1, requests1) = counts
        hits, misses = slots1["hits"] - slots0["hits"], slots1["misses"] - slots0["misses"]
        served = sorted((n - requests0.get(r, 0.0) for r, n in requests1.items()), reverse=True)
        row.update(slot_hits=hits, slot_misses=misses, slot_hit_rate=hits / (hits + misses) if hits + misses else None,
                   replica_shares=[n / sum(served) for n in served] if sum(served) else [])
    return row


async def send_with_retries(client, path: str, body: dict, tries: int,
                            sleep=asyncio.sleep) -> tuple[int | None, str | None, list[str]]:
    """POST until the answer is final (``retry_delay``) or ``tries`` sends: (status, replica, retried statuses)."""
    import httpx

    from talora.server.backends.ray.support import retry_delay

    retried: list[str] = []
    status, replica = None, None
    for _ in range(tries):
        try:
            r = await client.post(path, json=body)
            status, replica = r.status_code, r.headers.get("x-talora-replica")
            delay = retry_delay(r.status_code, r.headers, r.content)
        except httpx.TransportError:
            status, replica, delay = None, None, retry_delay(None)
        if delay is None:
            break
        retried.append(str(status))
        await sleep(delay)
    return status, replica, retried


def kill_summary(answers: list[tuple[float, int | None, str | None]], killed_at: float, before: set[str],
                 replaced_at: float | None) -> dict:
    """A kill row's measures from the final answers ``(finished at, status, replica)`` of the loop."""
    after = sorted(a for a in answers if a[0] > killed_at)
    ok_times = [killed_at] + [t for t, status, _ in after if status == 200]
    new = [t for t, status, replica in after if status == 200 and replica is not None and replica not in before]
    later = [replica for t, status, replica in after if status == 200 and new and t > new[0]]
    return {"requests": len(answers), "requests_after_kill": len(after),
            "failed": sum(1 for _, status, _ in answers if status != 200),
            "failed_statuses": sorted({str(status) for _, status, _ in answers if status != 200}),
            "seconds_to_replacement": None if replaced_at is None else replaced_at - killed_at,
            "seconds_to_new_answer": new[0] - killed_at if new else None,
            "new_replica_share": (sum(r not in before for r in later) / len(later)) if later else None,
            "longest_gap_s": max(b - a for a, b in zip(ok_times, ok_times[1:])) if len(ok_times) > 1 else None}


def replacement_watch(app: str, deployment: str, names_before: set[str], count: int):
    """A thread that records when ``deployment`` has a replica not in ``names_before`` and ``count`` RUNNING."""
    import threading

    from ray import serve

    from talora.server.backends.ray.faults import replica_names

    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and "at" not in seen:
            try:
                states: dict = serve.status().applications[app].deployments[deployment].replica_states  # str enum keys
                if set(replica_names(app, deployment)) - names_before and states.get("RUNNING", 0) >= count:
                    seen["at"] = time.monotonic()
            except Exception:  # noqa: BLE001 - the controller is busy or the app is going: poll again
                pass
            stop.wait(0.25)

    threading.Thread(target=poll, name=f"watch-{deployment}", daemon=True).start()
    return seen, stop


def run_kill(url: str, args, store: Path, target: str, schedule: list[int], texts: list[str]) -> dict:
    """One kill row: the load through a SIGKILL of one ``target`` (``KILLS``), bounded by ``--kill-timeout-s``."""
    import httpx
    from ray import serve

    from talora.server.backends.ray.faults import kill_replica, replica_names
    from talora.server.backends.ray.serve import build_app
    from talora.server.backends.ray.support import RayOptions
    from talora.server.settings import Settings

    deployment = KILLS[target]
    settings = Settings(model=args.model, bundle=store, num_slots=args.num_slots, torch_threads=1,
                        max_queue=4 * args.concurrency, log_level="warning")
    options = RayOptions(replicas=2, ingress_replicas=2, replica_cpus=1, replica_gpus=args.replica_gpus,
                         access_log=False, max_ongoing_requests=args.max_ongoing_requests or args.concurrency)
    load_before = os.getloadavg()
    serve.run(build_app(settings, options), name="talora", route_prefix="/")
    answers: list[tuple[float, int | None, str | None]] = []
    retried: dict[str, int] = {}
    state: dict = {}
    try:
        asyncio.run(drive(url, schedule, texts, args.concurrency, None, limit=args.warmup_requests))

        def finished() -> bool:
            killed_at = state.get("killed_at")
            if killed_at is None:
                return False
            now = time.monotonic()
            if now > killed_at + args.kill_timeout_s:
                return True
            waiting = target == "replica" and not any(r not in state["before"] for _, s, r in answers if s == 200)
            return now > killed_at + args.kill_duration_s and not waiting

        async def loop(client: httpx.AsyncClient, position: list[int]) -> None:
            while not finished():
                i, position[0] = position[0], position[0] + 1
                task = task_name(schedule[(args.warmup_requests + i) % len(schedule)])
                status, replica, again = await send_with_retries(client, PREDICT.format(task=task),
                                                                 {"text": texts[i % len(texts)]}, args.kill_tries)
                answers.append((time.monotonic(), status, replica))
                for s in again:
                    retried[s] = retried.get(s, 0) + 1

        async def kill() -> None:
            await asyncio.sleep(args.kill_after_s)
            state["before"] = {r for _, s, r in answers if r is not None}
            names = set(replica_names("talora", deployment))
            state["victim"] = await asyncio.to_thread(kill_replica, "talora", deployment)
            state["killed_at"] = time.monotonic()
            state["watch"] = replacement_watch("talora", deployment, names, 2)

        async def main_loop() -> None:
            position = [0]
            limits = httpx.Limits(max_connections=args.concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                await asyncio.gather(kill(), *(loop(client, position) for _ in range(args.concurrency)))

        asyncio.run(main_loop())
        seen, stop = state["watch"]
        deadline = state["killed_at"] + args.kill_timeout_s
        while "at" not in seen and time.monotonic() < deadline:  # an ingress's replacement: bounded wait
            time.sleep(0.5)
        stop.set()
    finally:
        serve.delete("talora")
    row = {"setup": f"kill_{target}", "killed": deployment, "victim": state.get("victim"),
           "concurrency": args.concurrency, "tries": args.kill_tries, "retried": retried,
           **kill_summary(answers, state["killed_at"], state["before"], state["watch"][0].get("at")),
           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    return row


def combine(runs: list[dict]) -> dict:
    """One setup's row over its repeated runs: the median of each measure, the runs, and the range."""
    row = dict(runs[len(runs) // 2])
    for key in ("requests_per_s", "latency_p50_ms", "latency_p99_ms", "slot_hit_rate"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
        if key == "requests_per_s" and values:
            row["requests_per_s_range"] = [min(values), max(values)]
    row["repeats"] = len(runs)
    row["runs"] = runs
    return row


def summarise(args, rows: dict[str, dict[str, dict]], machine: dict, kills: dict[str, dict] | None = None) -> dict:
    """The summary JSON: rows by mix and setup, and the two ratios per mix (None where a setup is missing)."""
    def get(mix: str, setup: str, key: str):
        return rows[mix].get(setup, {}).get(key)

    ratios: dict[str, dict[str, float | None]] = {name: {} for name in RATIOS}
    ranges: dict[str, dict[str, list[float]]] = {name: {} for name in RATIOS}
    for mix in rows:
        for name, (a, b, key) in RATIOS.items():
            ratios[name][mix] = ratio(get(mix, a, key), get(mix, b, key))
            rounds = zip(rows[mix].get(a, {}).get("runs", []), rows[mix].get(b, {}).get("runs", []))
            values = [v for v in (ratio(ra.get(key), rb.get(key)) for ra, rb in rounds) if v is not None]
            if values:
                ranges[name][mix] = [min(values), max(values)]
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "jsonl")}
    return {"setup": setup, "machine": machine, "ratios": ratios, "ratio_ranges": ranges, "rows": rows,
            "kills": kills or {},
            "notes": {"goal": "two_replicas_vs_one_fair >= 1.7 on a machine with free cores; kill rows: 0 failed",
                      "cpu": "replicas, Serve's proxy and ingress, and the load client share the machine's cores"}}


def main(argv=None) -> int:
    args = parse_args(argv)
    setups, kill_targets = [s for s in args.setups.split(",") if s], [k for k in args.kills.split(",") if k]
    unknown = [name for name in setups if name not in SETUPS] + [k for k in kill_targets if k not in KILLS]
    if unknown:
        print(f"scale_out: unknown setups or kills: {', '.join(unknown)}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    counts = [int(c) for c in args.tasks.split(",")]
    kills: dict[str, dict] = {}
    texts = make_texts(512, args.seed)
    rows: dict[str, dict[str, dict]] = {}
    from talora.server.backends.ray.cli import start_cluster
    from talora.server.backends.ray.support import RayOptions

    start_cluster(RayOptions(num_cpus=args.cluster_cpus), log_to_driver=False)  # bound to 127.0.0.1
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            for num_tasks in counts:
                store = make_store(args.model, Path(tmp) / f"tasks{num_tasks}", num_tasks)
                schedule = assign_tasks(200_000, num_tasks, "zipf", args.seed, args.zipf_exponent)
                mix = f"zipf{num_tasks}"
                runs: dict[str, list[dict]] = {name: [] for name in setups}
                for round_ in range(args.repeats if setups else 0):
                    for name in setups[round_ % len(setups):] + setups[:round_ % len(setups)]:
                        row = run_setup(url, args, store, name, schedule, texts)
                        runs[name].append(row)
                        print(f"{mix} {name} round {round_}: {row['requests_per_s']:.1f} req/s, hit rate "
                              f"{row['slot_hit_rate']}, p50 {row['latency_p50_ms']:.0f} ms, errors {row['errors']}, "
                              f"load {row['loadavg_after']}", flush=True)
                        if args.jsonl:
                            append_jsonl(args.jsonl, {"mix": mix, "round": round_, **row})
                rows[mix] = {name: combine(r) for name, r in runs.items()}
                for target in kill_targets if num_tasks == counts[0] else []:
                    row = run_kill(url, args, store, target, schedule, texts)
                    kills[f"{mix}_{target}"] = row
                    print(f"{mix} kill {target}: {row['failed']} failed of {row['requests']}, "
                          f"retried {row['retried']}, replaced after {row['seconds_to_replacement']} s, "
                          f"new replica answered after {row['seconds_to_new_answer']} s, "
                          f"longest gap {row['longest_gap_s']} s", flush=True)
                    if args.jsonl:
                        append_jsonl(args.jsonl, {"mix": mix, **row})
    finally:
        serve.shutdown()
        ray.shutdown()
    machine = machine_info(threads=1, extra_versions={"ray": package_version("ray")})
    summary = summarise(args, rows, machine, kills)
    write_json(args.out, summary)
    print(summary["ratios"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
