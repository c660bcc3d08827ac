import pytest
import torch
from conftest import make_model
from torch import nn
from transformers import AutoModelForCausalLM

from ms_ray.core.decode import SlotCache
from ms_ray.core.families import FAMILIES, tiny_base_model
from ms_ray.core.model import MultiStreamLM, allowed, dense_mask, flex_mask, row_positions
from ms_ray.core.streams import StreamSchema, StreamSpec, TableError

V = 40


def random_docs(B, R, gen):
    """Contiguous packed documents with trailing padding (-1), as the packer writes them."""
    docs = torch.full((B, R), -1)
    for b in range(B):
        r, d = 0, 0
        end = R - int(torch.randint(0, 3, (1,), generator=gen))
        while r < end:
            n = int(torch.randint(1, 5, (1,), generator=gen))
            docs[b, r : min(r + n, end)] = d
            r, d = r + n, d + 1
    return docs


@pytest.mark.parametrize("window", [None, 1, 2])
def test_mask_equals_brute_force_rule(window):
    gen = torch.Generator().manual_seed(0)
    for C in (1, 2, 3, 5):
        docs = random_docs(3, 7, gen)
        mask = dense_mask(docs, C, torch.float32, window)
        S = 7 * C
        for b in range(3):
            for i in range(S):
                for j in range(S):
                    near = window is None or i // C - j // C <= window
                    ok = docs[b, i // C] == docs[b, j // C] and ((j // C < i // C and near) or i == j)
                    assert (mask[b, 0, i, j] == 0) == bool(ok), (C, b, i, j)
        assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("window", [None, 2])
def test_flex_block_mask_matches_rule(window):
    gen = torch.Generator().manual_seed(1)
    docs, C = random_docs(2, 9, gen), 3
    block = flex_mask(docs, C, window)
    S = 9 * C
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    for b in range(2):
        via_mod = block.mask_mod(torch.tensor(b), torch.tensor(0), q, k)
        assert torch.equal(via_mod, dense_mask(docs[b : b + 1], C, torch.float32, window)[0, 0] == 0)


def test_row_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert row_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_rows_never_see_each_other():
    q = torch.arange(6)[:, None]
    k = torch.arange(6)[None, :]
    ok = allowed(q, k, 0, 0, 3)
    assert ok[4].tolist() == [True, True, True, False, True, False]  # row 1, stream 1


@pytest.mark.parametrize("family", FAMILIES)
def test_causality_through_the_model(family, bound):
    model = make_model(bound, V, family)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, V, (1, 6, 3), generator=gen)
    base = model(tokens).logits
    r, s = 3, 1
    changed = tokens.clone()
    changed[0, r, s] = (tokens[0, r, s] + 1) % V
    after = model(changed).logits
    assert torch.equal(after[:, :r], base[:, :r])  # earlier rows: untouched, bit for bit
    others = [c for c in range(3) if c != s]
    assert torch.allclose(after[:, r, others], base[:, r, others], atol=1e-6)  # same row: invisible
    assert not torch.allclose(after[:, r, s], base[:, r, s])  # the cell itself
    for later in range(r + 1, 6):
        assert not torch.allclose(after[:, later], base[:, later])



