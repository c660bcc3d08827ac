"""The OpenAI-compatible endpoints as their users meet them: the real `openai` SDK, no code of ours,
against `ms-ray serve` in its own process (conftest.live_skills: serve/local.yaml, its `local` key)
with a model that has learnt the skills (conftest.skills_export): right answers, the end token as
finish_reason "stop", the server-side calculator visible beside the answer, and a Realtime session
with two questions."""

import asyncio
import random
import time

import openai
import pytest

from ms_ray.data.skills import DICTIONARY, FACTORS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_skills(live_skills):
    return live_skills


def questions(seed: int):
    rng = random.Random(seed)
    a, b = rng.randint(*FACTORS), rng.randint(*FACTORS)
    words = [rng.choice(list(DICTIONARY)) for _ in range(5)]
    return [(f"what is {a} times {b}", f"let me check {a * b}", str(a * b)),
            (" ".join(words), " ".join(DICTIONARY[w] for w in words), None)]


def test_chat_completions_answer_right_and_show_the_tool_beside(served_skills):
    c = openai.OpenAI(base_url=f"{served_skills}/v1", api_key="local", max_retries=0, timeout=120)
    [model] = [m.id for m in c.models.list()]
    for question, expected, tool_result in questions(1):
        answer = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}])
        choice = answer.choices[0]
        assert (choice.message.content.split(), choice.finish_reason) == (expected.split(), "stop"), question
        if tool_result:  # the calculator ran server-side, inside the session: its call and result come apart
            assert choice.message.streams["tool"].strip() == tool_result
            assert choice.message.streams["tool_call"].split()[1:] == question.split()[2::2]  # mul A B
        chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == choice.message.content
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_realtime_session_with_two_questions_at_natural_timing(served_skills):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{served_skills}/v1", api_key="local", max_retries=0)
        model = (await c.models.list()).data[0].id
        answers, side = [], []
        async with c.realtime.connect(model=model) as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            for question, expected, _ in questions(3):
                await asyncio.sleep(1.5)  # a person reads, then types
                await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": question}]})
                await conn.response.create()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    event = await asyncio.wait_for(conn.recv(), 30)
                    if event.type == "ms_ray.stream.delta":
                        side.append(event.stream)
                    if event.type == "response.done":
                        answers.append((event.response.status, event.response.output[0].content[0].text))
                        break
                assert answers and answers[-1][1].split() == expected.split(), (question, answers)
        assert [status for status, _ in answers] == ["completed", "completed"]
        assert {"tool_call", "tool"} <= set(side)
    asyncio.run(asyncio.wait_for(main(), 240))
