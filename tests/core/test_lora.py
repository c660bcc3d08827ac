"""LoRA over a tiny multi-stream model (ms_ray/core/lora.py): what trains, the merge, the config."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ms_ray.config import ConfigError, ModelConfig, TrainConfig, load_config
from ms_ray.core.families import build_model
from ms_ray.core.lora import apply_lora, is_lora, merge_lora, rows_only, trainable_share
from ms_ray.core.model import MultiStreamLM
from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.tokenizer import word_tokenizer
from ms_ray.train.optim import param_groups

ROOT = Path(__file__).resolve().parents[2]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_settings(**changes):
    """model.lora as the config gives it (defaults), with changes."""
    return ModelConfig(lora=changes).lora


def tables(model, seed=0):
    """tokens [2, 6, C], two packed documents in the second table."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.vocab_size, (2, 6, model.num_streams), generator=g)
    docs = torch.tensor([[0] * 6, [0, 0, 0, 1, 1, 1]])
    return tokens, docs


def tokenizer_of(schema):
    return word_tokenizer("one two three four five six".split(), schema)


def lora_model(family="llama", tie=True, **changes):
    """A tiny model built from a ModelConfig with model.lora set; its stream embedding random."""
    schema = StreamSchema((StreamSpec("user", "input"), StreamSpec("output", "output", end_token="<|end|>")))
    cfg = ModelConfig(family=family, hidden_size=32, num_heads=4, tie_embeddings=tie, lora=changes)
    model = build_model(cfg, schema, tokenizer_of(schema))[0].eval()
    with torch.no_grad():
        model.stream_embed.weight.normal_(0, 0.5)
    return model, cfg


def plain_twin(cfg, model):
    """The same model without LoRA: the base as build_model makes it, the same stream embedding."""
    twin = build_model(cfg.model_copy(update={"lora": None}), model.schema, tokenizer_of(model.schema))[0].eval()
    twin.stream_embed.load_state_dict(model.stream_embed.state_dict())
    return twin


