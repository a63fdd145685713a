"""Server-sent events of a generation: the one streaming loop of ``/generate`` and ``/v1/completions``.

``stream_events`` waits for the generation's first event before it answers, so that a failure
before the first token still gets its HTTP status; after that the headers are sent, and a
failure is reported as one last event (``error``). ``render`` turns each event (text deltas, then
``Finished``) into the route's payload; ``tail`` is sent after the last event (OpenAI's
``[DONE]``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable

from fastapi.responses import StreamingResponse

from talora.server.jobs import Event, Finished


def sse(payload: dict | str) -> str:
    """One ``data:`` event; a dict is sent as JSON."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(events: AsyncGenerator[Event, None], render: Callable[[Event], dict],
                        error: Callable[[Exception], dict], headers: dict[str, str],
                        tail: str | None = None) -> StreamingResponse:
    first = await anext(events)  # errors before the first token still get their status code

    async def body():
        event = first
        try:
            while True:
                yield sse(render(event))
                if isinstance(event, Finished):
                    break
                event = await anext(events)
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
            yield sse(error(exc))
        finally:
            await events.aclose()
        if tail is not None:
            yield sse(tail)

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
