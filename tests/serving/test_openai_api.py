"""openai_api.Reply on its own: a chat's answer read off row events (no server)."""

from ms_ray.config.serve import ChatConfig
from ms_ray.serving.openai_api import Reply, model_name

END = "<|end|>"


def rows(*cells_by_row: dict) -> list[dict]:
    return [{"type": "row", "row": i, "cells": cells} for i, cells in enumerate(cells_by_row)]


def read(reply: Reply, events: list[dict]) -> list[dict]:
    deltas = [d for e in events if (d := reply.add(e))]
    return deltas


def test_the_answer_starts_at_reply_from_and_ends_at_the_end_token():
    reply = Reply("output", END, reply_from=2, side=("tool",))
    deltas = read(reply, rows({"output": "history"}, {"user": "hi"}, {"output": " hello"}, {"tool": "42"},
                              {"output": " there"}, {"output": " " + END}, {"output": " more"}))
    assert reply.content == " hello there" and reply.finish == "stop" and reply.tokens == 3
    assert reply.side_text == {"tool": "42"} and {"streams": {"tool": "42"}} in deltas
    assert "".join(d.get("content", "") for d in deltas) == reply.content


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
    reply = Reply("output", END, 0, stops=("STOP", "xyz"))
    deltas = read(reply, rows({"output": "ab"}, {"output": "cS"}, {"output": "T"}, {"output": "OPdef"}))
    assert [d["content"] for d in deltas] == ["ab", "c"]  # "S", "ST" held: they might begin STOP
    assert (reply.content, reply.finish) == ("abc", "stop")


def test_held_text_that_was_no_stop_goes_out():
    reply = Reply("output", END, 0, stops=("STOP",), max_tokens=3)
    deltas = read(reply, rows({"output": "aS"}, {"output": "T"}, {"output": "x"}))
    assert "".join(d["content"] for d in deltas) == "aSTx" and reply.finish == "length"
    reply = Reply("output", END, 0, stops=("STOP",))
    read(reply, rows({"output": "aST"}, {"output": END}))
    assert (reply.content, reply.finish) == ("aST", "stop")


def test_the_row_limit_and_the_session_end_finish_with_length():
    reply = Reply("output", END, 0, last_row=3)
    read(reply, rows({"output": "a"}, {}, {"output": "b"}, {"output": "c"}))
    assert (reply.content, reply.finish, reply.rows) == ("ab", "length", 3)
    reply = Reply("output", END, 0)
    read(reply, rows({"output": "a"}))
    reply.ended("max_rows")
    assert reply.finish == "length"


def test_reasoning_is_counted_apart_from_the_content():
    reply = Reply("output", END, 0, reasoning="think")
    read(reply, rows({"think": "hmm", "output": "a"}, {"think": " so"}, {"output": END}))
    assert (reply.content, reply.reasoning_text) == ("a", "hmm so")
    assert reply.usage(5) == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                              "completion_tokens_details": {"reasoning_tokens": 2}, "rows": 3}


def test_the_model_name_defaults_to_the_run_that_exported_it():
    assert model_name(ChatConfig(), "runs/train/tiny/export") == "tiny"
    assert model_name(ChatConfig(), "runs/models/smollm2/") == "smollm2"
    assert model_name(ChatConfig(model_name="mine"), "runs/train/tiny/export") == "mine"
