"""Locust load profile for talora-serve: score requests with Zipf(1.0) task popularity.

Each simulated user posts ``/v1/tasks/<task>/predict`` with a task drawn from a Zipf law over
the tasks the server lists at start, and a short real-looking text. Closed loop (locust's model):
for open-loop Poisson arrivals and the latency-versus-load sweep use ``load_test.py``.

    locust -f benchmarks/serving/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s
"""

from __future__ import annotations

import random

from locust import HttpUser, between, events, task

TEXTS = (
    "The battery lasts all day and the screen is bright.",
    "Delivery took three weeks and the box arrived damaged.",
    "The match ended in a draw after extra time.",
    "Shares fell sharply after the quarterly results were published.",
    "这个手机很好用，电池也耐用",
    "服务态度很差，再也不会来了",
)
_TASKS: list[str] = []
_WEIGHTS: list[float] = []


@events.test_start.add_listener
def _list_tasks(environment, **_kwargs) -> None:
    """Read the served tasks once; popularity rank follows the server's listing order."""
    import httpx

    tasks = [t["task"] for t in httpx.get(f"{environment.host}/v1/tasks", timeout=30).json()["tasks"]]
    _TASKS[:] = tasks
    _WEIGHTS[:] = [1.0 / rank for rank in range(1, len(tasks) + 1)]


class PredictUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task
    def predict(self) -> None:
        name = random.choices(_TASKS, weights=_WEIGHTS)[0]
        self.client.post(f"/v1/tasks/{name}/predict", json={"text": random.choice(TEXTS)},
                         name="/v1/tasks/[task]/predict")
