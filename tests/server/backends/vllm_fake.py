"""A stand-in for vLLM's OpenAI server, for the default suite: the parts ``VllmEngine`` uses, computed with
talora's own frozen model on the received ``prompt_embeds`` (a plain causal LM, as vLLM runs them).

``/health``, ``/v1/models`` and ``/v1/completions`` (one token with ``logprob_token_ids``, or a greedy
stream). Every request body is kept in ``bodies`` so that tests can read the salts and embeddings sent.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from talora.adapters.model.frozen_lm import causal_attend
from talora.server.backends.vllm.process import free_port


class FakeVllm:
    def __init__(self, loaded):
        self.lm, self.tokenizer, self.bodies = loaded.model, loaded.tokenizer, []
        app = FastAPI()
        app.get("/health")(lambda: {})
        app.get("/v1/models")(lambda: {"data": [{"id": "fake-model"}]})

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if body.get("prompt_embeds") == "refuse":
                return JSONResponse({"error": {"message": "no"}}, status_code=400)
            embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
            if body.get("stream"):
                return StreamingResponse(self._stream(embeds, body["max_tokens"]), media_type="text/event-stream")
            logprobs = self.next_logprobs(embeds)
            top = {f"token_id:{t}": float(logprobs[t]) for t in body["logprob_token_ids"]}
            return {"choices": [{"text": "", "logprobs": {"top_logprobs": [top]}, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": embeds.shape[0], "completion_tokens": 1,
                              "prompt_tokens_details": {"cached_tokens": 0}}}

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @torch.no_grad()
    def next_logprobs(self, embeds: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, embeds.shape[0], dtype=torch.bool)
        hidden = self.lm.run_layers(embeds[None], torch.arange(embeds.shape[0])[None], causal_attend(mask))
        return torch.log_softmax(self.lm.logits(hidden[0, -1]).float(), -1)

    def _stream(self, embeds: torch.Tensor, max_tokens: int):
        table = self.lm.model.embed_tokens.weight
        for _ in range(max_tokens):
            token = int(self.next_logprobs(embeds).argmax())
            embeds = torch.cat([embeds, table[token][None]])
            chunk = {"choices": [{"text": self.tokenizer.decode([token]), "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        done = {"choices": [{"text": "", "finish_reason": "length"}],
                "usage": {"prompt_tokens": embeds.shape[0] - max_tokens, "completion_tokens": max_tokens}}
        yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"

    def __enter__(self) -> FakeVllm:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake vLLM server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
