"""The chat evaluation (ms_ray/evaluation/chat.py): a tiny random Llama with a chat template as the
reference, data from `ms-ray prepare` (after_input), its untrained conversion as the checkpoint."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ms_ray.cli import main
from ms_ray.config import PrepareConfig, load_config
from ms_ray.core.families import tiny_base_model
from ms_ray.core.loading import load_export
from ms_ray.core.model import MultiStreamLM
from ms_ray.core.streams import SchemaError, StreamSchema, StreamSpec
from ms_ray.evaluation.chat import (
    chat_streams,
    held_out,
    reply_losses,
    score_reply,
    sequential_losses,
    sequential_reply,
    texts,
    turn_pair,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = StreamSchema((StreamSpec("user", "input", end_token="<|end_user|>"),
                       StreamSpec("output", "output", end_token="<|end|>")))
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # SmolLM2's, shorter
WORDS = "hello there how are you today yes no maybe good fine thanks what about the weather is nice".split()


def sentence(rng, low, high) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + rng.choice(".?!")


@pytest.fixture(scope="module")
def files(tmp_path_factory, ray_local):
    """{reference: a tiny Llama HF folder with a BPE tokenizer and a chat template, data: a prepared
    set of 60 turn pairs (after_input) in its tokenizer, checkpoint: its untrained conversion}."""
    tmp = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    chats = [[sentence(rng, 2, 8), sentence(rng, 2, 8)] for _ in range(60)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([t for c in chats for t in c] + [CHATML], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(tmp / "ref")
    tiny_base_model("llama", len(tok), hidden_size=32, seed=1).save_pretrained(tmp / "ref")
    with open(tmp / "chat.jsonl", "w") as f:
        for user, reply in chats:
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    from ms_ray.data.pipeline import prepare  # Ray Data: imported where the fixture needs it

    schema = {k: v for k, v in SCHEMA.to_dict().items() if k != "token_ids"}
    prepare(load_config(PrepareConfig, data={
        "schema": schema, "tokenizer": str(tmp / "ref"), "output": str(tmp / "data"),
        "sources": [{"kind": "jsonl", "path": str(tmp / "chat.jsonl"), "policy": "after_input", "shards": 2}],
        "split": {"validation_fraction": 0.3}, "packing": {"max_rows": 64}}), log=lambda _: None,
        progress=lambda _: None)
    torch.manual_seed(0)  # the draw of the new token rows that the evaluation's `loss_before` repeats
    model, tokenizer = MultiStreamLM.from_base(str(tmp / "ref"), SCHEMA)
    model.save_pretrained(tmp / "ckpt", tokenizer)
    return {"reference": tmp / "ref", "data": tmp / "data", "checkpoint": tmp / "ckpt"}


def validation_ids(data: Path) -> list[str]:
    manifest = json.loads((data / "manifest.json").read_text())
    return [e for f in manifest["splits"]["validation"]["files"]
            for ids in pq.read_table(data / f, columns=["example_ids"]).column(0).to_pylist() for e in ids]


def test_scoring_of_a_hand_made_decode():
    S, E, a, b = 0, 9, 5, 6  # silence, end token, two text tokens; the user's last token at row 3
    score = score_reply([S, S, S, S, S, a, b, E, S, S], 3, S, E, start_within=4)
    assert score == {"start_rows": 2, "started_within": True, "early": False, "no_reply": False,
                     "ends_cleanly": True, "written_tokens": 3}
    late = score_reply([S, S, S, S, S, S, S, S, a, E], 3, S, E, start_within=4)
    assert late["start_rows"] == 5 and not late["started_within"] and late["ends_cleanly"]
    chatty = score_reply([a, S, S, S, S, a, E, S, b, S], 3, S, E, start_within=4)  # talks early, again after its end
    assert chatty["start_rows"] == -3 and chatty["early"] and not chatty["started_within"]
    assert not chatty["ends_cleanly"] and chatty["written_tokens"] == 4
    assert not score_reply([S, a, b, S], 0, S, E, 4)["ends_cleanly"]  # never says the end token
    quiet = score_reply([S] * 6, 3, S, E, 4)
    assert quiet["no_reply"] and quiet["start_rows"] is None and not quiet["started_within"]
    assert not quiet["early"] and not quiet["ends_cleanly"] and quiet["written_tokens"] == 0


def test_a_turn_pair_is_one_user_turn_then_one_reply():
    ids = {"<|silence|>": 0, "<|pad|>": 1, "<|end_user|>": 2, "<|end|>": 3}
    schema = StreamSchema(SCHEMA.streams, token_ids=ids)
    table = lambda user, out: np.array([user, out]).T  # noqa: E731
    assert turn_pair(table([7, 8, 2, 0, 0, 0, 0], [0, 0, 0, 0, 9, 3, 0]), schema) == (2, 4)
    assert turn_pair(table([7, 2, 0, 7, 2, 0, 0], [0, 0, 0, 0, 0, 9, 3]), schema) is None  # two user turns
    assert turn_pair(table([7, 2, 0, 0, 0, 0, 0], [0, 0, 9, 3, 9, 3, 0]), schema) is None  # two replies
    assert turn_pair(table([7, 8, 8, 2, 0, 0, 0], [0, 0, 9, 3, 0, 0, 0]), schema) is None  # reply before the end
    assert turn_pair(table([7, 2, 0, 0], [0, 0, 0, 0]), schema) is None  # no reply


def test_held_out_conversations_come_in_file_order(files):
    schema = load_export(files["checkpoint"])[0].schema
    ids = validation_ids(files["data"])
    first, skipped = held_out(files["data"], schema, 4)
    assert [c.id for c in first] == ids[:4] and skipped == 0
    every, _ = held_out(files["data"], schema, 1000)
    assert [c.id for c in every] == ids and len(ids) >= 8
    for conv in every:
        assert conv.rows[conv.user_end, 0] == schema.token_ids["<|end_user|>"]
        assert conv.reply_start == conv.user_end + 2  # after_input


def test_the_losses_count_exactly_the_reply_tokens(files):
    model, tokenizer = load_export(files["checkpoint"])
    convs, _ = held_out(files["data"], model.schema, 5)
    silence, end = model.schema.silence_id, model.schema.token_ids["<|end|>"]
    losses = reply_losses(model, convs)
    for conv, (ce, n) in zip(convs, losses):
        reply = [int(t) for t in conv.rows[:, 1] if t != silence]
        assert n == len(reply) and reply[-1] == end and math.isfinite(ce) and ce > 0
    ref_tok = AutoTokenizer.from_pretrained(files["reference"])
    base = AutoModelForCausalLM.from_pretrained(files["reference"]).eval()
    pairs = [texts(c, model.schema, tokenizer) for c in convs]
    for (user, reply), (ce, n) in zip(pairs, sequential_losses(base, ref_tok, pairs)):
        ids, start, stop = sequential_reply(ref_tok, user, reply)
        assert ids[start:stop] == ref_tok(reply, add_special_tokens=False)["input_ids"] + [ref_tok.eos_token_id]
        assert n == stop - start and math.isfinite(ce) and ce > 0
        assert ref_tok.decode(ids[:start]).endswith("<|im_start|>assistant\n") and user in ref_tok.decode(ids[:start])


def test_a_model_that_learned_a_reply_has_a_lower_loss_on_it(files):
    model, _ = load_export(files["checkpoint"])
    conv = held_out(files["data"], model.schema, 1)[0][0]
    (before, n), = reply_losses(model, [conv])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.as_tensor(conv.rows)[None]
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(tokens, loss=True).loss.backward()
        optimizer.step()
    (after, _), = reply_losses(model.eval(), [conv])
    assert after / n < 0.25 * before / n


def test_eval_writes_the_chat_report(files, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [f"checkpoint={files['checkpoint']}", f"chat.data={files['data']}", f"chat.reference={files['reference']}",
            "chat.conversations=7", "chat.samples=5", "chat.slack_rows=4", f"output={out}", "wandb.mode=offline"]
    assert main(["eval", *args]) == 0  # jobs/eval.yaml's skill section is ignored
    summary = json.loads((out / "summary.json").read_text())
    chat = summary["chat"]
    assert chat["conversations"] == 7 and chat["skipped"] == 0
    for key in ("loss", "loss_before", "loss_sequential", "rows_per_s"):
        assert math.isfinite(chat[key]) and chat[key] > 0, key
    assert abs(chat["loss"] - chat["loss_before"]) < 1e-4  # the checkpoint is the untrained conversion
    assert chat["start_rows_data"] == 2 and chat["reply_tokens"] == chat["sequential_tokens"]
    records = [json.loads(line) for line in (out / "records-chat.jsonl").read_text().splitlines()]
    ids = validation_ids(files["data"])[:7]
    assert [r["id"] for r in records] == ids and [s["id"] for s in summary["samples"]] == ids[:5]
    assert sum(r["rows"] + 4 for r in records) == chat["decoded_rows"]
    report = (out / "report.md").read_text()
    places = [report.index(f"`{i}`") for i in ids[:5]]
    assert places == sorted(places) and f"`{ids[5]}`" not in report  # the first five, in held-out order
    assert report.count("model: ") == 5 and "| loss_sequential |" in report
    assert report.strip() in capsys.readouterr().out
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_eval_without_a_reference_leaves_its_numbers_out(files, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", f"checkpoint={files['checkpoint']}", f"chat.data={files['data']}", "chat.conversations=2",
                 "chat.samples=1", "chat.batch_sessions=2", f"output={out}", "wandb.mode=disabled"]) == 0
    chat = json.loads((out / "summary.json").read_text())["chat"]
    assert chat["loss_before"] is None and chat["loss_sequential"] is None and math.isfinite(chat["loss"])
    assert "| loss_before | – |" in (out / "report.md").read_text()


def test_eval_refuses_bad_chat_settings(files, tmp_path, bound, tokenizer, capsys):
    ok = [f"checkpoint={files['checkpoint']}", f"output={tmp_path / 'out'}", "wandb.mode=disabled"]
    cases = [
        ([f"chat.data={tmp_path}"], "chat.data: ", "is not a prepared data set"),
        ([f"chat.data={files['data']}", f"chat.reference={tmp_path / 'none'}"], "chat.reference: ", "does not exist"),
        ([f"chat.data={files['data']}", "chat.conversations=3", "chat.samples=4"], "chat: ",
         "samples (4) must be at most conversations (3)"),
        ([f"chat.data={files['data']}", "chat.conversations=0"], "chat.conversations: ", "greater than 0"),
        ([f"chat.data={files['data']}", "chat.turns=3"], "chat.turns: ", "Extra inputs are not permitted"),
    ]
    for extra, field, message in cases:
        assert main(["eval", *ok, *extra]) == 2
        err = capsys.readouterr().err
        assert field in err and message in err, err
    make_model(bound, len(tokenizer)).save_pretrained(tmp_path / "three", tokenizer=tokenizer)  # user/think/output
    assert main(["eval", f"checkpoint={tmp_path / 'three'}", f"chat.data={files['data']}", *ok[1:]]) == 2
    assert "stream schemas differ between checkpoint and data set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for streams in [(StreamSpec("user", "input"), StreamSpec("output", "output")),  # no end token: no reply stream
                    (*SCHEMA.streams, StreamSpec("tool", "input"))]:  # whose turn is the user's?
        with pytest.raises(SchemaError, match="the chat evaluation needs one input stream"):
            chat_streams(StreamSchema(streams))


@pytest.mark.slow
def test_the_real_smollm2_on_three_conversations(tmp_path):
    """SmolLM2-135M-Instruct (runs/models/smollm2, `make smollm2`) converted untrained, on the real data."""
    ref, data = ROOT / "runs/models/smollm2", ROOT / "runs/data/smollm2-chat"
    if not (ref / "config.json").exists() or not (data / "manifest.json").exists():
        pytest.skip("runs/models/smollm2 or runs/data/smollm2-chat is missing (make smollm2)")
    torch.manual_seed(0)
    model, tok = MultiStreamLM.from_base(str(ref), SCHEMA)  # the data's streams (jobs/data-smollm2-chat.yaml)
    model.save_pretrained(tmp_path / "ckpt", tok)
    out = tmp_path / "eval"
    assert main(["eval", str(ROOT / "jobs/eval-smollm2-chat.yaml"), f"checkpoint={tmp_path / 'ckpt'}",
                 "chat.conversations=3", "chat.samples=3", f"output={out}", "wandb.mode=disabled"]) == 0
    chat = json.loads((out / "summary.json").read_text())["chat"]
    assert chat["conversations"] == 3 and abs(chat["loss"] - chat["loss_before"]) < 1e-3
    assert math.isfinite(chat["loss_sequential"]) and chat["loss_sequential"] < chat["loss_before"]
    assert abs(chat["reply_tokens"] - chat["sequential_tokens"]) <= 3
