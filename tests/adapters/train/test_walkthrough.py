"""docs/training.md, "Train a task from your own file": the walkthrough's commands, as written.

The fast tests check that the section's flags exist (each ``talora-train``/``talora-serve`` command
against its ``--help``) and that its example file is the task the text describes (split sizes). The
slow test runs every ``bash`` block in a temporary folder with the venv's tools on ``PATH``, on the
real embedded model: the file, the target stage, the eval stage, then ``talora-serve`` in the
background and the ``curl`` against it, and checks the answers the section shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT

DOC = ROOT / "docs" / "training.md"
SECTION = "## Train a task from your own file"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BIN = Path(sys.executable).parent
TASK, LABELS = "my_tickets", ("billing", "delivery", "login")


def section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else None]


def bash_blocks() -> list[str]:
    return [code for lang, code in BLOCK.findall(section()) if lang == "bash"]


def commands(code: str) -> list[list[str]]:
    """The ``talora-train``/``talora-serve`` command lines of a block, continuation lines joined."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip().startswith(("talora-train", "talora-serve"))]


def example_rows() -> list[dict]:
    heredoc = next(code for code in bash_blocks() if code.startswith(f"cat > {TASK}.jsonl"))
    return [json.loads(line) for line in heredoc.splitlines()[1:-1]]


def test_the_section_has_the_whole_walkthrough():
    blocks = bash_blocks()
    used = [cmd[:2] for code in blocks for cmd in commands(code)]
    assert used == [["talora-train", "target"], ["talora-train", "eval"], ["talora-serve", "--bundle"]]
    assert any("curl " in code and f"/v1/tasks/{TASK}/predict" in code for code in blocks)


def test_every_flag_of_the_section_exists():
    for code in bash_blocks():
        for cmd in commands(code):
            program = [str(BIN / cmd[0])] + ([cmd[1]] if cmd[0] == "talora-train" else [])
            shown = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
            for flag in (token for token in cmd if token.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown), f"{flag} is not in {program} --help"


def test_the_csv_example_has_the_columns_of_a_task_file():
    import csv

    [table] = [code for lang, code in BLOCK.findall(section()) if lang == "csv"]
    rows = list(csv.DictReader(table.splitlines()))
    assert rows and all(set(row) == {"text", "label"} and row["label"] in LABELS for row in rows)


def test_the_example_file_is_the_task_the_section_describes(tmp_path):
    from talora.adapters.data import load_split, register_file_task

    rows = example_rows()
    assert sorted({row["label"] for row in rows}) == list(LABELS)
    assert all(sum(row["label"] == label for row in rows) == 15 for label in LABELS)
    path = tmp_path / f"{TASK}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    spec = register_file_task(path)
    assert spec.name == TASK and spec.labels == LABELS
    assert spec.template == "Text: {text}\nWhich label fits this text: billing, delivery or login? Answer:"
    assert [len(load_split(TASK, split)) for split in ("train", "dev", "test")] == [33, 6, 6]  # "33 / 6 / 6"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def _shown_label(code: str) -> str:
    return re.search(r'^# .*"label": "(\w+)"', code, re.M)[1]  # type: ignore[index]


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TALORA_PORT": str(_free_port())}
    blocks = bash_blocks()
    write, train, score, serve_cmd, predict = blocks
    _run(write, tmp_path, env)

    trained = _run(train, tmp_path, env)
    summary = _summary(trained.stdout)
    assert "training on 33 of 33 training examples" in trained.stderr
    assert (summary["steps"], summary["train_examples"], summary["verified"]) == (48, 33, True)
    dev = summary["metrics"][TASK]
    assert dev["examples"] == 6 and dev["majority_rate"] == pytest.approx(1 / 3)
    bundle = tmp_path / "runs" / "tickets" / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == [f"{TASK}.json", f"{TASK}.safetensors", "shared.safetensors",
                                                        "talora.json"]

    tested = _summary(_run(score, tmp_path, env).stdout)["metrics"]
    assert tested["examples"] == 6 and tested["majority_rate"] == pytest.approx(1 / 3)
    assert tested["accuracy"] > tested["majority_rate"], tested  # "above the majority rate of 1/3"

    port = env["TALORA_PORT"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", "-c", "exec " + serve_cmd.strip()], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not _ready(port):
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "talora-serve did not get ready"
            time.sleep(1)
        answer = json.loads(_run(predict.replace("localhost:8000", f"127.0.0.1:{port}"), tmp_path, env).stdout)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    assert answer["task"] == TASK and answer["label"] in LABELS
    assert answer["label"] == _shown_label(predict)
    assert set(answer["scores"]) == set(LABELS) and answer["truncated"] is False


def _ready(port: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