@pytest.mark.parametrize("family", FAMILIES)
def test_rows_in_chunks_against_a_cache_equal_the_full_forward(family, bound):
    """forward_rows (the decoding path) on two sessions fed in chunks of different sizes, alone and
    together at different lengths, gives the logits the whole-table forward gives those rows."""
    model = make_model(bound, V, family)
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randint(3, V, (9, 3), generator=gen), torch.randint(3, V, (6, 3), generator=gen)
    with torch.no_grad():
        ref_a, ref_b = model(a[None]).logits[0], model(b[None]).logits[0]  # [R, C, V]
        cache = SlotCache(slots=1, cells=2)  # small: it grows on the way
        cache.select(0, 1)
        got_a = [model.forward_rows(a[None, :4], [0], cache)[0]]  # session a alone in slot 0
        cache.select(1, 1)
        got_b = [model.forward_rows(b[None, :1], [0], cache)[0]]  # session b alone in slot 1
        cache.select(0, 2)  # both together, at different lengths
        both = model.forward_rows(torch.stack([a[4:6], b[1:3]]), [4, 1], cache)
        got_a.append(both[0]), got_b.append(both[1])
        last = model.forward_rows(torch.stack([a[6:9], b[3:6]]), [6, 3], cache, last_row_only=True)
    assert both.shape == (2, 2, 3, V) and last.shape == (2, 1, 3, V)
    torch.testing.assert_close(torch.cat(got_a), ref_a[:6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_b), ref_b[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[:, 0], torch.stack([ref_a[8], ref_b[5]]), atol=1e-5, rtol=1e-5)
    with pytest.raises(TableError, match="forward_rows: expected rows"):
        model.forward_rows(a[None, :1], [0, 1], cache)

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_batch_equals_documents_alone(family, bound):
    model = make_model(bound, V, family)
    gen = torch.Generator().manual_seed(3)
    lengths = [4, 2, 5]
    docs_alone = [torch.randint(3, V, (1, n, 3), generator=gen) for n in lengths]
    pad = torch.full((1, 2, 3), bound.pad_id)
    packed = torch.cat([*docs_alone, pad], dim=1)
    doc_ids = torch.tensor([[0] * 4 + [1] * 2 + [2] * 5 + [-1] * 2])
    out = model(packed, doc_ids).logits
    start = 0
    for n, doc in zip(lengths, docs_alone):
        torch.testing.assert_close(out[:, start : start + n], model(doc).logits, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("family", FAMILIES)
def test_one_stream_equals_base_causal_lm(family):
    schema = StreamSchema((StreamSpec("output", "output"),))
    base = tiny_base_model(family, V)
    model = MultiStreamLM(base, schema)  # stream embedding zero-initialised
    assert torch.count_nonzero(model.stream_embed.weight) == 0
    tokens = torch.randint(0, V, (2, 9, 1), generator=torch.Generator().manual_seed(4))
    ours = model(tokens).logits[:, :, 0]
    reference = AutoModelForCausalLM.from_config(base.config, attn_implementation="sdpa")
    reference.load_state_dict(base.state_dict())
    reference.config._attn_implementation = "sdpa"
    torch.testing.assert_close(ours, reference(input_ids=tokens[..., 0]).logits, atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_sdpa(bound):
    """FlexAttention is the CUDA default; its forward runs on CPU too, so parity is checked here."""
    model = make_model(bound, V)
    tokens = torch.randint(3, V, (2, 6, 3), generator=torch.Generator().manual_seed(5))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, -1]])
    with torch.no_grad():  # FlexAttention has no backward on CPU
        sdpa = model(tokens, docs).logits
        model.attention = "flex"
        torch.testing.assert_close(model(tokens, docs).logits, sdpa, atol=1e-5, rtol=1e-5)
        # a layout seen before reuses its BlockMask (the training loop passes the host's doc_ids bytes)
        key = docs.numpy().tobytes()
        torch.testing.assert_close(model(tokens, docs, layout_key=key).logits, sdpa, atol=1e-5, rtol=1e-5)
        mask = model._block_masks[key]
        model(tokens, docs, layout_key=key)
        assert model._block_masks[key] is mask and len(model._block_masks) == 1


def test_attention_selection(model):
    assert not model.use_flex(torch.device("cpu"))
    assert model.use_flex(torch.device("cuda"))
    model.attention = "sdpa"
    assert not model.use_flex(torch.device("cuda"))
    with pytest.raises(ValueError, match="attention must be"):
        MultiStreamLM(model.base, model.schema, attention="eager")


