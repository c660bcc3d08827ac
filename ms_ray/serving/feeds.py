"""The ingress side of outboxes (outboxes.py): ONE event stream per model replica carries every
session this ingress replica watches, split back here into one queue per watcher.

    hub = FeedHub(server_handle, name)               # one per ingress replica
    watcher = await hub.watch(session, streams)      # refused: ServeError (unknown_session, ...)
    async for batch in watcher.batches(): ...        # lists of row / end / error events
    hub.forget(watcher)                              # the client left: stop watching

A replica's feed (`SessionServer.feed`, routed to it by `replica=`) starts with the first watcher
of one of its sessions and stops with the last; each start gets a fresh outbox id, so a feed that
is stopping never takes a new watcher with it. When a replica's feed breaks (the replica died),
every watcher of it gets `session_lost` at once. Ray-aware but torch-free (the ingress imports it).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import uuid
from dataclasses import dataclass, field

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from .access import ServeError
from .session_ids import replica_of


def as_serve_error(e: BaseException) -> ServeError:
    """Map what a handle call can raise (the replica died, queues are full, ...) to the protocol's error."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, BackPressureError):
        return ServeError("busy", "every replica's queue is full; retry later")
    if isinstance(e, (RayActorError, ActorUnavailableError)):
        return ServeError("session_lost", f"the replica serving this session is gone ({type(e).__name__})")
    if isinstance(e, asyncio.TimeoutError):
        return ServeError("timeout", "the session server did not answer in time")
    return ServeError("internal", f"{type(e).__name__}: {e}")


async def awaited(response):
    """A handle call's response as a coroutine (for asyncio.wait_for and tasks). Module-level, in
    this torch-free module: Serve pickles the ingress deployment, whose replicas import what it uses."""
    return await response


def error_event(e: ServeError) -> dict:
    return {"type": "error", "code": e.code, "message": e.message}


@dataclass
class Watcher:
    id: str
    feed: "Feed"
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of events, as the feed brings them
    over: bool = False  # its end or error event has been read

    async def batches(self):
        """Everything that arrived for this watcher since the last batch, until end or error."""
        while not self.over:
            batch = list(await self.queue.get())
            while not self.queue.empty():
                batch += self.queue.get_nowait()
            self.over = any(e["type"] in ("end", "error") for e in batch)
            yield batch


@dataclass
class Feed:
    replica: str
    outbox: str
    watchers: dict[str, Watcher] = field(default_factory=dict)
    task: asyncio.Task | None = None


class FeedHub:
    def __init__(self, server, name: str, timeout: float):
        self.server, self.name, self.timeout = server, name, timeout
        self.feeds: dict[str, Feed] = {}  # replica id -> its feed
        self.starts = itertools.count()
        self.tasks: set[asyncio.Task] = set()  # calls nobody waits for, kept until they finish

    def background(self, call) -> None:
        """Send a call whose answer nobody needs (a lost answer changes nothing): `call()` makes it,
        in a context of its own. In the request's context, Serve would cancel it with the request
        (a client that went away cancels its request and that request's calls): the very calls
        that clean up after a client that went away."""
        async def done():
            try:
                await call()
            except Exception:
                pass
        task = asyncio.get_running_loop().create_task(done(), context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def watch(self, session: str, streams, from_row: int = 0, allow_ended: bool = True) -> Watcher:
        """Start watching a session (its backlog from `from_row`, then live); raises ServeError."""
        replica = replica_of(session)
        if replica is None:
            raise ServeError("unknown_session", f"no session {session!r} on this server")
        feed = self.feeds.get(replica) or self._start(replica)
        watcher = Watcher(uuid.uuid4().hex, feed)
        feed.watchers[watcher.id] = watcher
        try:
            ack = await asyncio.wait_for(awaited(self.server.watch.remote(
                session=session, outbox=feed.outbox, watch=watcher.id, streams=sorted(streams),
                from_row=from_row, allow_ended=allow_ended)), self.timeout)
        except BaseException as e:
            self.forget(watcher)
            raise as_serve_error(e) from None
        if ack.get("type") == "error":
            self.forget(watcher)
            raise ServeError(ack["code"], ack["message"])
        return watcher

    def forget(self, watcher: Watcher) -> None:
        """Stop watching (the client left); the feed stops with its last watcher."""
        feed = watcher.feed
        if feed.watchers.pop(watcher.id, None) is not None and not watcher.over:
            self.background(lambda: self.server.unwatch.remote(replica=feed.replica, outbox=feed.outbox,
                                                               watch=watcher.id))
        if not feed.watchers and self.feeds.get(feed.replica) is feed:
            del self.feeds[feed.replica]
            feed.task.cancel()

    def _start(self, replica: str) -> Feed:
        feed = self.feeds[replica] = Feed(replica, f"{self.name}.{next(self.starts)}")
        feed.task = asyncio.get_running_loop().create_task(self._run(feed))
        return feed

    async def _run(self, feed: Feed) -> None:
        lost = ServeError("session_lost", "the replica serving this session is gone; open a new session")
        try:
            async for message in self.server.options(stream=True).feed.remote(replica=feed.replica,
                                                                             outbox=feed.outbox):
                if message.get("type") == "error":  # the replica that held these sessions is gone
                    lost = ServeError(message["code"], message["message"])
                    break
                for watch_id, events in message.items():
                    watcher = feed.watchers.get(watch_id)
                    if watcher is not None:
                        watcher.queue.put_nowait(events)
        except asyncio.CancelledError:
            return  # no watchers left
        except Exception as e:
            lost = as_serve_error(e)
            if lost.code == "internal":
                lost = ServeError("session_lost", f"the session's event feed broke: {lost.message}")
        if self.feeds.get(feed.replica) is feed:
            del self.feeds[feed.replica]
        for watcher in feed.watchers.values():
            watcher.queue.put_nowait([error_event(lost)])
