"""Session affinity for Ray Serve: a session lives in the memory of the replica that opened it.

A session id starts with its replica's id (`{replica}.{random}`, session_ids.py). Calls that
name a session (`session=` keyword) or a replica (`replica=`, the ingress's event feeds) go to
that replica; other calls (opening a session) take
Serve's usual power-of-two choice, which balances live sessions because each one holds an
ongoing stream. If the replica is gone, the call goes anywhere and the replica there answers
`session_lost`: a session never waits for a replica that will not return.
"""

import zlib

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from .session_ids import replica_of


class SessionRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        owner = replica_of(kwargs.get("session")) or kwargs.get("replica")
        if owner is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)


class CallerRouter(PowerOfTwoChoicesRequestRouter):
    """Stream actors keep per-session state (a call being written, a session being recorded): every
    batch of one model replica (its `replica` in the batch) goes to the same actor replica, picked by
    a stable hash, for as long as the actor's replica count holds."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        args = pending_request.args if pending_request is not None else ()
        caller = args[0].get("replica") if args and isinstance(args[0], dict) else None
        if caller is None or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[zlib.crc32(caller.encode()) % len(ordered)]]]
