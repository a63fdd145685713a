"""The event-loop side of a request: build its jobs, submit them, await the worker's events.

Nothing here touches the device. Tokenising runs in the thread pool; the engine's worker thread
delivers events through ``Channel.emit`` (``call_soon_threadsafe``). A request that is abandoned
(timeout, client gone) cancels its jobs so the worker drops them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from talora.server.errors import JobFailed, RequestTimeout
from talora.server.facade import ServingEngine
from talora.server.jobs import Event, Failed, Finished, GenerationParams, Job, Scored
from talora.server.registry import AdapterVersion

GRACE_S = 2.0  # the worker enforces deadlines itself; this only catches a worker stuck in a long step


class Channel:
    """Events of one job, handed from the worker thread to the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def next(self, deadline: float, timeout_s: float) -> Event:
        remaining = deadline + GRACE_S - time.monotonic()
        try:
            event = await asyncio.wait_for(self._queue.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request did not finish within {timeout_s} s") from None
        if isinstance(event, Failed):
            raise (RequestTimeout(event.message) if event.status == 504 else JobFailed(event.status, event.message))
        return event


def lookup(engine: ServingEngine, request: Request, task: str) -> AdapterVersion:
    """The version new requests of ``task`` get now (404 when not loaded); tags the request log."""
    adapter = engine.adapter(task)
    request.state.task, request.state.version = task, adapter.version
    return adapter


def _deadline(engine: ServingEngine) -> float:
    return time.monotonic() + engine.settings.request_timeout_s


async def score(engine: ServingEngine, adapter: AdapterVersion, texts: list[str],
                question: str | None) -> list[tuple[list[float], bool]]:
    """Label log-likelihoods and truncation flag of each text, all with ``adapter``."""
    encoded = await run_in_threadpool(lambda: [engine.encode(adapter, t, question) for t in texts])
    deadline, channels = _deadline(engine), [Channel() for _ in texts]
    jobs = [Job("score", adapter, ids, ch.emit, deadline) for (ids, _), ch in zip(encoded, channels)]
    for job in jobs:
        engine.check_fits(job)
    engine.submit(jobs)
    try:
        events = await asyncio.gather(*(ch.next(deadline, engine.settings.request_timeout_s) for ch in channels))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return [(event.scores, truncated) for event, (_, truncated) in zip(events, encoded) if isinstance(event, Scored)]


@dataclass
class Generation:
    """A submitted generation; iterate ``events()`` for text deltas and the final ``Finished``."""

    job: Job
    channel: Channel
    truncated: bool
    timeout_s: float

    async def events(self) -> AsyncGenerator[Event, None]:
        try:
            while True:
                event = await self.channel.next(self.job.deadline, self.timeout_s)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.job.cancel()  # no-op once finished; stops the worker if the client went away

    async def result(self) -> Finished:
        async for event in self.events():
            if isinstance(event, Finished):
                return event
        raise JobFailed(500, "the generation ended without a result")


async def generate(engine: ServingEngine, adapter: AdapterVersion, text: str, question: str | None,
                   params: GenerationParams) -> Generation:
    ids, truncated = await run_in_threadpool(engine.encode, adapter, text, question)
    channel = Channel()
    job = Job("generate", adapter, ids, channel.emit, _deadline(engine), params)
    engine.check_fits(job)
    engine.submit([job])
    return Generation(job, channel, truncated, engine.settings.request_timeout_s)
