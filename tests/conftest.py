import os

# Offline and quiet, for every test (the Makefile sets the same for `make test`).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

from ms_ray.core.families import tiny_base_model
from ms_ray.core.model import MultiStreamLM
from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.tokenizer import word_tokenizer

torch.set_num_threads(2)
WORDS = "hello there how are you today yes no maybe one two three four five six seven eight nine".split()


@pytest.fixture
def schema():
    return StreamSchema((
        StreamSpec("user", "input"),
        StreamSpec("think", "output", loss_weight=0.5),
        StreamSpec("output", "output", end_token="<|end|>"),
    ))


@pytest.fixture
def tokenizer(schema):
    return word_tokenizer(WORDS, schema)


@pytest.fixture
def bound(schema, tokenizer):
    return schema.bind(tokenizer)


def make_model(schema, vocab_size, family="llama", seed=0, **sizes):
    """A tiny random multi-stream model whose stream embedding is random too (a zero one would
    hide bugs in how it is added)."""
    model = MultiStreamLM(tiny_base_model(family, vocab_size, seed=seed, **sizes), schema).eval()
    with torch.no_grad():
        model.stream_embed.weight.normal_(0, 0.5)
    return model


@pytest.fixture
def model(bound, tokenizer):
    return make_model(bound, len(tokenizer))


@pytest.fixture(scope="module")
def tok():
    """The skill tasks' word tokenizer (one token per task word)."""
    from ms_ray.data.skills import skill_tokenizer

    return skill_tokenizer()


@pytest.fixture(scope="module")
def sch(tok):
    """The skill tasks' stream schema, bound to `tok`."""
    from ms_ray.data.skills import SKILL_STREAMS

    return SKILL_STREAMS.bind(tok)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray on 127.0.0.1 for the whole test session (started on first use)."""
    from ms_ray.ray_env import init_ray

    ray = init_ray(num_cpus=3)  # 2 training workers + Ray Data reading beside them
    yield ray
    ray.shutdown()
