import pytest
import torch
from conftest import make_model

from ms_ray.core.decode import CellSampling, RowDecoder, Sampling, StopRules, sample
from ms_ray.core.families import FAMILIES
from ms_ray.core.streams import TableError

V = 40


def teacher_forced(decoder, table, prefill_rows, session_id=None):
    """Open a session with `prefill_rows` rows of `table` [R, C], then force every later cell by
    pushing it on its stream; returns the session id."""
    sid = decoder.open(session_id, prefill=table[:prefill_rows] if prefill_rows else None, stop=StopRules(None))
    for s, name in enumerate(decoder.schema.names):
        decoder.push(sid, name, table[prefill_rows:, s])
    return sid


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_reproduces_teacher_forced_logits(family, bound):
    model = make_model(bound, V, family)
    table = torch.randint(3, V, (10, 3), generator=torch.Generator().manual_seed(0))
    reference = model(table[None]).logits[0]  # [R, C, V]
    for prefill in (0, 1, 4):
        decoder = RowDecoder(model, initial_rows=2)  # small, so the cache grows mid-run
        sid = teacher_forced(decoder, table, prefill)
        for r in range(prefill, 10):
            (row,) = decoder.step(return_logits=True)
            assert row.session == sid and row.row == r and row.tokens == table[r].tolist()
            torch.testing.assert_close(row.logits, reference[r], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("window", [3, 16])
def test_windowed_decoding_reproduces_the_windowed_forward_in_constant_memory(family, window, bound):
    """A windowed session drops the front of its slot every window // 8 rows (at least 1),
    re-anchoring the kept keys; its logits still equal the windowed teacher-forced forward, from
    a prefill longer than the slot too, and the slot never holds more than window + window // 8 rows."""
    model = make_model(bound, V, family)
    model.window = window
    R = 3 * window + 7
    table = torch.randint(3, V, (R, 3), generator=torch.Generator().manual_seed(0))
    reference = model(table[None]).logits[0]  # [R, C, V], the windowed rule
    slot_rows = window + max(1, window // 8)
    for prefill in (0, 2, window + 5):
        decoder = RowDecoder(model, initial_rows=2)
        sid = teacher_forced(decoder, table, prefill)
        positions = []
        for r in range(prefill, R):
            (row,) = decoder.step(return_logits=True)
            session = decoder.sessions[sid]
            positions.append(session.rows - 1 - session.base)  # the new row's RoPE position
            assert row.row == r and row.tokens == table[r].tolist()
            torch.testing.assert_close(row.logits, reference[r], atol=1e-4, rtol=0)
        assert max(positions) < slot_rows and decoder.cache.cells <= slot_rows * 3
        assert decoder.sessions[sid].base > 0


def test_re_anchoring_at_row_a_million_changes_nothing_beyond_rounding(bound):
    """A key rotated by RoPE at row 10^6 + j, moved back 10^6 rows, is the key at row j: what the
    decoder does to every kept key of a windowed session, so positions never grow with its age."""
    model = make_model(bound, V, "llama")
    inv_freq = next(m.inv_freq for m in model.base.modules() if hasattr(m, "inv_freq")).double()
    D = 2 * inv_freq.numel()
    keys = torch.randn(2, 5, D, dtype=torch.float64)

    def at(rows, k):  # HF's RoPE, computed exactly (float64 angles)
        angle = torch.cat([rows[:, None] * inv_freq, rows[:, None] * inv_freq], -1)  # [5, D]
        return k * angle.cos() + torch.cat([-k[..., D // 2:], k[..., : D // 2]], -1) * angle.sin()

    j = torch.arange(5, dtype=torch.float64)
    old = at(j + 10**6, keys)
    torch.testing.assert_close(model.shift_positions(old, 10**6), at(j, keys), atol=1e-9, rtol=0)
    # float32 keys (the cache's dtype): the error stays at float32 rounding, as for any key
    moved = model.shift_positions(old.float(), 10**6).double()
    assert (moved - at(j, keys)).abs().max() < 1e-5


def test_sessions_together_equal_each_alone(bound):
    """Greedy sessions of different lengths joining and leaving at different steps: the batched
    decoder gives every session exactly the rows and logits it gets when decoded alone."""
    model = make_model(bound, V, "qwen3")
    gen = torch.Generator().manual_seed(1)
    plans = [  # (join at step, prefill rows, user tokens pushed, rows to decode)
        (0, 5, [4, 5, 6], 8), (0, 0, [7], 5), (2, 9, [], 6), (3, 1, [8, 9, 10, 11], 9), (5, 3, [12], 3),
    ]
    tables = [torch.randint(3, V, (max(p[1], 1), 3), generator=gen) for p in plans]

    def run(indices):
        decoder = RowDecoder(model, initial_rows=4)
        rows = {i: [] for i in indices}
        step = 0
        while step < 20:
            for i in indices:
                join, prefill, user, n = plans[i]
                if step == join:
                    decoder.open(f"s{i}", prefill=tables[i][:prefill] if prefill else None, stop=StopRules(n))
                    decoder.push(f"s{i}", "user", user)
            for row in decoder.step(return_logits=True):
                rows[int(row.session[1:])].append((row.row, row.tokens, row.logits, row.done))
            step += 1
        return rows

    together = run(range(len(plans)))
    for i in range(len(plans)):
        alone = run([i])[i]
        assert len(together[i]) == plans[i][3] == len(alone)
        assert together[i][-1][3] == "max_rows"
        for (r1, t1, l1, _), (r2, t2, l2, _) in zip(together[i], alone):
            assert r1 == r2 and t1 == t2
            torch.testing.assert_close(l1, l2, atol=1e-4, rtol=0)


def test_many_sessions_joining_without_prefill(bound):
    """Sessions opened with no prefill, one per step, beyond the cache's first slot capacity:
    each decodes exactly as it does alone (the serving path opens sessions this way)."""
    model = make_model(bound, V)

    def run(indices):
        decoder = RowDecoder(model)
        rows = {i: [] for i in indices}
        for step in range(16):
            if step in indices:
                decoder.open(f"s{step}", stop=StopRules(6))
                decoder.push(f"s{step}", "user", [3 + step, 4 + step])
            for row in decoder.step():
                rows[int(row.session[1:])].append(row.tokens)
        return rows

    together = run(list(range(9)))
    for i in range(9):
        assert together[i] == run([i])[i] and len(together[i]) == 6


def test_input_injection_one_token_per_row_and_silence(model, bound):
    decoder = RowDecoder(model)
    sid = decoder.open(stop=StopRules(6))
    decoder.push(sid, "user", [5, 6])
    rows = [decoder.step()[0].tokens for _ in range(3)]
    decoder.push(sid, "user", [7])
    rows += [decoder.step()[0].tokens for _ in range(3)]
    assert [r[0] for r in rows] == [5, 6, bound.silence_id, 7, bound.silence_id, bound.silence_id]
    assert rows[0][1:] == [bound.silence_id] * 2  # nothing to predict the first row from


def test_forcing_an_output_stream(model):
    decoder = RowDecoder(model)
    sid = decoder.open(prefill=[[3, 4, 5]], stop=StopRules(4))
    decoder.push(sid, "output", [9, 10])
    assert decoder.pending(sid) == [0, 0, 2]
    rows = [decoder.step()[0].tokens for _ in range(4)]
    assert [r[2] for r in rows[:2]] == [9, 10]


def test_stop_rules(model, bound):
    end = bound.end_ids()["output"]
    decoder = RowDecoder(model)
    decoder.open("a", stop=StopRules(max_new_rows=3))
    b = decoder.open("b", stop=StopRules(max_new_rows=50))
    decoder.push(b, "output", [7, end])
    c = decoder.open("c", stop=StopRules(max_new_rows=50, end_streams=(), silent_rows=2))
    decoder.push(c, "user", [5])
    for stream in ("think", "output"):  # a random model rarely chooses silence: force it
        decoder.push(c, stream, [bound.silence_id] * 3)
    done = {}
    for _ in range(6):
        for row in decoder.step():
            if row.done:
                done[row.session] = (row.row, row.done)
    assert done == {"a": (2, "max_rows"), "b": (1, "end_token"), "c": (2, "silence")}
    assert decoder.sessions == {}


def test_ended_stream_falls_silent(model, bound):
    end = bound.end_ids()["output"]
    decoder = RowDecoder(model)
    sid = decoder.open(stop=StopRules(5, end_streams=("output",)))
    decoder.push(sid, "output", [end])
    (first,) = decoder.step()
    assert first.done == "end_token"


def test_sampling_rules():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=gen)

    def cells(**kw):
        return CellSampling.build([[Sampling(**kw)] * 3] * 2, "cpu")

    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, cells(), 0), greedy)
    # top-k 1 and a tiny top-p are greedy even at a high temperature
    assert torch.equal(sample(logits, cells(temperature=5.0, top_k=1), 0, gen), greedy)
    assert torch.equal(sample(logits, cells(temperature=5.0, top_p=1e-6), 0, gen), greedy)
    # top-k 3: every draw is among the 3 best, and it does sample
    draws = torch.stack([sample(logits, cells(temperature=5.0, top_k=3), 0, gen) for _ in range(50)])
    assert (draws[..., None] == logits.topk(3, dim=-1).indices).any(-1).all()
    assert len(draws.unique()) > 6
    # silence penalty: a silence-preferring row stops choosing silence; the input is not modified
    loud = logits.clone()
    loud[..., 0] = 100
    assert (sample(loud, cells(), 0) == 0).all()
    assert (sample(loud, cells(silence_penalty=1000.0), 0) != 0).all()
    assert (loud[..., 0] == 100).all()
    # mixed settings per cell: greedy cells stay greedy beside hot ones
    mixed = CellSampling.build([[Sampling(), Sampling(temperature=5.0), Sampling()]] * 2, "cpu")
    for _ in range(10):
        got = sample(logits, mixed, 0, gen)
        assert torch.equal(got[:, [0, 2]], greedy[:, [0, 2]])
    # same seed, same draws
    a = sample(logits, cells(temperature=5.0), 0, torch.Generator().manual_seed(3))
    b = sample(logits, cells(temperature=5.0), 0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_repetition_penalty_in_sample():
    logits = torch.zeros(1, 2, 6)
    logits[0, :, 2], logits[0, :, 3], logits[0, :, 4] = 4.0, 3.0, -1.0
    cells = CellSampling.build([[Sampling()] * 2], "cpu")
    assert sample(logits, cells, 0).tolist() == [[2, 2]]
    # token 2 already written by stream 0: 4 / 2 = 2 < 3, so 3 wins there; stream 1 is untouched
    repeated = (torch.tensor([0]), torch.tensor([0]), torch.tensor([2]), torch.tensor([2.0]))
    assert sample(logits, cells, 0, repeated=repeated).tolist() == [[3, 2]]
    # a negative logit is multiplied (made less likely too), as transformers does
    low = torch.full((1, 1, 3), -2.0)
    low[0, 0, 1] = -1.0
    one = CellSampling.build([[Sampling()]], "cpu")
    penalised = (torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([3.0]))
    assert sample(low, one, 2, repeated=penalised).tolist() == [[0]]
    assert logits[0, 0, 2] == 4.0  # the input is not modified


def test_repetition_penalty_counts_the_current_turn_only(model, bound):
    """Each sampled output token is the argmax of the last row's logits with the penalty applied
    to the tokens the stream wrote since its last end token (checked against a plain recomputation);
    the end token starts a new turn."""
    out, end, silence = bound.index("output"), bound.end_ids()["output"], bound.silence_id
    talk = Sampling(silence_penalty=1e4, repetition_penalty=2.0)
    decoder = RowDecoder(model, seed=0)
    sid = decoder.open(prefill=[[3, 4, 5]], sampling={"output": talk}, stop=StopRules(50, end_streams=()))
    decoder.push(sid, "output", [6, 6, end])  # forced cells count too; then a new turn
    previous, turn, rows, differs = None, set(), [], 0
    for _ in range(40):
        (row,) = decoder.step(return_logits=True)
        token = row.tokens[out]
        if previous is not None and len(rows) >= 3:  # sampled cells (the first three were forced)
            logits = previous[out].clone().float()
            logits[silence] -= 1e4
            for t in turn:
                logits[t] = logits[t] / 2.0 if logits[t] > 0 else logits[t] * 2.0
            assert token == int(logits.argmax()), (rows, token)
            differs += int(logits.argmax()) != int(previous[out].float().argmax())
        turn = set() if token == end else turn | ({token} - {silence})
        previous, rows = row.logits, rows + [token]
    assert rows[:3] == [6, 6, end] and decoder.sessions[sid].turn[out] == turn
    assert differs > 0  # the penalty changed some choices


def test_per_stream_sampling_settings(model):
    decoder = RowDecoder(model, seed=1)
    decoder.open(prefill=[[3, 4, 5]], sampling={"think": Sampling(temperature=3.0)}, stop=StopRules(30))
    rows = [decoder.step()[0].tokens for _ in range(30)]
    assert len({r[1] for r in rows}) > 3  # think is sampled hot
    with pytest.raises(KeyError, match="unknown streams \\['tool'\\]"):
        decoder.open(sampling={"tool": Sampling()})


def test_a_seeded_session_draws_the_same_whoever_decodes_beside_it(model):
    """open(seed=...): a session's samples come from its own generator, so the same seed gives the
    same tokens alone or in a batch with hot-sampled neighbours (what an API's `seed` promises)."""
    hot = Sampling(temperature=1.5, silence_penalty=5.0)

    def seeded_rows(neighbours: int, seed: int = 11) -> list[list[int]]:
        decoder = RowDecoder(model, seed=neighbours)
        for _ in range(neighbours):
            decoder.open(sampling=hot, stop=StopRules(12))
        sid = decoder.open(sampling=hot, stop=StopRules(12), seed=seed)
        return [row.tokens for _ in range(12) for row in decoder.step() if row.session == sid]

    alone = seeded_rows(0)
    assert seeded_rows(3) == alone and seeded_rows(1) == alone
    assert seeded_rows(0, seed=12) != alone and len({t for row in alone for t in row}) > 3  # really sampled


def test_closing_while_new_sessions_wait_for_their_first_step(model):
    """Sessions that joined since the last step have no cache cells yet (their slots may lie beyond
    the buffers): closing an older one moves such a session into the hole without touching the
    cache, and every session then decodes as it would have (16 chat completions opening and closing
    at once on a served replica raised IndexError here)."""
    decoder = RowDecoder(model, max_sessions=16)
    first = [decoder.open(prefill=[[3, 4, 5]], stop=StopRules(10)) for _ in range(4)]
    decoder.step()
    late = [decoder.open(stop=StopRules(10)) for _ in range(8)]  # slots 4..11, beyond the buffers
    decoder.close(first[1])
    decoder.close(late[2])
    alone = RowDecoder(model)
    reference = alone.open(stop=StopRules(10))
    expected = [alone.step()[0].tokens for _ in range(5)]
    got = [[row.tokens for row in decoder.step() if row.session == late[-1]][0] for _ in range(5)]
    assert got == expected  # the moved, never-stepped session decodes as if alone
    assert len(decoder.sessions) == 10 and sorted(s.slot for s in decoder.by_slot) == list(range(10))
    assert reference


def test_bad_requests_are_named(model):
    decoder = RowDecoder(model, max_sessions=1)
    sid = decoder.open("x")
    with pytest.raises(KeyError, match="unknown session 'nope'; open sessions: \\['x'\\]"):
        decoder.push("nope", "user", [1])
    with pytest.raises(KeyError, match="session 'x': unknown stream 'tool'"):
        decoder.push(sid, "tool", [1])
    with pytest.raises(TableError, match="stream 'user': token ids \\[999\\] out of range"):
        decoder.push(sid, "user", [999])
    with pytest.raises(ValueError, match="already open"):
        decoder.open("x")
    with pytest.raises(RuntimeError, match="decoder is full"):
        decoder.open("y")
    decoder.close("x")
    with pytest.raises(TableError, match="prefill: expected rows"):
        decoder.open("z", prefill=[[1, 2]])
    with pytest.raises(KeyError, match="unknown session"):
        decoder.close("x")


def test_ended_stream_reopens_on_new_input(model, bound):
    """reopen_on_input: after its end token an output stream is forced silent only until an input
    token arrives; the session lives on (no end on end tokens)."""
    end, silence = bound.end_ids()["output"], bound.silence_id
    out, user = bound.index("output"), bound.index("user")
    decoder = RowDecoder(model)
    talk = Sampling(silence_penalty=1000.0)  # a random model that always speaks when it may
    sid = decoder.open(sampling={"output": talk}, stop=StopRules(20, end_streams=("output",), reopen_on_input=True))
    decoder.push(sid, "output", [7, 8, end])
    rows = [decoder.step()[0] for _ in range(8)]
    assert [r.tokens[out] for r in rows[:3]] == [7, 8, end] and all(r.done is None for r in rows)
    assert all(r.tokens[out] == silence for r in rows[3:])  # ended: silent, not closed
    decoder.push(sid, "user", [9])
    row = decoder.step()[0]
    assert row.tokens[user] == 9 and row.tokens[out] not in (silence, end)  # the input re-opened it
    assert decoder.step()[0].tokens[out] != silence


@pytest.mark.parametrize("window", [None, 4])
def test_a_session_started_from_a_snapshot_continues_as_the_original(window, bound):
    """snapshot() + open(start=...): the copy's rows and logits equal the original's from then on
    (a windowed slot that dropped its front included), and the original is left as it was."""
    model = make_model(bound, V, "llama")
    model.window = window
    talk = Sampling(silence_penalty=1e4)
    decoder = RowDecoder(model, initial_rows=2)
    decoder.open("a", sampling=talk, stop=StopRules(None, ()))
    decoder.push("a", "user", [5, 6, 7])
    for _ in range(13):
        decoder.step()
    state = decoder.snapshot("a")
    other = RowDecoder(model, initial_rows=2)
    other.open("b", sampling=talk, stop=StopRules(None, ()), start=state)
    for _ in range(9):
        (a,) = decoder.step(return_logits=True)
        (b,) = other.step(return_logits=True)
        assert a.row == b.row and a.tokens == b.tokens
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
