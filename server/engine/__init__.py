"""The in-process engine (``core.Engine``): scheduler, runner, task-KV slots, KV pool, sequences, sampling."""

from talora.server.engine.core import Engine as Engine