def randomise_adapters(model, seed=1):
    """Trained-looking adapters and special rows (B = 0 would hide every merge bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_wrapped_model_starts_equal_to_its_base(family):
    model, cfg = lora_model(family)
    assert is_lora(model)
    tokens, docs = tables(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, docs).logits, plain_twin(cfg, model)(tokens, docs).logits,
                                   rtol=0, atol=0)  # B = 0: the adapters add exactly nothing


def test_only_adapters_the_stream_embedding_and_the_special_rows_train():
    model, _ = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    embed = "base.base_model.model.model.embed_tokens.weight"  # tied: the output head's too
    assert trainable == adapters | {"stream_embed.weight", embed}
    assert {n.split(".")[-4] for n in adapters} == set(PROJECTIONS)  # every projection of both layers
    assert len(adapters) == 2 * 2 * len(PROJECTIONS)
    (weight,) = [p for n, p in model.named_parameters() if n == embed]
    assert rows_only(weight) and not any(rows_only(p) for n, p in model.named_parameters() if n != embed)

    tokens, docs = tables(model)
    model(tokens, docs, loss=True).loss.backward()
    special = sorted(set(model.schema.token_ids.values()))
    assert weight.grad[special].abs().sum() > 0
    others = torch.ones(len(weight), dtype=torch.bool)
    others[special] = False
    assert weight.grad[others].abs().sum() == 0  # the pretrained vocabulary does not move
    assert model.stream_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    trainable_n, total = trainable_share(model)
    hidden, rank = 32, 16
    assert trainable_n == sum(p.numel() for n, p in model.named_parameters() if n in adapters) + (
        len(special) * hidden + model.num_streams * hidden)
    assert trainable_n < total / 2 and rank == model.base.peft_config["default"].r


def test_the_optimizer_gets_trainable_weights_only_and_no_decay_on_row_tensors():
    model, _ = lora_model()
    groups = param_groups(model, SimpleNamespace(lr=1e-3, stream_embed_lr=None))
    assert [len(g["params"]) for g in groups] == [28, 1, 1]  # adapters; stream embedding; special rows
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert groups[2]["weight_decay"] == 0.0 and rows_only(groups[2]["params"][0])
    full = build_model(ModelConfig(hidden_size=32, num_heads=4), model.schema, tokenizer_of(model.schema))[0]
    assert len(param_groups(full, SimpleNamespace(lr=1e-3, stream_embed_lr=None))) == 2  # as before LoRA


def test_gradient_checkpointing_through_peft_gives_the_same_gradients():
    model, _ = lora_model()
    model.train()  # checkpointing recomputes in training mode only
    tokens, docs = tables(model)

    def gradients():
        model.zero_grad()
        model(tokens, docs, loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the loop
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) == 30  # 28 adapter tensors, stream, embedding
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_untied_heads_and_trainable_modules():
    model, _ = lora_model(tie=False, trainable=["norm", "embed_tokens"])
    by_name = dict(model.named_parameters())
    head = by_name["base.base_model.model.lm_head.weight"]
    embed = by_name["base.base_model.model.model.embed_tokens.weight"]
    assert rows_only(head) and head.requires_grad  # the untied output head: its special rows
    assert embed.requires_grad and not rows_only(embed)  # trained in full
    assert by_name["base.base_model.model.model.norm.weight"].requires_grad
    assert not by_name["base.base_model.model.model.layers.0.input_layernorm.weight"].requires_grad
    off, _ = lora_model(special_token_rows=False)
    assert {n for n, p in off.named_parameters() if p.requires_grad and "lora_" not in n} == {"stream_embed.weight"}


def test_merged_model_equals_the_unmerged_one_and_saves_as_a_plain_folder(tmp_path):
    model, _ = lora_model(tie=False)
    randomise_adapters(model)
    tokens, docs = tables(model)
    with torch.no_grad():
        unmerged = model(tokens, docs).logits
    with pytest.raises(ValueError, match="merge them first"):
        model.save_pretrained(tmp_path / "adapters")  # peft would write the adapters alone
    merged = merge_lora(model)
    assert not is_lora(merged) and type(merged.base).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad and not rows_only(p) for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens, docs).logits, unmerged, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "export", tokenizer_of(merged.schema))
    loaded = MultiStreamLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, docs).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in loaded.state_dict())


def test_a_target_or_trainable_module_the_model_lacks_is_named():
    model, _ = lora_model()
    plain = merge_lora(model)
    with pytest.raises(ValueError, match=r"model.lora.target_modules: \['qkv_proj'\] do not name"):
        apply_lora(plain, lora_settings(target_modules=["qkv_proj"]))
    fresh, _ = lora_model()
    fresh = merge_lora(fresh)
    with pytest.raises(ValueError, match=r"model.lora.trainable: \['ln_f'\] name no module of LlamaForCausalLM"):
        apply_lora(fresh, lora_settings(trainable=["ln_f"]))


@pytest.mark.parametrize("override, message", [
    ("model.lora={rank: 0}", "model.lora.rank: Input should be greater than 0"),
    ("model.lora={alpha: -1}", "model.lora.alpha: Input should be greater than 0"),
    ("model.lora={dropout: 1}", "model.lora.dropout: Input should be less than 1"),
    ("model.lora={target_modules: []}", "model.lora.target_modules: List should have at least 1 item"),
    ("model.lora={target_modules: [q-proj]}", "model.lora.target_modules: ['q-proj'] are not module names"),
    ("model.lora={trainable: [norm, norm]}", "model.lora.trainable: repeated names"),
    ("model.lora={trainable: [stream_embed]}", "model.lora.trainable: stream_embed always trains"),
    ("model.lora={trainable: [q_proj]}", "model.lora: trainable: ['q_proj'] also in target_modules"),
    ("model.lora={ranks: 4}", "model.lora.ranks: Extra inputs are not permitted"),
])
def test_bad_lora_settings_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, ROOT / "jobs/tiny.yaml", [override], check_paths=False)
    assert message in str(e.value)


def test_lora_settings_default_to_the_projections_and_full_fine_tuning_stays_the_default():
    assert ModelConfig().lora is None
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["model.lora.rank=4"], check_paths=False)
    lora = cfg.model.lora
    assert (lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules), lora.trainable,
            lora.special_token_rows) == (4, 32.0, 0.0, PROJECTIONS, [], True)
