"""A small asyncio client for the WebSocket protocol (serve/PROTOCOL.md).

    async with connect_session("ws://127.0.0.1:8000", key=KEY, version=2) as s:
        await s.append("user", "what is 6 times 7")
        async for frame in s.frames():          # rows (v2) or row (v1), error and end frames, as dicts
            print(frame)                        # (s.close() ends the session and drains)

    s.token: the session token (to the opener only): pass it as token= to attach as a writer;
    without it an attach only watches.

Tests, the benchmark and scripts use it; any WebSocket client that speaks JSON works as well.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


class Session:
    def __init__(self, ws, first: dict):
        self.ws = ws
        self.first = first  # the server's first frame: "session", or "error" when refused
        self.id = first.get("id")
        self.token = first.get("token")  # the opener's secret: writing from another connection needs it
        self.streams = first.get("streams", [])

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def append(self, stream: str, text: str, end: bool = False) -> None:
        """end=True: the turn is over; the server adds the stream's end token (if it has one)."""
        frame = {"type": "append", "stream": stream, "text": text}
        await self.ws.send(json.dumps({**frame, "end": True} if end else frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def close(self, timeout: float = 30.0) -> list[dict]:
        """End the session the polite way: ask, then read until the server closes the socket
        after its end frame (a client that hangs up first races the rows still in flight).
        Returns the frames that arrived meanwhile, the end frame last."""
        await self.ws.send(json.dumps({"type": "close"}))
        return [frame async for frame in self.frames(timeout)]

    async def recv(self, timeout: float = 30.0) -> dict | None:
        """The next frame, or None once the connection is closed."""
        try:
            return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        except ConnectionClosed:
            return None

    async def frames(self, timeout: float = 30.0):
        """Frames until the connection closes (after an end or a fatal error frame)."""
        while (frame := await self.recv(timeout)) is not None:
            yield frame


def rows_of(frame: dict) -> list[dict]:
    """The rows a frame carries, in either protocol version: [{"row": N, "cells": {...}}, ...]."""
    if frame.get("type") == "row":
        return [frame]
    return frame.get("rows", []) if frame.get("type") == "rows" else []


@asynccontextmanager
async def connect_session(base_url: str, key: str | None = None, session: str | None = None,
                          token: str | None = None, version: int = 1, from_row: int | None = None, **options):
    """Open a new session (or attach to `session`; with its `token` as a writer) at base_url
    (ws://host:port[/prefix]); version 2: `rows` frames (serve/PROTOCOL.md)."""
    url = base_url.rstrip("/") + "/v1/sessions" + (f"/{quote(session)}" if session else "")
    query = {"key": key, "token": token, "v": version if version != 1 else None, "from_row": from_row}
    query = "&".join(f"{k}={quote(str(v))}" for k, v in query.items() if v is not None)
    url += f"?{query}" if query else ""
    async with connect(url, max_size=None, open_timeout=30, **options) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        yield Session(ws, first)


def wait_ready(app_url: str, seconds: float = 120) -> None:
    """Block until GET {app_url}/readyz answers 200 (a model replica is loaded and warm)."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{app_url}/readyz", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app_url} was not ready within {seconds:g} s")
        time.sleep(0.5)
