"""Per-client limits, kept by each ingress replica (serve/PROTOCOL.md, "Limits").

A client is its API key (by a hash, never the key itself) or, without a key, its address. Its
role may cap how many sessions it has open at once (`max_sessions`), how many sessions it
watches without owning them (`max_watchers`: observers have their own limit, so watching never
uses up the sessions one may open), and how fast it appends (`appends_per_s`, bursts of
`append_burst`). Over a limit the client gets `rate_limited` (HTTP 429 + Retry-After), for that
request only: nobody else's rows are dropped or slowed. The counts live in the ingress replica
that served the request, so with R ingress replicas a client can reach R times a limit.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter

from .access import ServeError


def client_id(key: str | None, address: str | None) -> str:
    """Who a limit counts: the key's hash, or the address of a client without a key."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"addr:{address or 'unknown'}"


class Quotas:
    def __init__(self):
        self.open = Counter()  # client -> sessions it opened that have not ended
        self.watching = Counter()  # client -> sessions it watches without owning them
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    def take(self, kind: str, client: str, limit: int | None) -> None:
        """Count one more open session (kind "open") or observer ("watching"); raises over the limit."""
        counts = getattr(self, kind)
        if limit is not None and counts[client] >= limit:
            what = "sessions open" if kind == "open" else "sessions watched"
            raise ServeError("rate_limited", f"this client has {counts[client]} {what}, the most its role allows; "
                                             "end one first")
        counts[client] += 1

    def give_back(self, kind: str, client: str) -> None:
        counts = getattr(self, kind)
        counts[client] -= 1
        if counts[client] <= 0:
            del counts[client]

    def append(self, client: str, per_s: float | None, burst: int) -> None:
        """A token bucket per client: `burst` appends at once, `per_s` a second after that."""
        if per_s is None:
            return
        now = time.monotonic()
        tokens, when = self.buckets.get(client, (float(burst), now))
        tokens = min(float(burst), tokens + (now - when) * per_s)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            wait = (1 - tokens) / per_s
            raise ServeError("rate_limited", f"over {per_s:g} appends per second; retry in {wait:.2f} s",
                             retry_after=max(1, math.ceil(wait)))
        self.buckets[client] = (tokens - 1, now)
