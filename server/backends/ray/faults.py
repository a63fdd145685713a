"""Fault injection for the tests and ``benchmarks/serving/scale_out.py``: ``kill -9`` of one Serve replica's process.

``ray.kill`` ends an actor through Ray (its owner learns at once); a real crash, the OOM killer or an
operator's ``kill -9`` ends the worker process and Ray notices afterwards. ``kill_replica`` does
the latter, from the driver of the cluster (the same machine: a local cluster).
"""

from __future__ import annotations

import os
import signal

import ray


def replica_names(app: str, deployment: str) -> list[str]:
    """Named actors of the replicas of ``deployment`` (``SERVE_REPLICA::<app>#<deployment>#<replica id>``)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"))


def kill_replica(app: str, deployment: str, index: int = 0) -> str:
    """SIGKILL the worker process of one replica of ``deployment``; returns the replica id it had."""
    name = replica_names(app, deployment)[index]
    actor = ray.get_actor(name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return name.rsplit("#", 1)[-1]
