"""Task-affine routing with overflow: Serve's request router for the engine replicas (``routing=task``).

Serve's own multiplexing rules send a request to a replica that holds its model id until every such
replica is full (``max_ongoing_requests``): a hot task stays on one replica up to 64 requests in
flight, and a new replica (after a kill, or a scale-up) gets no task that the others hold. This
router ranks the replicas by their requests in flight less ``slack`` for holding the request's
``task@version`` (``support.rank_by_affinity``): affinity while the load is even, and a hot task
or a new replica fills as soon as the holders are ``slack`` requests busier.

Requests without a model id (listings, admin, health) go to the less busy of two random replicas.
Requests in flight come from Serve's queue-length cache (every replica reports its count with each
request it accepts, and each router adds the requests it sends), so two ingress replicas see each
other's load.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from talora.server.backends.ray.support import rank_by_affinity


class TaskAffinityRouter(MultiplexMixin, RequestRouter):
    """``RequestRouterConfig(request_router_class=TaskAffinityRouter, request_router_kwargs={"slack": n})``."""

    def initialize_state(self, slack: int = 2, **kwargs: Any) -> None:
        self.slack = slack

    def _in_flight(self, replica: RunningReplica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # after every rank was tried: back off
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [pair]  # Serve picks the one with fewer requests in flight
        holders = self._multiplexed_model_id_to_replica_ids.get(model_id, set())
        by_id = {r.replica_id: r for r in candidate_replicas}
        order = rank_by_affinity([(r.replica_id, self._in_flight(r), r.replica_id in holders)
                                  for r in candidate_replicas], self.slack)
        return [[by_id[replica_id]] for replica_id in order]
