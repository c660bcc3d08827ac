"""The OpenAI-compatible endpoints driven by the real `openai` SDK (pinned in the test extra) over
real sockets on 127.0.0.1: the shared apps of tests/served_app.py (a tiny random model, so answers
are nonsense but exact: greedy decoding is deterministic; its output stream never falls silent and
rarely ends, so most answers stop at max_tokens)."""

import asyncio
import concurrent.futures
import time

import openai
import pytest
from served_app import KEYS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MODEL = "tiny"  # the checkpoint folder's name (chat.model_name unset)
QUESTION = [{"role": "user", "content": "what is 12 times 7"}]


def client(served, app="main", key=KEYS["user"]):
    return openai.OpenAI(base_url=f"{served['http']}/{app}/v1", api_key=key, max_retries=0, timeout=60)


def streamed(c, **request):
    """(content, reasoning, finish_reason, usage, number of chunks) of a streamed completion."""
    content, finish, usage, chunks = [], None, None, 0
    for chunk in c.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                           **request):
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(content), finish, usage, chunks


def test_models_list_the_served_model_and_refuse_others(served):
    c = client(served)
    assert [m.id for m in c.models.list()] == [MODEL]
    model = c.models.retrieve(MODEL)
    assert model.owned_by == "ms_ray" and [s["name"] for s in model.streams] == \
        ["user", "think", "output", "tool", "tool_call"]
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_a_completion_streamed_or_not_gives_the_same_text_and_usage(served):
    c = client(served)
    whole = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == MODEL and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == 5  # 5 words, one token each (the user stream has no end token)
    assert choice.message.content.strip()
    assert not hasattr(choice.message, "reasoning_content") or choice.message.reasoning_content is None  # think hidden
    text, finish, usage, chunks = streamed(c, messages=QUESTION, max_tokens=12, temperature=0)
    assert (text, finish) == (choice.message.content, "length")
    assert usage.completion_tokens == 12 and usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks >= 12  # one chunk per token, not one blob


def test_stop_strings_cut_the_answer_before_them(served):
    c = client(served)
    full = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    before = full[: full.index(stop)]
    answer = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, stop=[stop, "zzz-never"])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (before, "stop")
    text, finish, _, _ = streamed(c, messages=QUESTION, max_tokens=12, stop=stop)
    assert (text, finish) == (before, "stop")


def test_a_seed_gives_the_same_sampled_answer_and_temperature_changes_it(served):
    c = client(served)

    def sampled(seed):
        return c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=1.5,
                                         seed=seed).choices[0].message.content

    assert sampled(7) == sampled(7)
    greedy = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16).choices[0].message.content
    assert len({sampled(1), sampled(2), sampled(3), greedy}) > 1


def test_history_goes_in_turn_and_reasoning_comes_apart_to_roles_that_read_it(served):
    """Messages go in one after another, each on its role's stream, one silent row between them;
    the assistant's turn is forced on the answer stream. Checked on the recorder's table of the
    request's session (the completion's id names it)."""
    from ms_ray.core.loading import load_tokenizer
    from ms_ray.core.streams import StreamSchema
    from ms_ray.data.formats import read_table_jsonl

    history = QUESTION + [{"role": "assistant", "content": "let me check"}, {"role": "user", "content": "moon"}]
    c = client(served)
    answer = c.chat.completions.create(model=MODEL, messages=history, max_tokens=6)
    # 5 words, the assistant's 3 and its stream's end token, 1 word
    assert answer.usage.prompt_tokens == 5 + 4 + 1 and answer.choices[0].finish_reason == "length"
    session = answer.id.removeprefix("chatcmpl-")
    schema = StreamSchema.load(served["checkpoint"])
    tokenizer = load_tokenizer(served["checkpoint"], schema)
    schema = schema.bind(tokenizer)
    for _ in range(150):  # bounded: the line is written once the session's end reaches the recorder
        lines = {e.id: e for f in served["sessions"].glob("*/*.jsonl") for e in read_table_jsonl(f, schema, tokenizer)}
        if session in lines:
            break
        time.sleep(0.2)
    table = lines[session].rows

    def said(stream, rows):
        return tokenizer.decode([int(t) for t in table[rows, schema.index(stream)]]).split()

    assert said("user", slice(0, 5)) == "what is 12 times 7".split()
    assert said("output", slice(6, 10)) == "let me check <|end|>".split()  # forced, after one silent row
    assert said("user", slice(11, 12)) == ["moon"]
    assert all(t == schema.silence_id for t in table[[5, 6, 7, 8, 9, 10], schema.index("user")])
    reply = [int(t) for t in table[10:, schema.index("output")] if t != schema.silence_id][:6]  # from row 10 on
    assert answer.choices[0].message.content.split() == tokenizer.decode(reply).split()
    # the test app's "limited" role hides nothing: it reads the think stream, apart from the content
    limited = client(served, key=KEYS["limited"]).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6)
    message = limited.choices[0].message
    assert message.reasoning_content  # the random model's think stream never falls silent
    assert len(message.content.split()) == 6  # one word per token: the 6 answer tokens, no think words among them
    assert limited.usage.completion_tokens_details.reasoning_tokens == len(message.reasoning_content.split())


