"""Fair admission over real HTTP (fast tier, tiny model): one client's heavy request does not make a small
request of another client, or of another task of the same client, wait behind all of it; and
``max_queue`` counts requests, not their texts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.server.http.test_deadlines import Hold
from tests.server.support import serve


def predict(task: str) -> str:
    return f"/v1/tasks/{task}/predict"


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_server_model):
    """One row per step: each step admits one job, so the admission order is plain to see."""
    with serve(tiny_bundle, tiny_server_model, max_batch_size=1) as srv:
        yield srv


def test_a_heavy_request_does_not_hold_back_other_clients_and_tasks(server, monkeypatch):
    hold = Hold(server.engine.loaded.runner, monkeypatch)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            heavy = asyncio.create_task(ac.post(predict("spam"), json={"text": [f"heavy {i}" for i in range(16)]},
                                                headers={"X-Client-Id": "heavy"}))
            await asyncio.to_thread(hold.wait_entered)  # its first job holds the worker; 15 wait
            light = asyncio.create_task(ac.post(predict("topic"), json={"text": "small"},
                                                headers={"X-Client-Id": "light"}))
            other_task = asyncio.create_task(ac.post(predict("sentiment"), json={"text": "another task"},
                                                     headers={"X-Client-Id": "heavy"}))
            await until(lambda: server.engine.metrics.queue_depth._value.get() >= 3, "the three requests wait")
            hold.release()
            return await heavy, await light, await other_task

    answers = asyncio.run(scenario())
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert len(answers[0].json()["results"]) == 16
    tasks = [task for _, task in hold.order]
    assert tasks[0] == "spam" and len(tasks) == 18
    # FIFO would admit them after all 16 heavy texts; in turn, each waits for at most one more
    assert tasks.index("topic") <= 2 and tasks.index("sentiment") <= 3, hold.order
    assert {client for client, _ in hold.order} == {"id:heavy", "id:light"}


def test_max_queue_counts_requests_not_texts(tiny_bundle, tiny_server_model, monkeypatch):
    with serve(tiny_bundle, tiny_server_model, max_batch_size=1, max_queue=3) as srv:
        hold = Hold(srv.engine.loaded.runner, monkeypatch)
        scheduler = srv.engine.scheduler

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                def post(texts):
                    return asyncio.create_task(ac.post(predict("spam"), json={"text": texts}))

                first = post("holds the worker")
                await asyncio.to_thread(hold.wait_entered)
                three = post(["a", "b", "c"])  # one request of three texts: one place in the queue
                await until(lambda: scheduler.waiting == (1, 3), "the three texts wait")
                more = [post("d"), post("e")]
                await until(lambda: scheduler.waiting == (3, 5), "three requests wait")
                full = await ac.post(predict("spam"), json={"text": "f"})
                hold.release()
                return full, await first, await three, [await m for m in more]

        full, first, three, more = asyncio.run(scenario())
    assert full.status_code == 429, full.text
    assert full.json()["detail"] == "the queue is full (3 requests waiting, max_queue)"
    assert [r.status_code for r in (first, three, *more)] == [200, 200, 200, 200]
