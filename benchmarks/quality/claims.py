"""Claims on benchmark runs, so that several processes sharing one work folder split a plan.

A process about to start a run takes an exclusive ``flock`` on ``<work>/claims/<key>.claim``
and holds it until the run ends, finished or not. Another process that cannot take the lock
skips the run and comes back to it later. The kernel drops the lock when its process dies, so
a killed sitting leaves nothing to clean up (the small files stay; they hold the last holder's
pid and start time, for people).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


class RunClaims:
    """Exclusive claims on run keys under ``folder``, released on ``release`` or process exit."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.held: dict[str, int] = {}  # key -> open file descriptor holding the lock

    def claim(self, key: str) -> bool:
        """Claim ``key``; False when another process holds it. Claiming one's own again is True."""
        if key in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{key}.claim", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        self.held[key] = fd
        return True

    def release(self, key: str) -> None:
        fd = self.held.pop(key, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)
