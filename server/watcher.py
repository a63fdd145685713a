"""The adapter store watcher of every engine: ``AdapterRegistry.poll_store`` every ``interval_s``.

``run(halt)`` is a thread's loop (the in-process engine's, whose ``on_change`` warms the new version's
task KV); ``tick()`` serves a loop that wakes more often for another reason (the vLLM child's monitor).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from talora.server.adapter_registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)


class StoreWatcher:
    """Polls ``registry``'s store every ``interval_s`` seconds (0: never); a failed poll is logged."""

    def __init__(self, registry: AdapterRegistry, interval_s: float,
                 on_change: Callable[[AdapterVersion], None] = lambda version: None):
        self.registry, self.interval_s, self.on_change = registry, interval_s, on_change
        self._due = time.monotonic() + interval_s

    def tick(self) -> None:
        """Poll the store if ``interval_s`` has passed since the last poll (or since the start)."""
        if self.interval_s <= 0 or time.monotonic() < self._due:
            return
        self._due = time.monotonic() + self.interval_s
        try:
            for task in self.registry.poll_store():
                self.on_change(self.registry.get(task))
        except Exception:  # noqa: BLE001 - watching the adapter store must keep running
            log.exception("watching the adapter store failed")

    def run(self, halt: threading.Event) -> None:
        """Poll every ``interval_s`` until ``halt`` is set."""
        while self.interval_s > 0 and not halt.wait(max(self._due - time.monotonic(), 0.0)):
            self.tick()
