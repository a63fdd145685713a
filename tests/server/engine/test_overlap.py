"""Overlapped steps (``EngineConfig.overlap_steps``): the runner launches step N+1 before it reads step
N. The same traffic through an engine that reads every step at once and through one that overlaps
gives the same events (scores, greedy and seeded sampled text, stop strings, end of sequence,
``max_new_tokens``); cache ranges and slot pins all come back after cancellations and a failing
step, and a failing step fails only its own requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from talora.server.engine import Engine
from talora.server.jobs import Failed, Finished, GenerationParams, Job, Scored, Token
from talora.server.settings import Settings
from tests.server.support import GENERATE, Collector

TEXTS = {"sentiment": "I love it", "topic": "the match ended 2-1", "spam": "win money now", "intent": "how much?"}
PROMPTS = ["The capital of France is", "Once upon a time", "hello", "1, 2, 3,"]


class IdleProbe:
    """Stands in for ``engine.scheduler.next_work``, which the worker calls at the start of every pass:
    a call with nothing queued, no active generation and no step in flight comes after the pass that
    gave the last range and pin back, and the worker stays inside it until new work arrives, so
    ``idle`` is set exactly while the worker is idle."""

    def __init__(self, engine):
        self.scheduler, self.next_work = engine.scheduler, engine.scheduler.next_work
        self.idle = threading.Event()
        engine.scheduler.next_work = self

    def __call__(self, active, pool, slots, busy=False):
        if not active and not busy and self.scheduler.waiting == (0, 0):
            self.idle.set()
        try:
            return self.next_work(active, pool, slots, busy)
        finally:
            self.idle.clear()


@pytest.fixture(scope="module")
def engines(tiny_bundle, tiny_server_model):
    """Two engines on the same bundle, one reading each step at once and one overlapping: 3 slots for
    4 classify tasks and the generate task (evictions), at most 6 rows a step (steps share rows)."""
    threads = torch.get_num_threads()
    made = {overlap: Engine(Settings(bundle=tiny_bundle, num_slots=3, torch_threads=1, max_batch_size=6,
                                     overlap_steps=overlap).engine_config(), loaded=tiny_server_model)
            for overlap in (False, True)}
    for eng in made.values():
        IdleProbe(eng)
        eng.start()
    yield made
    for eng in made.values():
        eng.stop(10)
    torch.set_num_threads(threads)


def _job(engine, task, text, params=None, sink=None):
    adapter = engine.adapter(task)
    ids, _ = engine.encode(adapter, text)
    kind = "score" if params is None else "generate"
    return Job(kind, adapter, ids, sink or Collector(), time.monotonic() + 120, params)


def _run(engine, requests) -> list[list]:
    """Submit ``requests`` ((task, text, params or None) each) together; every job's events."""
    jobs = [_job(engine, task, text, params) for task, text, params in requests]
    engine.submit(jobs)
    for job in jobs:
        job.emit.wait()
    return [job.emit.events for job in jobs]


def _idle(engine, timeout=60) -> None:
    """Wait until the worker holds no generation and no step (``IdleProbe``); then every range and pin
    is back."""
    assert engine.scheduler.next_work.idle.wait(timeout), "the worker did not go idle"
    runner = engine.loaded.runner
    assert not runner.active and runner.pending is None
    assert runner.pool.free_tokens == runner.pool.capacity and runner.pool.largest_free() == runner.pool.capacity
    assert not runner.slots._pins, runner.slots._pins


def _same(events_a: list, events_b: list) -> None:
    assert [type(e) for e in events_a] == [type(e) for e in events_b]
    for a, b in zip(events_a, events_b):
        if isinstance(a, Scored):
            assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-4, rtol=1e-5)
        else:
            assert a == b


def _traffic(stop: str) -> list[tuple[str, str, GenerationParams | None]]:
    """Score jobs of every classify task with generations between them: greedy of 1 to 16 tokens,
    seeded sampling, and a stop string met in the middle of the first prompt's greedy text."""
    generations = [(PROMPTS[i % len(PROMPTS)], GenerationParams(max_new_tokens=n, temperature=0))
                   for i, n in enumerate((1, 2, 9, 16))]
    generations += [(PROMPTS[1], GenerationParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=7)),
                    (PROMPTS[2], GenerationParams(max_new_tokens=10, temperature=1.3, seed=11)),
                    (PROMPTS[0], GenerationParams(max_new_tokens=16, temperature=0, stop=(stop,)))]
    requests: list[tuple[str, str, GenerationParams | None]] = [
        (task, text + extra, None) for extra in ("", " again") for task, text in TEXTS.items()]
    for i, (prompt, params) in enumerate(generations):
        requests.insert(2 * i + 1, (GENERATE, prompt, params))
    return requests


