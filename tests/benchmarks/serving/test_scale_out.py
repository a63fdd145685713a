"""benchmarks/serving/scale_out.py: the summary's ratios, the kill rows' client and measures (default suite), and a
smoke run on the tiny model with both kill rows (``-m ray``)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks.serving import scale_out


def test_summary_ratios_compare_setups_of_the_same_mix():
    rows = {"zipf64": {"one": {"requests_per_s": 10.0, "slot_hit_rate": 0.5},
                       "two": {"requests_per_s": 18.0, "slot_hit_rate": 0.9},
                       "two_random": {"requests_per_s": 17.0, "slot_hit_rate": 0.6}},
            "zipf1000": {"one": {"requests_per_s": 8.0, "slot_hit_rate": 0.2}}}
    args = Namespace(tasks="64,1000", out=Path("x"), jsonl=None)
    summary = scale_out.summarise(args, rows, {"cpu_count": 2})
    assert summary["ratios"]["two_replicas_vs_one"] == {"zipf64": pytest.approx(1.8), "zipf1000": None}
    assert summary["ratios"]["affine_vs_random_hit_rate"] == {"zipf64": pytest.approx(1.5), "zipf1000": None}
    assert summary["setup"] == {"tasks": "64,1000"}


def test_the_fair_ratio_and_the_ranges_come_from_the_rounds_of_the_same_run():
    def runs(*values):
        return scale_out.combine([{"requests_per_s": v, "slot_hit_rate": None} for v in values])

    rows = {"zipf64": {"one_fair": runs(10.0, 12.0, 11.0), "two": runs(18.0, 18.0, 22.0)}}
    summary = scale_out.summarise(Namespace(tasks="64"), rows, {})
    assert rows["zipf64"]["two"]["requests_per_s"] == 18.0 and rows["zipf64"]["two"]["repeats"] == 3
    assert rows["zipf64"]["one_fair"]["requests_per_s_range"] == [10.0, 12.0]
    assert summary["ratios"]["two_replicas_vs_one_fair"]["zipf64"] == pytest.approx(18.0 / 11.0)
    assert summary["ratio_ranges"]["two_replicas_vs_one_fair"]["zipf64"] == pytest.approx([1.5, 2.0])
    assert summary["ratios"]["two_replicas_vs_one"]["zipf64"] is None  # no "one" setup in this run


def test_a_failing_metrics_route_is_reported_not_a_crash(monkeypatch):
    import httpx

    answers = iter([httpx.Response(500, text="Internal Server Error"), httpx.Response(200, text="Server error\n"),
                    httpx.Response(503, text="")])
    monkeypatch.setattr(httpx, "get", lambda *a, **kw: next(answers))
    monkeypatch.setattr(scale_out.time, "sleep", lambda s: None)
    with pytest.raises(scale_out.MetricsUnavailable, match="503"):
        scale_out.replica_counts("http://127.0.0.1:9", wait_s=0)
    with pytest.raises(ValueError):
        scale_out.parse_counts("Server error\n")


def test_counts_are_read_per_replica():
    text = ('# TYPE talora_slot_hits_total counter\ntalora_slot_hits_total{replica="a"} 3\n'
            'talora_slot_hits_total{replica="b"} 2\n# TYPE talora_slot_misses_total counter\n'
            'talora_slot_misses_total{replica="a"} 1\n# TYPE talora_requests_total counter\n'
            'talora_requests_total{replica="a",endpoint="/v1/tasks/{task}/predict"} 7\n')
    slots, requests = scale_out.parse_counts(text)
    assert slots == {"hits": 5.0, "misses": 1.0} and requests == {"a": 7.0}


def test_texts_are_seeded():
    assert scale_out.make_texts(5, 1) == scale_out.make_texts(5, 1) != scale_out.make_texts(5, 2)


def test_the_kill_client_retries_what_the_docs_promise_and_nothing_else():
    import asyncio

    import httpx

    answers = {"/busy": [httpx.Response(503, headers={"retry-after": "2"}, json={"detail": "retry"}),
                         httpx.Response(200, json={}, headers={"x-talora-replica": "r1"})],
               "/ingress-died": [httpx.Response(500, text="Internal Server Error")] * 2
               + [httpx.Response(200, json={}, headers={"x-talora-replica": "r2"})],
               "/app-error": [httpx.Response(500, json={"detail": "bad", "field": None})],
               "/down": [httpx.Response(503, json={"detail": "retry"})] * 10}
    sent: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        sent[path] = sent.get(path, 0) + 1
        return answers[path][sent[path] - 1]

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run(path: str):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            return await scale_out.send_with_retries(client, path, {}, tries=3, sleep=sleep)

    assert asyncio.run(run("/busy")) == (200, "r1", ["503"]) and slept == [2.0]
    assert asyncio.run(run("/ingress-died")) == (200, "r2", ["500", "500"])
    assert asyncio.run(run("/app-error")) == (500, None, [])  # a JSON 500 is the app's answer: final
    assert asyncio.run(run("/down")) == (503, None, ["503"] * 3) and sent["/down"] == 3  # tries bound it


def test_kill_summary_counts_failures_gaps_and_the_new_replicas_share():
    answers = [(1.0, 200, "a"), (2.0, 200, "b"), (10.5, 200, "b"), (11.0, 500, None), (12.0, 200, "b"),
               (13.0, 200, "c"), (14.0, 200, "c"), (15.0, 200, "b")]
    row = scale_out.kill_summary(answers, killed_at=10.0, before={"a", "b"}, replaced_at=12.5)
    assert row["requests"] == 8 and row["requests_after_kill"] == 6
    assert row["failed"] == 1 and row["failed_statuses"] == ["500"]
    assert row["seconds_to_replacement"] == pytest.approx(2.5)
    assert row["seconds_to_new_answer"] == pytest.approx(3.0)
    assert row["new_replica_share"] == pytest.approx(0.5)  # after c's first answer: c, b
    assert row["longest_gap_s"] == pytest.approx(1.5)  # 10.5 -> 12.0 (the 500 is no answer)
    quiet = scale_out.kill_summary([(1.0, 200, "a")], killed_at=5.0, before={"a"}, replaced_at=None)
    assert quiet["seconds_to_replacement"] is None and quiet["seconds_to_new_answer"] is None
    assert quiet["new_replica_share"] is None and quiet["longest_gap_s"] is None


def test_unknown_setups_or_kills_are_refused(capsys):
    assert scale_out.main(["--setups", "two,three", "--kills", "proxy"]) == 2
    assert "three, proxy" in capsys.readouterr().err


@pytest.mark.ray
def test_a_tiny_run_writes_every_setup_and_both_ratios(tmp_path):
    pytest.importorskip("ray.serve")
    from tests.helpers import save_tiny_server_model

    model = save_tiny_server_model(tmp_path / "model")
    out = tmp_path / "scale_out.json"
    assert scale_out.main(["--model", str(model), "--tasks", "6", "--duration-s", "1", "--warmup-requests", "8",
                           "--concurrency", "4", "--repeats", "1", "--kill-after-s", "1", "--kill-duration-s", "2",
                           "--kill-timeout-s", "120", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    rows = summary["rows"]["zipf6"]
    assert set(rows) == set(scale_out.SETUPS)
    assert all(row["completed"] > 0 and not row["errors"] for row in rows.values())
    assert [len(rows[name]["replica_shares"]) for name in scale_out.SETUPS] == [1, 1, 2, 2]
    assert all(sum(row["replica_shares"]) == pytest.approx(1) for row in rows.values())
    assert summary["ratios"]["two_replicas_vs_one"]["zipf6"] > 0
    assert summary["ratios"]["affine_vs_random_hit_rate"]["zipf6"] > 0
    kills = summary["kills"]
    assert set(kills) == {"zipf6_replica", "zipf6_ingress"}
    assert all(row["failed"] == 0 and row["requests_after_kill"] > 0 for row in kills.values()), kills
    assert kills["zipf6_replica"]["seconds_to_new_answer"] is not None  # the replacement took traffic
    assert all(row["seconds_to_replacement"] is not None for row in kills.values()), kills
