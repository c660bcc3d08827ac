"""Session affinity for Ray Serve: a session lives in the memory of the replica that opened it.

A session id starts with its replica's id (`{replica}.{random}`, session_ids.py). Calls that
name a session (`session=` keyword) go to that replica; other calls (opening a session) take
Serve's usual power-of-two choice, which balances live sessions because each one holds an
ongoing stream. If the replica is gone, the call goes anywhere and the replica there answers
`session_lost`: a session never waits for a replica that will not return.
"""

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from .session_ids import replica_of


class SessionRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.kwargs.get("session") if pending_request is not None else None
        owner = replica_of(session)
        if owner is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)