def test_loss_is_next_row_weighted_and_normalised(bound):
    model = make_model(bound, V)
    tokens = torch.randint(3, V, (2, 5, 3), generator=torch.Generator().manual_seed(6))
    out = model(tokens, loss=True, keep_logits=True)
    logits = out.logits
    # by hand: cell (r, s) predicts (r+1, s); user weight 0, think 0.5, output 1
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(2, 4, 3)
    weights = torch.tensor([0.0, 0.5, 1.0])
    expected_sum = (ce * weights).sum()
    assert out.num_supervised.item() == 2 * 4 * 2  # only the two output streams
    torch.testing.assert_close(out.loss_sum, expected_sum)
    torch.testing.assert_close(out.loss, expected_sum / 16)
    losses = out.stream_losses(bound)
    torch.testing.assert_close(torch.tensor(losses["user"]), ce[..., 0].mean())
    torch.testing.assert_close(torch.tensor(losses["output"]), ce[..., 2].mean())
    # a global normaliser (data-parallel) replaces the local count
    torch.testing.assert_close(model(tokens, loss=True, normaliser=32).loss, expected_sum / 32)
    out.loss.backward()
    assert model.stream_embed.weight.grad is not None and model.stream_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_loss_equals_the_full_logits_loss_with_its_gradients(bound, family):
    """The loss over hidden states, projected a few cells at a time (checkpointed), gives the same
    loss, per-stream sums and gradients as the loss over the whole [B, R, C, V] logits."""
    torch.manual_seed(0)
    model = MultiStreamLM(tiny_base_model(family, V, seed=1), bound)
    nn.init.normal_(model.stream_embed.weight, std=0.1)  # so the stream embedding's gradient is tested too
    tokens = torch.randint(3, V, (2, 9, 3), generator=torch.Generator().manual_seed(8))
    docs = torch.tensor([[0] * 5 + [1] * 4, [0] * 7 + [-1] * 2])

    def run(**kwargs):
        model.zero_grad()
        out = model(tokens, docs, loss=True, normaliser=40, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(keep_logits=True)
    model.loss_chunk_mb = 4 * V * 5 / 2**20  # 5 cells a chunk: 11 chunks of the 54 cells
    fused, fused_grads = run()
    model.base.get_output_embeddings().weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks it: the checkpointed path
    checkpointed, checkpointed_grads = run()
    del model.base.get_output_embeddings().weight.ds_id
    assert full.logits is not None and fused.logits is None and checkpointed.logits is None
    for chunked, grads in ((fused, fused_grads), (checkpointed, checkpointed_grads)):
        torch.testing.assert_close(chunked.loss, full.loss)
        torch.testing.assert_close(chunked.stream_loss_sum, full.stream_loss_sum)
        assert torch.equal(chunked.num_supervised, full.num_supervised)
        assert torch.equal(chunked.stream_count, full.stream_count)
        assert grads.keys() == full_grads.keys() and "stream_embed.weight" in grads
        for name, grad in full_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_save_and_load_round_trip(tmp_path, model, tokenizer):
    tokens = torch.randint(3, V, (1, 5, 3), generator=torch.Generator().manual_seed(7)) % len(tokenizer)
    model.save_pretrained(tmp_path, tokenizer)
    assert {"config.json", "model.safetensors", "ms_schema.json", "stream_embeddings.safetensors",
            "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = MultiStreamLM.from_pretrained(tmp_path)
    assert loaded.schema == model.schema and loaded.schema.token_ids == model.schema.token_ids
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    # the base weights are a standard HF checkpoint
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(plain.get_input_embeddings().weight, model.base.get_input_embeddings().weight)
    with pytest.raises(FileNotFoundError, match="not a multi-stream checkpoint"):
        MultiStreamLM.from_pretrained(tmp_path / "nowhere")
    assert loaded.window is None
    model.window = 2  # the window travels with the model: decoding uses what training used
    model.save_pretrained(tmp_path / "windowed", tokenizer)
    windowed = MultiStreamLM.from_pretrained(tmp_path / "windowed")
    assert windowed.window == 2 and torch.equal(windowed(tokens).logits, model(tokens).logits)
    assert not torch.equal(windowed(tokens).logits, loaded(tokens).logits)  # 5 rows: the window hides some


def test_from_base_adds_silence_and_keeps_the_model(tmp_path, tokenizer):
    """A single-stream HF model + tokenizer without the schema's tokens: one call converts it."""
    from ms_ray.data.tokenizer import word_tokenizer

    plain_schema = StreamSchema((StreamSpec("x", "output"),), silence_token="<|q|>", pad_token="<|p|>")
    plain_tok = word_tokenizer(["a", "b", "c", "d"], plain_schema)  # has no <|silence|>
    base = tiny_base_model("qwen3", len(plain_tok))
    base.save_pretrained(tmp_path)
    plain_tok.save_pretrained(tmp_path)
    schema = StreamSchema((StreamSpec("user", "input"), StreamSpec("output", "output")))
    model, tok = MultiStreamLM.from_base(str(tmp_path), schema)
    assert len(tok) == len(plain_tok) + 2 and model.vocab_size == len(tok)
    assert model.schema.silence_id == tok.convert_tokens_to_ids("<|silence|>") >= len(plain_tok)
    one = StreamSchema((StreamSpec("output", "output"),))
    ids = torch.tensor([[[1], [2], [3], [4]]])
    converted = MultiStreamLM(model.base, one)(ids).logits[0, :, 0, : len(plain_tok)]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(converted, reference(input_ids=ids[..., 0]).logits[0], atol=1e-5, rtol=1e-5)


def test_bad_input_is_named(model):
    with pytest.raises(TableError, match="table has 2 streams"):
        model(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(TableError, match="out of range"):
        model(torch.full((1, 3, 3), model.vocab_size))
    with pytest.raises(TableError, match="doc_ids: expected shape"):
        model(torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.slow
def test_compiled_model_gives_the_eager_logits_loss_and_gradients(bound):
    """model.compile (torch.compile, CPU inductor here): the same logits, loss and gradients as eager.
    One graph (~1 min to compile on 2 cores): the training forward with its logits kept."""
    model = make_model(bound, V)
    tokens = torch.randint(3, V, (2, 6, 3), generator=torch.Generator().manual_seed(5))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, -1]])

    def run():
        model.zero_grad()
        out = model(tokens, docs, loss=True, keep_logits=True, check=False)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = run()
    model.compile()
    compiled, compiled_grads = run()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-6, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
