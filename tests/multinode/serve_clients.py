"""Clients of the multi-node serve test, run as a script inside node a (the head, where the
proxy and the ingress are):  python serve_clients.py WS_URL OUT_DIR SESSIONS

Opens SESSIONS sessions (protocol v1: a frame per row, rows numbered without gaps), writes
OUT_DIR/opened.json ({session id: replica}), waits for OUT_DIR/killed (the test kills a node and
writes it), keeps reading for READ_AFTER_KILL_S, then opens NEW_SESSIONS more and reads them
briefly, and writes OUT_DIR/results.json. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ms_ray.serving.client import connect_session, rows_of  # noqa: E402
from ms_ray.serving.session_ids import replica_of  # noqa: E402

READ_AFTER_KILL_S = 12
NEW_SESSIONS = 4


async def follow(url: str, record: dict, stop: asyncio.Event, opened: asyncio.Event) -> None:
    """One session: every row number and when it came, and the error/close that ended it."""
    async with connect_session(url) as s:
        record.update(id=s.id, replica=replica_of(s.id), rows=[], error=None)
        opened.set()
        while not stop.is_set():
            try:
                frame = await s.recv(timeout=5)
            except TimeoutError:  # no row for 5 s: recorded as a gap by the rows' times
                continue
            now = time.time()
            if frame is None:
                record.setdefault("closed", [s.close_code, s.close_reason, now])
                return
            if frame["type"] == "error":
                record["error"] = [frame.get("code"), frame.get("message"), now]
            record["rows"] += [[r["row"], now] for r in rows_of(frame)]
        await s.close(timeout=10)


async def main(url: str, out: Path, n: int) -> None:
    stop = asyncio.Event()
    records = [{} for _ in range(n)]
    opened = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(follow(url, r, stop, o)) for r, o in zip(records, opened)]
    await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 60)
    (out / "opened.json").write_text(json.dumps({r["id"]: r["replica"] for r in records}))
    deadline = time.monotonic() + 180
    while not (out / "killed").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test did not kill the node within 180 s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(READ_AFTER_KILL_S)
    late = [{} for _ in range(NEW_SESSIONS)]
    late_opened = [asyncio.Event() for _ in late]
    late_stop = asyncio.Event()
    late_tasks = [asyncio.create_task(follow(url, r, late_stop, o)) for r, o in zip(late, late_opened)]
    await asyncio.wait_for(asyncio.gather(*(o.wait() for o in late_opened)), 60)
    await asyncio.sleep(2)
    stop.set()
    late_stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, *late_tasks, return_exceptions=True), 60)
    (out / "results.json").write_text(json.dumps({"sessions": records, "late": late}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
