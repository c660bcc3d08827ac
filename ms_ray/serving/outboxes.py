"""Where a session's events wait for their readers, batched per reader.

An `Outbox` belongs to one consumer of events: an ingress replica (through `SessionServer.feed`)
or one in-process subscriber (`SessionEngine.subscribe`). It holds that consumer's *watches*: one
session each, with the streams that watcher may read. Every row of every watched session goes into
its watch's pending list, and the consumer takes everything pending in ONE message (`take`): one
message per step for all of its sessions, not one per row per session; a consumer that falls
behind takes several steps at once. A watch that falls `limit` events behind is dropped with a
`slow_consumer` error saying where to resume, so one slow reader never holds the others back.
Plain asyncio, no Ray: the engine and its tests use it as is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Watch:
    id: str
    session: str
    streams: frozenset[str]  # what this watcher may read
    outbox: "Outbox"
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once its last event is pending


class Outbox:
    def __init__(self, outbox_id: str, limit: int):
        self.id, self.limit = outbox_id, limit
        self.watches: dict[str, Watch] = {}
        self.pending: dict[str, list[dict]] = {}  # watch id -> events not yet taken
        self.ready = asyncio.Event()
        self.attached = False  # a consumer takes from it (an outbox nobody attaches to is reaped)
        self.created = time.monotonic()

    def put(self, watch: Watch, event: dict) -> bool:
        """Queue one row event, cut to the watch's streams; False when the watch is `limit`
        events behind (the caller drops it with put_final)."""
        events = self.pending.setdefault(watch.id, [])
        if len(events) >= self.limit:
            return False
        events.append(visible(event, watch.streams))
        self.ready.set()
        return True

    def replay(self, watch: Watch, events) -> None:
        """The backlog a new watch starts with (bounded by the session's backlog, not by `limit`)."""
        self.pending.setdefault(watch.id, []).extend(visible(e, watch.streams) for e in events)
        self.ready.set()

    def put_final(self, watch: Watch, *events: dict) -> None:
        """The watch's last events (an error, the end): never refused; the watch is over."""
        self.pending.setdefault(watch.id, []).extend(events)
        self.ready.set()
        self.watches.pop(watch.id, None)
        watch.done.set()

    async def take(self) -> dict[str, list[dict]]:
        """Everything pending, per watch id, as soon as there is anything."""
        await self.ready.wait()
        self.ready.clear()
        taken, self.pending = self.pending, {}
        return taken


def visible(event: dict, streams: frozenset[str]) -> dict:
    """A row event with only the cells of `streams`; other events as they are."""
    if event["type"] != "row" or event["cells"].keys() <= streams:
        return event
    return {**event, "cells": {k: v for k, v in event["cells"].items() if k in streams}}
