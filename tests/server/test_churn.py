"""Load, infer, unload, thirty times over: file descriptors and memory stay bounded (a real uvicorn on
127.0.0.1, the tiny model). A leak per cycle (a file left open, a slot or a version kept alive after
its eviction) shows here long before it takes a server down in production."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server.support import serve, write_version

CYCLES, WARMUP = 30, 5
AUTH = {"Authorization": "Bearer secret"}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_thirty_load_infer_unload_cycles_leak_neither_files_nor_memory(tiny_bundle, tiny_server_model, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_bundle, store)
    versions = tmp_path / "versions"
    for i in range(4):  # four versions of a new task, uploaded in turn
        write_version(store, tiny_server_model, "spam", seed=100 + i, version=f"c{i}", out=versions / str(i),
                      name="churn")
    with serve(store, tiny_server_model, admin_token="secret", store=store) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        fds, rss = [], []
        for cycle in range(CYCLES):
            folder = versions / str(cycle % 4)
            files = {"metadata": ("churn.json", (folder / "churn.json").read_bytes()),
                     "tensors": ("churn.safetensors", (folder / "churn.safetensors").read_bytes())}
            r = client.put("/v1/adapters/churn", files=files, headers=AUTH)
            assert r.status_code == 200 and r.json()["version"] == f"c{cycle % 4}", r.text
            r = client.post("/v1/tasks/churn/predict", json={"text": [f"cycle {cycle}", "again"]})
            assert r.status_code == 200 and r.json()["version"] == f"c{cycle % 4}", r.text
            r = client.delete("/v1/adapters/churn", headers=AUTH)
            assert r.status_code == 200, r.text
            assert client.post("/v1/tasks/churn/predict", json={"text": "gone"}).status_code == 404
            gc.collect()
            fds.append(open_fds())
            rss.append(rss_kib())
        assert client.get("/v1/tasks/spam").status_code == 200  # the others are untouched
    steady = fds[WARMUP:]
    assert max(steady) - min(steady) <= 4, fds  # a file per cycle would add 25
    assert rss[-1] - rss[WARMUP] < 64 * 1024, rss  # KiB: no version, slot or upload kept per cycle
