"""Session ids, defined once: `{replica}.{16 hex digits}`.

A session lives in the memory of the replica that opened it, so its id starts with that
replica's id (Serve's replica unique_id): routing.SessionRouter sends every call naming the
session there, and a replica tells a session of a replica that is gone (`session_lost`) from one
it never knew. The random part makes ids unguessable. Standard library only: the engine (no Ray),
the router (loaded by the torch-free ingress) and the deployments all import it.
"""

from __future__ import annotations

import re
import uuid

SEPARATOR = "."
REPLICA = r"[A-Za-z0-9_-]{1,64}"  # Serve's replica ids are 8 lowercase letters and digits
SESSION_ID = re.compile(rf"({REPLICA}){re.escape(SEPARATOR)}[0-9a-f]{{16}}")


def new_session_id(replica: str) -> str:
    """A fresh id for a session that `replica` opens."""
    if not re.fullmatch(REPLICA, replica):
        raise ValueError(f"replica id {replica!r}: expected 1-64 letters, digits, '_' or '-'")
    return f"{replica}{SEPARATOR}{uuid.uuid4().hex[:16]}"


def replica_of(session_id) -> str | None:
    """The replica that opened `session_id`; None when it is not a session id of this format."""
    m = SESSION_ID.fullmatch(session_id) if isinstance(session_id, str) else None
    return m.group(1) if m else None