@pytest.mark.parametrize("request_fields, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"extra_body": {"best_of": 3}}, "best_of"),
    ({"messages": [{"role": "system", "content": "be brief"}] + QUESTION}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": []}, "messages"),
])
def test_parameters_it_cannot_honour_are_refused_in_the_standard_shape(served, request_fields, param):
    fields = {"messages": QUESTION, "max_tokens": 4, **request_fields}
    with pytest.raises(openai.BadRequestError) as e:
        client(served).chat.completions.create(model=MODEL, **fields)
    assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert e.value.body["message"]


def test_bad_model_and_bad_key_are_refused_in_the_standard_shape(served):
    with pytest.raises(openai.NotFoundError) as e:
        client(served).chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.code == "model_not_found" and "tiny" in e.value.message
    with pytest.raises(openai.AuthenticationError) as e:
        client(served, key="not-a-key").chat.completions.create(model=MODEL, messages=QUESTION)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):  # the monitor may watch sessions, not open them
        client(served, key=KEYS["monitor"]).chat.completions.create(model=MODEL, messages=QUESTION)


def test_sixteen_at_once_lose_nothing_and_a_full_replica_answers_busy(served):
    """16 completions at once (half streamed) each get exactly the answer they get alone; on the
    one-session app, the requests beyond its session get `busy` (503, Retry-After), none hangs."""
    c = client(served)
    questions = [[{"role": "user", "content": f"what is {i} times {i + 1}"}] for i in range(16)]
    alone = [c.chat.completions.create(model=MODEL, messages=q, max_tokens=10).choices[0].message.content
             for q in questions[:4]]

    def one(i):
        if i % 2:
            return streamed(c, messages=questions[i], max_tokens=10)[0]
        return c.chat.completions.create(model=MODEL, messages=questions[i], max_tokens=10).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    assert together[:4] == alone
    assert all(len(text.split()) >= 5 for text in together)  # 10 tokens each, none cut or lost

    small = client(served, app="small")

    def small_one(_):
        try:
            return small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40).choices[0].finish_reason
        except openai.InternalServerError as e:
            assert e.status_code == 503 and e.code == "busy" and e.response.headers["retry-after"]
            return "busy"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(small_one, range(4)))
    assert "length" in outcomes and "busy" in outcomes and set(outcomes) <= {"length", "busy"}


def test_a_client_that_leaves_mid_stream_ends_its_session(served):
    """The session of a streamed completion ends when its client goes away: the one-session app
    takes the next request at once."""
    small = client(served, app="small")
    stream = small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(50):  # bounded: the close reaches the replica within a few rows
        try:
            small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
            break
        except openai.InternalServerError:
            asyncio.run(asyncio.sleep(0.1))
    else:
        pytest.fail("the left session still holds the replica")