def test_overlapped_steps_give_the_same_events(engines, monkeypatch):
    plain, overlapped = engines[False], engines[True]
    fed = {False: 0, True: 0}  # decode rows fed from the step before's picks on the device
    for overlap, engine in engines.items():
        real = engine.loaded.runner._forward

        def counting(plan, sampling, previous, real=real, overlap=overlap):
            fed[overlap] += len(plan.fed_at)
            return real(plan, sampling, previous)

        monkeypatch.setattr(engine.loaded.runner, "_forward", counting)
    probe = [(GENERATE, PROMPTS[0], GenerationParams(max_new_tokens=16, temperature=0))]
    text = _run(plain, probe)[0][-1].text
    assert len(text) >= 8, text
    requests = _traffic(stop=text[4:6])  # a stop string met in the middle of the first prompt's text
    expected = _run(plain, requests)
    got = _run(overlapped, requests)
    for a, b in zip(expected, got):
        _same(a, b)
    finished = [e[-1] for e in expected if isinstance(e[-1], Finished)]
    assert {f.finish_reason for f in finished} == {"stop", "length"}
    assert all(isinstance(e[-1], (Scored, Finished)) for e in got)
    assert fed[False] == 0 and fed[True] >= 20, fed
    _idle(plain)
    _idle(overlapped)


def test_end_of_sequence_found_one_step_late_gives_the_same_text(engines):
    """The worker learns of an end-of-sequence token after it launched the next step: that row is
    dropped, the text and the token count are those of the plain engine."""
    plain, overlapped = engines[False], engines[True]
    probe = [(GENERATE, p, GenerationParams(max_new_tokens=16, temperature=0)) for p in PROMPTS]
    texts = [events[-1].text for events in _run(plain, probe)]
    ascii_chars = [c for t in texts for c in t[2:] if c.isascii() and c.isprintable()]
    assert ascii_chars, texts
    eos = {ord(ascii_chars[0])}  # the byte-level tokenizer: an ASCII character is its own token
    for engine in (plain, overlapped):
        engine.loaded.runner.eos_ids |= eos
    through = [(GENERATE, p, GenerationParams(max_new_tokens=16, temperature=0, ignore_eos=True)) for p in PROMPTS]
    try:
        expected, got = _run(plain, probe), _run(overlapped, probe)
        ignored = _run(overlapped, through)
    finally:
        for engine in (plain, overlapped):
            engine.loaded.runner.eos_ids -= eos
    for a, b in zip(expected, got):
        _same(a, b)
    assert any(e[-1].finish_reason == "stop" and e[-1].completion_tokens < 16 for e in expected)
    # ignore_eos runs through the end-of-sequence token to max_new_tokens
    assert {(e[-1].finish_reason, e[-1].completion_tokens) for e in ignored} == {("length", 16)}
    _idle(overlapped)


def test_cancelled_generations_give_back_their_ranges(engines):
    engine = engines[True]

    class CancelOnFirstToken(Collector):
        job: Job

        def __call__(self, event):
            super().__call__(event)
            if isinstance(event, Token):
                self.job.cancel()

    jobs = []
    for prompt in PROMPTS:
        sink = CancelOnFirstToken()
        sink.job = _job(engine, GENERATE, prompt, GenerationParams(max_new_tokens=64, temperature=0), sink)
        jobs.append(sink.job)
    score = _job(engine, "topic", TEXTS["topic"])
    engine.submit(jobs + [score])
    assert isinstance(score.emit.wait(), Scored)
    _idle(engine)
    assert all(not any(isinstance(e, Finished) for e in job.emit.events) for job in jobs)
    after = _job(engine, "spam", TEXTS["spam"])  # and the engine carries on
    engine.submit([after])
    assert isinstance(after.emit.wait(), Scored)


def test_a_failing_step_fails_its_own_requests_and_the_read_step_still_answers(engines, monkeypatch):
    engine = engines[True]
    runner = engine.loaded.runner
    real, calls = runner._forward, []

    def second_fails(plan, sampling, previous):
        calls.append(len(plan.rows))
        if len(calls) == 2:
            raise RuntimeError("device fault")
        return real(plan, sampling, previous)

    monkeypatch.setattr(runner, "_forward", second_fails)
    long = _job(engine, GENERATE, PROMPTS[1], GenerationParams(max_new_tokens=30, temperature=0))
    scores = [_job(engine, task, text) for task, text in TEXTS.items()][:2]
    engine.submit([long] + scores)
    failure = long.emit.wait()
    assert isinstance(failure, Failed) and failure.status == 500 and "device fault" in failure.message
    # step 1 (the prefill and the scores) is read when step 2 fails to launch: its scores still go out
    assert all(isinstance(job.emit.wait(), Scored) for job in scores)
    _idle(engine)
    monkeypatch.setattr(runner, "_forward", real)
    again = _job(engine, GENERATE, PROMPTS[1], GenerationParams(max_new_tokens=4, temperature=0))
    engine.submit([again])
    assert isinstance(again.emit.wait(), Finished) and runner.failed_steps == 0


def test_a_drained_engine_reads_its_last_step(tiny_bundle, tiny_server_model):
    """Stopping (SIGTERM's drain) waits for the step in flight: its requests are answered."""
    threads = torch.get_num_threads()
    engine = Engine(Settings(bundle=tiny_bundle, num_slots=3, torch_threads=1, overlap_steps=True).engine_config(),
                    loaded=tiny_server_model)
    engine.start()
    try:
        jobs = [_job(engine, task, text) for task, text in TEXTS.items()]
        jobs.append(_job(engine, GENERATE, PROMPTS[0], GenerationParams(max_new_tokens=8, temperature=0)))
        engine.submit(jobs)
    finally:
        engine.stop(30)
        torch.set_num_threads(threads)
    assert all(isinstance(job.emit.wait(1), (Scored, Finished)) for job in jobs)
