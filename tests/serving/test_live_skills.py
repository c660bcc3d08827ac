"""A live `ms-ray serve` session used the way a person uses it: the session is opened, questions come
at random times (several per session, silence between, the first after a wait), and every answer
is checked, as is the silence after it. The server runs the shipped serve/local.yaml in its own
process with a short-trained model (conftest.skills_export: wait_k and tool_call sessions) and
nothing that forces silence: `session.quiet_after_end=false`, so staying quiet is the model's own.
"""

import asyncio
import os
import random

import pytest

from ms_ray.data.skills import DICTIONARY, FACTORS
from ms_ray.serving.client import connect_session

pytestmark = pytest.mark.slow
END = "<|end|>"


@pytest.fixture(scope="module")
def live(live_skills):
    return live_skills


def script(rng: random.Random, questions: int) -> list[tuple[int, str, list[str]]]:
    """(silent rows to wait before asking, question, expected output words): the first question
    after up to 35 silent rows, the next ones 1-11 rows after the previous answer ended."""
    out = []
    for i in range(questions):
        wait = rng.randint(0, 35) if i == 0 else rng.randint(1, 11)
        if rng.random() < 0.5:
            a, b = rng.randint(*FACTORS), rng.randint(*FACTORS)
            out.append((wait, f"what is {a} times {b}", ["let", "me", "check", str(a * b), END]))
        else:
            words = [rng.choice(list(DICTIONARY)) for _ in range(rng.randint(4, 8))]
            out.append((wait, " ".join(words), [DICTIONARY[w] for w in words] + [END]))
    return out


async def ask(url: str, plan) -> list[dict]:
    """Run the plan in one session; per question: the row it was asked at, the output words after it
    until the end token (or 40 rows), and the output words between that end and the next question."""
    async with connect_session(url.replace("http", "ws", 1)) as s:
        rows = []

        async def until(condition, limit: int):
            start = rows[-1]["row"] if rows else 0
            while not condition():
                frame = await s.recv(30)
                assert frame is not None and frame["type"] == "row", frame
                rows.append(frame)
                if frame["row"] - start > limit:
                    return

        results = []
        for wait, question, _ in plan:
            since = rows[-1]["row"] if rows else -1
            await until(lambda: rows and rows[-1]["row"] >= since + wait, wait + 5)
            chatter = [w for r in rows if r["row"] > since for w in r["cells"].get("output", "").split()]
            if results:
                results[-1]["after_end"] = chatter
            await s.append("user", (" " if results else "") + question)
            # asked: the row of the question's last word. All of it must have arrived: its last word
            # may also be an earlier one ("moon sun fish tree dog moon")
            typed = lambda: "".join(r["cells"].get("user", "") for r in rows if r["row"] > since)  # noqa: E731
            await until(lambda: typed().strip() == question, 60)
            asked = rows[-1]["row"]
            answer = lambda: [w for r in rows if r["row"] > asked - len(question.split())  # noqa: E731
                              for w in r["cells"].get("output", "").split()]
            await until(lambda: END in answer(), 40)
            results.append({"asked": asked, "answer": answer()})
        since = rows[-1]["row"]
        await until(lambda: rows[-1]["row"] >= since + 10, 12)
        results[-1]["after_end"] = [w for r in rows if r["row"] > since for w in r["cells"].get("output", "").split()]
        await s.close()
        return results


def test_questions_at_random_times_get_right_answers_and_silence_after(live):
    seed = int(os.environ.get("MS_RAY_LIVE_SEED") or random.randrange(10**6))  # a failure names its seed
    for session in range(2):
        plan = script(random.Random(seed + session), questions=3)
        results = asyncio.run(asyncio.wait_for(ask(live, plan), 180))
        for (wait, question, expected), got in zip(plan, results):
            where = f"seed {seed + session}: {question!r} after {wait} silent rows (row {got['asked']})"
            assert got["answer"] == expected, where
            assert got["after_end"] == [], f"{where}: talked after its answer: {got['after_end']}"
