"""A small asyncio client for the WebSocket protocol (serve/PROTOCOL.md).

    async with connect_session("ws://127.0.0.1:8000", key=KEY) as s:
        await s.append("user", "what is 6 times 7")
        async for frame in s.frames():          # row, error and end frames, as dicts
            print(frame)                        # (s.close() ends the session and drains)

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


@asynccontextmanager
async def connect_session(base_url: str, key: str | None = None, session: str | None = None, **options):
    """Open a new session (or attach to `session`) at base_url (ws://host:port[/prefix])."""
    url = base_url.rstrip("/") + "/v1/sessions" + (f"/{quote(session)}" if session else "")
    if key:
        url += f"?key={quote(key)}"
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
