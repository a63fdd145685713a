"""The HTTP examples of README.md and docs/serving.md run against the demo bundle.

Every ``bash`` block with a ``curl`` and every ``python`` block that talks to
``127.0.0.1:8000`` is extracted and run as written, against a real uvicorn on 127.0.0.1 serving
the packaged demo bundle on the real default model (port rewritten; the admin token and a store
holding the demo tasks plus a ``v2/`` version, as the admin example assumes). ``curl`` runs with
``--fail-with-body``, so an example that gets an HTTP error fails the test; and every concrete
answer the example's comments show (``"label": "positive"``, ``"text": " Warsaw"``, a quoted
printed text) must be in what it printed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from talora.adapters.demo import demo_bundle_dir
from tests.helpers import ROOT
from tests.server.support import serve, write_version

DOCS = ("README.md", "docs/serving.md")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
CURL_PRELUDE = 'set -euo pipefail\ncurl() { command curl --fail-with-body --max-time 120 "$@"; }\n'


def http_examples() -> list[tuple[str, str, str]]:
    """(id, language, code) of each runnable HTTP example, in document order."""
    examples = []
    for doc in DOCS:
        for i, (lang, code) in enumerate(BLOCK.findall((ROOT / doc).read_text())):
            if (lang == "bash" and "curl " in code) or (lang == "python" and "127.0.0.1:8000" in code):
                examples.append((f"{doc}#{i}", lang, code))
    return examples


def test_the_docs_have_http_examples():
    ids = [e[0] for e in http_examples()]
    assert any(i.startswith("README.md") for i in ids) and sum(i.startswith("docs/") for i in ids) >= 4


@pytest.fixture(scope="module")
def store(tmp_path_factory, default_model) -> Path:
    """The demo tasks, plus ``v2/tweet_sentiment`` (a new version), as the admin example expects."""
    folder = tmp_path_factory.mktemp("store")
    for file in demo_bundle_dir().iterdir():
        if file.suffix in (".json", ".safetensors"):
            shutil.copy(file, folder / file.name)
    write_version(folder, default_model, "tweet_sentiment", seed=3, version="v2", out=folder / "v2")
    return folder


@pytest.fixture(scope="module")
def demo_server(store, default_model):
    with serve(demo_bundle_dir(), default_model, store=store, admin_token="change-me", num_slots=8) as srv:
        yield srv


@pytest.mark.parametrize("example", http_examples(), ids=lambda e: e[0])
def test_example_runs_against_the_demo(example, demo_server, store):
    _, lang, code = example
    code = code.replace("localhost:8000", f"127.0.0.1:{demo_server.port}")
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{demo_server.port}")
    if lang == "bash":
        command = ["bash", "-c", CURL_PRELUDE + code]
    else:
        command = [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=store, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.stdout.strip()
    for expected in promised_answers(code):  # what the example's comments say it answers
        assert expected.search(done.stdout), \
            f"{code}\n--- answers\n{done.stdout[-1500:]}\n--- the docs promise {expected.pattern}"
    # the admin example evicts a task: load it back for the examples after it
    headers = {"authorization": "Bearer change-me"}
    assert httpx.put(f"{demo_server.url}/v1/adapters/tweet_sentiment", headers=headers).status_code == 200


JSON_CLAIM = re.compile(r'"(\w+)": "([^"]*)"')
PRINT_CLAIM = re.compile(r'#\s*"([^"]+)"')


def promised_answers(code: str) -> list[re.Pattern]:
    """The concrete answers an example's comments promise: ``"key": "value"`` pairs of the JSON shown
    after a bash command (a value of ``...`` promises nothing), and the quoted text a python
    example's ``print`` line says it prints."""
    promised = []
    for line in code.splitlines():
        comment = line.strip()
        if comment.startswith("#") and ("{" in comment or comment.startswith("# data:")):
            for key, value in JSON_CLAIM.findall(comment):
                if value and "..." not in value:
                    promised.append(re.compile(rf'"{key}"\s*:\s*"{re.escape(value)}"'))
        elif "print(" in line and "#" in line:
            promised += [re.compile(re.escape(text)) for text in PRINT_CLAIM.findall("#" + line.split("#", 1)[1])]
    return promised


def test_promised_answers_are_read_from_the_comments():
    bash = '''curl x\n# {"task": "t", "version": "...", "label": "positive",\n#  "scores": {"a": ...}}\n'''
    assert [p.pattern for p in promised_answers(bash)] == ['"task"\\s*:\\s*"t"', '"label"\\s*:\\s*"positive"']
    python = 'print(done.choices[0].text)  # " chemist"\nprint(x)  # " Nobel Prize" ...\n'
    assert [p.pattern for p in promised_answers(python)] == [re.escape(" chemist"), re.escape(" Nobel Prize")]


CLAIM = re.compile(r"^```bash\n(.*?)^```\n\nThat answers `(.+?)`", re.S | re.M)


def test_the_readme_answers_what_it_says(demo_server):
    """The last command of each README example followed by "That answers `X`" prints X on the demo."""
    claims = CLAIM.findall((ROOT / "README.md").read_text())
    assert len(claims) >= 2
    for block, answer in claims:
        code = "curl " + block.rsplit("\ncurl ", 1)[-1].removeprefix("curl ")
        code = code.replace("localhost:8000", f"127.0.0.1:{demo_server.port}")
        done = subprocess.run(["bash", "-c", CURL_PRELUDE + code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert answer in done.stdout, f"{code}\nanswers {done.stdout[-500:]}, the README says {answer}"
