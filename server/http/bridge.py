"""The event-loop side of a request: check it, tokenise it, submit its jobs, await the worker's events,
and cancel the jobs when the request is abandoned.

A ``Call`` is one HTTP request on its way through the engine. Its clock starts when the request
reaches its route (``lookup``), so ``request_timeout_s`` covers tokenising, waiting in the queue
and running. Before anything is tokenised it is held to ``max_request_chars`` and, when the task's
template asks a question, to having one; after, to ``max_request_tokens``. Tokenising runs in the
thread pool, one text at a time, and stops at the deadline: an expired request gets 504 and
nothing of it is queued. Its jobs carry its client (``client_of``: the ``X-Client-Id`` header,
else the peer address), whose turn the scheduler keeps among the other clients'.

``Call.guard`` runs the request's work while it watches the connection: if the client goes away
(ASGI ``http.disconnect``; uvicorn's ``receive`` answers it only then, once the body was read) or
the deadline passes, the work stops and the request's jobs are cancelled so that the worker drops
them (``talora_requests_cancelled_total``). A stream is watched by Starlette once its response
has started; ``Generation.events`` cancels its job when the stream ends early. Nothing here
touches the device; the engine's worker thread delivers events through ``Channel.emit``
(``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from talora.server.adapter_registry import AdapterVersion
from talora.server.errors import FieldError, InputTooLong, JobFailed, RequestTimeout
from talora.server.facade import ServingEngine
from talora.server.http.schemas import stop_list
from talora.server.jobs import Event, Failed, Finished, GenerationParams, Job, Scored
from talora.server.settings import Settings

T = TypeVar("T")
GRACE_S = 2.0  # the worker enforces deadlines itself; this only catches a worker stuck in a long step
CLIENT_HEADER = "x-client-id"
VERSION_HEADER = "X-Talora-Adapter-Version"  # on every task response: the adapter version that answered
CLIENT_ID_CHARS = 128  # a longer X-Client-Id is cut to this many characters
CLIENT_GONE = 499  # the status logged for a request whose client closed the connection first (nginx's)


def texts_of(value: str | list[str], field: str, settings: Settings) -> list[str]:
    """One text or a batch as a list, within the one per-request limit every route shares."""
    texts = [value] if isinstance(value, str) else value
    if len(texts) > settings.texts_limit:
        raise FieldError(field, f"{len(texts)} texts is over the server's limit of {settings.texts_limit} "
                                "(max_texts_per_request, at most max_queue)")
    return texts


def params_of(max_new_tokens: int, temperature: float, top_p: float, stop: str | list[str] | None,
              seed: int | None, settings: Settings, field: str, top_k: int = 0) -> GenerationParams:
    limit = settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise FieldError(field, f"{max_new_tokens} is over the server's limit of {limit} (max_new_tokens_limit)")
    return GenerationParams(max_new_tokens, temperature, top_p, tuple(stop_list(stop)), seed, top_k)


class RequestTooLarge(InputTooLong, FieldError):
    """A request over ``max_request_chars`` or ``max_request_tokens`` (413, naming the field)."""


class Channel:
    """Events of one job, handed from the worker thread to the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        with suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def next(self, deadline: float, timeout_s: float) -> Event:
        remaining = deadline + GRACE_S - time.monotonic()
        try:
            event = await asyncio.wait_for(self._queue.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request did not finish within {timeout_s} s") from None
        if isinstance(event, Failed):
            raise (RequestTimeout(event.message) if event.status == 504 else JobFailed(event.status, event.message))
        return event


def arrival(request: Request) -> float:
    """``time.monotonic()`` when the request arrived: set by the first call (``lookup``, the first thing
    every model route does), unless a middleware set ``request.state.arrived`` earlier."""
    at = getattr(request.state, "arrived", None)
    if not isinstance(at, float):
        at = time.monotonic()
        request.state.arrived = at
    return at


def client_of(request: Request) -> str:
    """Whose request this is, for fair admission: the ``X-Client-Id`` header, else the peer address."""
    given = request.headers.get(CLIENT_HEADER)
    if given:
        return "id:" + given[:CLIENT_ID_CHARS]
    return "addr:" + (request.client.host if request.client is not None else "-")


def lookup(engine: ServingEngine, request: Request, task: str) -> AdapterVersion:
    """The version new requests of ``task`` get now (404 when not loaded); starts the request's clock and
    tags the request log."""
    arrival(request)
    adapter = engine.adapter(task)
    request.state.task, request.state.version = task, adapter.version
    return adapter


def asks_question(adapter: AdapterVersion) -> bool:
    """The task's template has a ``{question}`` (the test ``encode_prompt`` fills it by)."""
    return "{question}" in adapter.meta.template


class Call:
    """One HTTP request in the engine: its deadline and client, the jobs it submitted, and what stops them.

    ``field`` names the request's texts in errors (``text``, or ``prompt`` for completions)."""

    def __init__(self, engine: ServingEngine, request: Request, field: str = "text"):
        self.engine, self.request, self.field = engine, request, field
        self.timeout_s = request.app.state.settings.request_timeout_s
        self.deadline = arrival(request) + self.timeout_s
        self.client = client_of(request)
        self.jobs: list[Job] = []
        self.abandoned: str | None = None  # why the request's jobs were cancelled: disconnect or timeout

    # ----- stopping ----------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel every job of the request (no-op for those that finished)."""
        for job in self.jobs:
            job.cancel()

    def abandon(self, reason: str) -> None:
        """Cancel the request's jobs and count it once, by ``reason`` (disconnect, timeout)."""
        if self.abandoned is None:
            self.abandoned = reason
            self.engine.metrics.requests_cancelled.labels(reason).inc()
        self.cancel()

    def timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"the request did not finish within {self.timeout_s} s")

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the client goes away first (the jobs are cancelled and the request
        ends with status 499, which nobody receives) or the deadline passes (504, ``GRACE_S`` after it,
        should the worker not have said so). Any failure of ``work`` cancels the request's jobs."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        try:
            remaining = self.deadline + GRACE_S - time.monotonic()
            done, _ = await asyncio.wait({task, watcher}, timeout=max(remaining, 0.001),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            gone = watcher in done
            self.abandon("disconnect" if gone else "timeout")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise JobFailed(CLIENT_GONE, "the client closed the connection") if gone else self.timed_out()
        except RequestTimeout:
            self.abandon("timeout")
            raise
        except BaseException as exc:  # noqa: BLE001 - a failed, cancelled or abandoned request runs no further
            if isinstance(exc, asyncio.CancelledError):  # the server cancelled the handler: the client is gone
                self.abandon("disconnect")
            self.cancel()
            if not task.done():
                task.cancel()
            raise
        finally:
            watcher.cancel()

    async def _disconnected(self) -> None:
        """Return when the client has gone away; never when that cannot be watched."""
        while True:
            try:
                message = await self.request.receive()
            except Exception:  # noqa: BLE001 - the server cannot tell us: the deadline still holds
                break
            if message.get("type") == "http.disconnect":
                return
            await asyncio.sleep(0.05)  # a server that answers something else at once must not spin us
        await asyncio.Event().wait()

    # ----- the request's jobs ------------------------------------------------------------------
    async def encode(self, adapter: AdapterVersion, texts: list[str],
                     question: str | None) -> list[tuple[list[int], bool]]:
        """Prompt ids and truncation flag of each text, within the request limits and the deadline."""
        s = self.request.app.state.settings
        if asks_question(adapter) and (question is None or not question.strip()):
            raise FieldError("question", f"task {adapter.task!r}'s template asks a question ({{question}}); "
                                         "the request has none")
        chars = sum(map(len, texts))
        # a question is put into (and tokenised with) every text's prompt: it counts once per text
        asked = len(question or "") * (len(texts) if asks_question(adapter) else 1)
        if chars + asked > s.max_request_chars:
            name, per_text = ("question", " (the question counts once per text)") if asked > chars else \
                (self.field, "")
            raise RequestTooLarge(name, f"{chars + asked} characters{per_text} is over the server's limit of "
                                        f"{s.max_request_chars} (max_request_chars)")
        encoded = await run_in_threadpool(self._encode_all, adapter, texts, question)
        tokens = sum(len(ids) for ids, _ in encoded)
        if tokens > s.max_request_tokens:
            raise RequestTooLarge(self.field, f"{tokens} prompt tokens is over the server's limit of "
                                              f"{s.max_request_tokens} (max_request_tokens)")
        return encoded

    def _encode_all(self, adapter: AdapterVersion, texts: list[str],
                    question: str | None) -> list[tuple[list[int], bool]]:
        """On a thread-pool thread: one text at a time, stopping once the request is out of time or abandoned."""
        encoded = []
        for text in texts:
            if self.abandoned is not None:
                break
            if time.monotonic() >= self.deadline:
                raise self.timed_out()
            encoded.append(self.engine.encode(adapter, text, question))
        return encoded

    def submit(self, kind: str, adapter: AdapterVersion, encoded: list[tuple[list[int], bool]],
               params: GenerationParams | None = None) -> list[tuple[Job, Channel]]:
        """One job per prompt, queued all together (or none), unless the request is out of time."""
        if self.abandoned is not None:  # the guard has stopped waiting for this request
            raise self.timed_out() if self.abandoned == "timeout" else JobFailed(CLIENT_GONE, "the client went away")
        channels = [Channel() for _ in encoded]
        jobs = [Job(kind, adapter, ids, ch.emit, self.deadline, params, client=self.client)
                for (ids, _), ch in zip(encoded, channels)]
        for job in jobs:
            self.engine.check_fits(job)
        if time.monotonic() >= self.deadline:
            raise self.timed_out()
        self.jobs += jobs
        self.engine.submit(jobs)
        return list(zip(jobs, channels))

    async def score(self, adapter: AdapterVersion, texts: list[str],
                    question: str | None) -> list[tuple[list[float], bool]]:
        """Label log-likelihoods and truncation flag of each text, all with ``adapter``."""
        encoded = await self.encode(adapter, texts, question)
        submitted = self.submit("score", adapter, encoded)
        events = await gather_all([ch.next(self.deadline, self.timeout_s) for _, ch in submitted])
        return [(event.scores, truncated) for event, (_, truncated) in zip(events, encoded)
                if isinstance(event, Scored)]

    async def generate(self, adapter: AdapterVersion, texts: list[str], question: str | None,
                       params: GenerationParams) -> list[Generation]:
        """Submitted generations, one per text, all with ``adapter``."""
        encoded = await self.encode(adapter, texts, question)
        submitted = self.submit("generate", adapter, encoded, params)
        return [Generation(job, ch, truncated, self) for (job, ch), (_, truncated) in zip(submitted, encoded)]


async def gather_all(waits: list[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, but the first failure stops the other waits too."""
    gathered = asyncio.gather(*waits)
    try:
        return await gathered
    except BaseException:
        gathered.cancel()
        raise


@dataclass
class Generation:
    """A submitted generation; iterate ``events()`` for text deltas and the final ``Finished``."""

    job: Job
    channel: Channel
    truncated: bool
    call: Call = field(repr=False)

    async def events(self) -> AsyncGenerator[Event, None]:
        finished = False
        try:
            while True:
                event = await self.channel.next(self.job.deadline, self.call.timeout_s)
                finished = isinstance(event, Finished)
                yield event
                if finished:
                    return
        except RequestTimeout:
            self.call.abandon("timeout")
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the stream (or the request) was stopped early
            if not finished:
                self.call.abandon("disconnect")
            raise
        finally:
            self.job.cancel()  # no-op once finished

    async def result(self) -> Finished:
        async for event in self.events():
            if isinstance(event, Finished):
                return event
        raise JobFailed(500, "the generation ended without a result")
