"""Row decoding for many sessions at once, with a slot-based KV cache.

Every `step()` builds one new row for every open session and runs ONE batched forward pass:
  - output cells are sampled from the previous row's logits (or forced, when tokens were pushed);
  - input cells are injected from outside: one pushed token per row, silence when none is queued;
  - the new row (C cells per session) attends to its session's whole cache plus itself.
The model applies the rule (MultiStreamLM.forward_rows: mask, positions, stream embedding); this
module keeps the slots, the sampling and the stop rules. Sessions have different lengths: each
owns a slot of the cache [slots, kv_heads, cells, head_dim] and its length; the mask hides what
lies beyond. Sessions join (with a one-pass prefill) and leave between steps; leaving moves the
last slot into the hole, so slots 0..n-1 stay dense.
With a windowed model (model.window = W rows) a session holds at most W + W/8 rows, whatever its
age: when its slot is full, the last W rows move to the front (their keys re-anchored by
MultiStreamLM.shift_positions, so positions stay small) and `base` counts the rows dropped.
Host and device meet once per step (the new rows, for the stop rules), never per token.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .model import MultiStreamLM
from .sampling import CellSampling, Sampling, sample  # noqa: F401 (the decoder's API)
from .streams import StreamSchema, TableError


@dataclass(frozen=True)
class StopRules:
    max_new_rows: int | None = 256  # rows produced by step() for this session
    end_streams: tuple[str, ...] | None = None  # None: every output stream with an end token
    silent_rows: int | None = None  # end after this many consecutive all-silent rows
    # True: an output stream that said its end token is silent only until the next input token
    # arrives (on any input stream), then sampled again; the session never ends on end tokens
    reopen_on_input: bool = False


@dataclass
class DecodedRow:
    session: str
    row: int  # row index within the session (prefill rows count)
    tokens: list[int]  # [C], in schema order
    logits: torch.Tensor | None = None  # [C, V] of this row (predicting the next one)
    done: str | None = None  # why the session ended with this row, if it did


@dataclass
class _Session:
    id: str
    slot: int
    rows: int  # rows decoded so far (prefill included)
    queues: list[deque]  # per stream: pushed tokens, one consumed per row
    sampling: list[Sampling]  # per stream
    stop: StopRules
    end_ids: dict[int, int]  # stream index -> end token id still awaited
    new_rows: int = 0
    base: int = 0  # rows dropped from the front of its slot (windowed models): slot row i is row base + i
    silent_run: int = 0
    has_logits: bool = False  # False until a row was forwarded: nothing to sample from yet
    ended: set[int] = field(default_factory=set)  # output streams that emitted their end token
    turn: dict[int, set[int]] = field(default_factory=dict)  # stream with a repetition penalty -> its turn's tokens
    generator: torch.Generator | None = None  # its own random numbers (open(seed=...)); None: the decoder's


@dataclass
class SessionState:
    """A copy of one session's decoding state (RowDecoder.snapshot), to open others from it
    (RowDecoder.open(start=...)): the same cache rows, positions, next-row logits and turn state.
    A session started from it continues exactly as the original would have."""

    rows: int
    base: int
    keys: list[torch.Tensor]  # per layer [kv_heads, held cells, head_dim]
    values: list[torch.Tensor]
    next_logits: torch.Tensor | None  # [C, V]
    ended: set[int]
    turn: dict[int, set[int]]


class SlotCache:
    """KV cache with one slot per session, [slots, kv_heads, cells, head_dim] per layer, duck-typed to
    what HF attention layers call (`update`, `get_seq_length`). One forward is three calls:
      1. `select(first, n)`, by the decoder: the forward runs the sessions of slots first..first+n-1;
      2. `place(cells, kv_len)`, by the model (MultiStreamLM.forward_rows): cells [n, Q] is the flat
         cell index where each new cell goes in its slot; the layers attend cells [0, kv_len);
      3. `update(keys, values, layer)`, by every layer: writes the new cells, returns the view.
    Capacity grows (doubling) as `select` and `place` ask; buffers are reallocated at `update`."""

    def __init__(self, slots: int, cells: int, max_cells: int | None = None):
        self.slots, self.cells = slots, cells if max_cells is None else min(cells, max_cells)
        self.max_cells = max_cells  # a windowed model's slot never holds more
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.view = slice(0, 0)
        self.kv_len = 0
        self.write_slots = self.write_pos = None  # [n, Q] each: slot and cell index of every new cell

    def select(self, first: int, n: int) -> None:
        """The next forward runs slots first..first+n-1 (the decoder keeps them consecutive)."""
        self.view = slice(first, first + n)
        if first + n > self.slots:
            self.slots = max(first + n, 2 * self.slots)

    def place(self, cells: torch.Tensor, kv_len: int) -> None:
        """The next forward writes its new cells at these flat cell indices [n, Q] of the selected
        slots, and every layer attends cells [0, kv_len) of them."""
        n, Q = cells.shape
        self.write_slots = torch.arange(self.view.start, self.view.stop, device=cells.device)[:, None].expand(n, Q)
        self.write_pos, self.kv_len = cells, kv_len
        if kv_len > self.cells:
            grown = max(kv_len, 2 * self.cells)
            self.cells = grown if self.max_cells is None else max(kv_len, min(grown, self.max_cells))

    def _buffer(self, store: dict, layer: int, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(layer)
        if buf is None or buf.shape[0] < self.slots or buf.shape[2] < self.cells:
            # zeros, not empty: masked-out garbage must stay finite (0 * NaN is NaN)
            new = like.new_zeros(self.slots, like.shape[1], self.cells, like.shape[3])
            if buf is not None:
                new[: buf.shape[0], :, : buf.shape[2]] = buf
            store[layer] = buf = new
        return buf

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key/value_states [n, kv_heads, Q, D] -> this forward's slots [n, kv_heads, kv_len, D]."""
        out = []
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            buf = self._buffer(store, layer_idx, new)
            buf[self.write_slots, :, self.write_pos] = new.transpose(1, 2)  # [n, Q, heads, D]
            out.append(buf[self.view, :, : self.kv_len])
        return out[0], out[1]

    def move(self, src: int, dst: int, cells: int) -> None:
        for store in (self.keys, self.values):
            for buf in store.values() if cells else ():
                buf[dst, :, :cells] = buf[src, :, :cells]

    def drop_front(self, slot: int, drop: int, keep: int, shift_keys) -> None:
        """Slot `slot` keeps its cells [drop, drop + keep) at [0, keep); keys go through
        `shift_keys` (re-anchored to their new positions)."""
        for buf in self.keys.values():
            buf[slot, :, :keep] = shift_keys(buf[slot, :, drop : drop + keep].clone())
        for buf in self.values.values():
            buf[slot, :, :keep] = buf[slot, :, drop : drop + keep].clone()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def read(self, slot: int, cells: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the slot's first `cells` cells: keys and values per layer [kv_heads, cells, D]."""
        return ([self.keys[i][slot, :, :cells].clone() for i in sorted(self.keys)],
                [self.values[i][slot, :, :cells].clone() for i in sorted(self.values)])

    def write(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Put keys and values per layer [kv_heads, cells, D] at the front of `slot`."""
        self.slots, self.cells = max(self.slots, slot + 1), max(self.cells, keys[0].shape[1] if keys else 0)
        for store, layers in ((self.keys, keys), (self.values, values)):
            for i, cells in enumerate(layers):
                self._buffer(store, i, cells[None])[slot, :, : cells.shape[1]] = cells


def session_rows(model: MultiStreamLM, max_rows: int | None) -> int | None:
    """The most rows a session's slot holds: window + window // 8 for a windowed model (at any
    age), else max_rows (None: unbounded)."""
    if model.window is not None:
        return model.window + max(1, model.window // 8)
    return max_rows


def cache_bytes(model: MultiStreamLM, rows: int) -> int:
    """KV-cache bytes of one session of `rows` rows: rows x C cells x layers x (K, V) x kv_heads x head_dim."""
    cfg = model.base.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    element = torch.finfo(model.base.dtype).bits // 8
    return rows * model.num_streams * cfg.num_hidden_layers * 2 * kv_heads * head_dim * element


class RowDecoder:
    """Decode many multi-stream sessions together, one row per `step()`."""

    def __init__(self, model: MultiStreamLM, max_sessions: int | None = None, seed: int = 0, initial_rows: int = 64):
        self.model = model.eval()
        self.schema: StreamSchema = model.schema
        self.C = self.schema.num_streams
        self.silence = self.schema.silence_id
        ends = self.schema.end_ids()
        self.end_by_stream = {self.schema.index(name): token for name, token in ends.items()}  # stream -> its end token
        self.max_sessions = max_sessions
        self.device = model.device
        self.window = model.window
        # a windowed session's slot: its last `window` rows plus room for `slack_rows` more, filled
        # before the front is dropped (dropping moves window rows: every slack_rows steps, not each)
        self.slot_rows = session_rows(model, None)
        self.slack_rows = None if self.window is None else self.slot_rows - self.window
        self.cache = SlotCache(slots=4, cells=initial_rows * self.C,
                               max_cells=None if self.slot_rows is None else self.slot_rows * self.C)
        self.sessions: dict[str, _Session] = {}
        self.by_slot: list[_Session] = []
        self.next_logits: torch.Tensor | None = None  # [slots, C, V], the last row's logits
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._settings = None  # cached sampling tensors; rebuilt when sessions change
        self._ids = itertools.count()

    # ---- sessions ------------------------------------------------------------------------
    def open(self, session_id=None, prefill=None, sampling=None, stop: StopRules | None = None,
             start: SessionState | None = None, seed: int | None = None) -> str:
        """Open a session. prefill: rows known in advance [P, C] (one forward pass).
        sampling: one Sampling for every output stream, or {stream name: Sampling}.
        start: continue from another session's snapshot (its rows count as this one's past).
        seed: its own random numbers (the same tokens whoever decodes beside it); None: shared."""
        sid = str(next(self._ids)) if session_id is None else str(session_id)
        if sid in self.sessions:
            raise ValueError(f"session {sid!r} is already open")
        if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
            raise RuntimeError(f"decoder is full: {len(self.sessions)} of {self.max_sessions} sessions open")
        stop = stop or StopRules()
        session = _Session(
            sid, len(self.by_slot), 0, [deque() for _ in range(self.C)],
            self._per_stream(sampling), stop, self._end_ids(stop),
        )
        session.turn = {s: set() for s, p in enumerate(session.sampling) if p.repetition_penalty != 1.0}
        if seed is not None:
            session.generator = torch.Generator(device=self.device).manual_seed(seed)
        rows = self._as_rows(prefill)
        self.sessions[sid] = session
        self.by_slot.append(session)
        self._settings = None
        if start is not None:
            self._restore(session, start)
        if rows is not None and len(rows):
            chunk = len(rows) if self.window is None else self.slack_rows
            with torch.no_grad():
                for first in range(0, len(rows), chunk):
                    part = rows[first : first + chunk]
                    logits = self._forward([session], part[None], last_row_only=True)  # [1, C, V]
                    session.rows += len(part)
            self._store_logits([session], logits)
        return sid

    def push(self, session_id, stream: str, token_ids) -> None:
        """Queue tokens on a stream: input streams consume one per row (silence when empty);
        on an output stream the tokens are forced instead of sampled (teacher forcing)."""
        session = self._session(session_id)
        try:
            s = self.schema.index(stream)
        except KeyError as e:
            raise KeyError(f"session {session.id!r}: {e.args[0]}") from None
        ids = [int(t) for t in (token_ids.tolist() if torch.is_tensor(token_ids) else token_ids)]
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise TableError(f"session {session.id!r}, stream {stream!r}: token ids {bad} "
                             f"out of range [0, {self.model.vocab_size})")
        session.queues[s].extend(ids)

    def close(self, session_id) -> None:
        session = self._session(session_id)
        del self.sessions[session.id]
        last = self.by_slot.pop()
        if last is not session:  # fill the hole with the last slot so slots stay dense
            # a session that joined since the last step has no cache cells and no logits yet (and
            # its slot may lie beyond the buffers, which grow at the next forward): nothing to move
            self.cache.move(last.slot, session.slot, (last.rows - last.base) * self.C)
            if self.next_logits is not None and last.has_logits:
                self.next_logits[session.slot] = self.next_logits[last.slot]
            last.slot = session.slot
            self.by_slot[session.slot] = last
        self._settings = None

    def snapshot(self, session_id) -> SessionState:
        """A copy of the session's state; it goes on unchanged."""
        session = self._session(session_id)
        keys, values = self.cache.read(session.slot, (session.rows - session.base) * self.C)
        logits = self.next_logits[session.slot].clone() if session.has_logits else None
        return SessionState(session.rows, session.base, keys, values, logits, set(session.ended),
                            {s: set(seen) for s, seen in session.turn.items()})

    def _restore(self, session: _Session, state: SessionState) -> None:
        self.cache.write(session.slot, state.keys, state.values)
        session.rows, session.base, session.ended = state.rows, state.base, set(state.ended)
        for s, seen in state.turn.items():
            if s in session.turn:
                session.turn[s] = set(seen)
        if state.next_logits is not None:
            self._store_logits([session], state.next_logits[None])

    def pending(self, session_id) -> list[int]:
        """How many pushed tokens wait on each stream."""
        return [len(q) for q in self._session(session_id).queues]

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, return_logits: bool = False) -> list[DecodedRow]:
        """Advance every open session by one row in one batched forward pass."""
        active = list(self.by_slot)
        if not active:
            return []
        forced, use_forced = self._forced_cells(active)  # [n, C] each, on host
        forced = torch.tensor(forced, device=self.device)
        use_forced = torch.tensor(use_forced, device=self.device)
        if self.next_logits is None:
            rows = forced
        else:
            logits = self.next_logits[: len(active)]
            if len(logits) < len(active):  # sessions that joined without a prefill: all their cells are forced
                logits = torch.cat([logits, logits.new_zeros(len(active) - len(logits), *logits.shape[1:])])
            own = {i: s.generator for i, s in enumerate(active) if s.generator is not None}
            sampled = sample(logits, self._cell_sampling(), self.silence, self.generator, self._repeated(active), own)
            rows = torch.where(use_forced, forced, sampled)  # [n, C]
        logits = self._forward(active, rows[:, None])  # [n, C, V]
        self._store_logits(active, logits)
        host_rows = rows.tolist()  # the one host sync of the step
        out = []
        for session, tokens in zip(active, host_rows):
            for s, seen in session.turn.items():  # a new turn after the end token
                if tokens[s] == self.end_by_stream.get(s):
                    seen.clear()
                elif tokens[s] != self.silence:
                    seen.add(tokens[s])
            session.rows += 1
            session.new_rows += 1
            done = self._check_stop(session, tokens)
            row_logits = logits[session.slot] if return_logits else None
            out.append(DecodedRow(session.id, session.rows - 1, tokens, row_logits, done))
        for row in out:
            if row.done:
                self.close(row.session)
        return out

    def _forced_cells(self, active):
        """Host-side: the token of every cell that is not sampled, and which cells those are."""
        forced, use = [], []
        for session in active:
            if session.ended and session.stop.reopen_on_input and any(
                    session.queues[s] for s, spec in enumerate(self.schema.streams) if spec.role == "input"):
                session.ended.clear()  # new input: the ended streams speak again
            f_row, u_row = [], []
            for s, spec in enumerate(self.schema.streams):
                q = session.queues[s]
                if q:
                    f_row.append(q.popleft()), u_row.append(True)
                elif spec.role == "input" or not session.has_logits or s in session.ended:
                    f_row.append(self.silence), u_row.append(True)
                else:
                    f_row.append(self.silence), u_row.append(False)
            forced.append(f_row), use.append(u_row)
        return forced, use

    def _forward(self, sessions, rows: torch.Tensor, last_row_only: bool = False) -> torch.Tensor:
        """rows [n, Q_rows, C] for sessions in consecutive slots -> logits [n, C, V] of each last row.
        Positions and cells count from each slot's front (row base): the model sees no age."""
        for session in sessions:
            self._make_room(session, rows.shape[1])
        self.cache.select(sessions[0].slot, len(sessions))
        logits = self.model.forward_rows(rows, [s.rows - s.base for s in sessions], self.cache, last_row_only)
        return logits[:, -1]  # [n, C, V]

    def _make_room(self, session: _Session, new_rows: int) -> None:
        """A windowed session whose slot cannot take `new_rows` more keeps only its last `window`
        rows, at the slot's front, re-anchored (the rows before them are out of every new row's sight)."""
        held = session.rows - session.base
        if self.window is None or held + new_rows <= self.slot_rows:
            return
        drop = held - self.window
        self.cache.drop_front(session.slot, drop * self.C, self.window * self.C,
                              lambda keys: self.model.shift_positions(keys, drop))
        session.base += drop

    def _store_logits(self, sessions, logits):
        first, n = sessions[0].slot, len(sessions)
        if self.next_logits is None or self.next_logits.shape[0] < self.cache.slots:
            grown = logits.new_zeros(self.cache.slots, self.C, logits.shape[-1])
            if self.next_logits is not None:
                grown[: self.next_logits.shape[0]] = self.next_logits
            self.next_logits = grown
        self.next_logits[first : first + n] = logits
        for s in sessions:
            s.has_logits = True

    def _check_stop(self, session: _Session, tokens: list[int]) -> str | None:
        for s, end_id in session.end_ids.items():
            if tokens[s] == end_id:
                session.ended.add(s)
        session.silent_run = session.silent_run + 1 if all(t == self.silence for t in tokens) else 0
        stop = session.stop
        if session.end_ids and len(session.ended) == len(session.end_ids) and not stop.reopen_on_input:
            return "end_token"
        if stop.silent_rows is not None and session.silent_run >= stop.silent_rows:
            return "silence"
        if stop.max_new_rows is not None and session.new_rows >= stop.max_new_rows:
            return "max_rows"
        return None

    # ---- helpers -------------------------------------------------------------------------
    def _session(self, session_id) -> _Session:
        session = self.sessions.get(str(session_id))
        if session is None:
            raise KeyError(f"unknown session {session_id!r}; open sessions: {sorted(self.sessions)}")
        return session

    def _per_stream(self, sampling) -> list[Sampling]:
        if sampling is None or isinstance(sampling, Sampling):
            return [sampling or Sampling()] * self.C
        unknown = set(sampling) - set(self.schema.names)
        if unknown:
            raise KeyError(f"sampling names unknown streams {sorted(unknown)}; streams: {self.schema.names}")
        return [sampling.get(name, Sampling()) for name in self.schema.names]

    def _end_ids(self, stop: StopRules) -> dict[int, int]:
        ends = self.schema.end_ids()
        names = stop.end_streams if stop.end_streams is not None else [
            s.name for s in self.schema.streams if s.role == "output" and s.name in ends
        ]
        missing = [n for n in names if n not in ends]
        if missing:
            raise KeyError(f"end_streams {missing} have no end token in the schema")
        return {self.schema.index(n): ends[n] for n in names}

    def _as_rows(self, prefill) -> torch.Tensor | None:
        if prefill is None:
            return None
        rows = torch.as_tensor(prefill, dtype=torch.long, device=self.device)
        if rows.dim() != 2 or rows.shape[1] != self.C:
            raise TableError(f"prefill: expected rows [R, {self.C}] for streams {self.schema.names}, "
                             f"got {tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.model.vocab_size):
            raise TableError(f"prefill: token ids out of range [0, {self.model.vocab_size})")
        return rows

    def _repeated(self, active) -> tuple[torch.Tensor, ...] | None:
        """The `repeated` argument of sample() for this step's cells (None: no penalty anywhere)."""
        cells = [(i, s, t, session.sampling[s].repetition_penalty)
                 for i, session in enumerate(active) for s, seen in session.turn.items() for t in seen]
        if not cells:
            return None
        i, s, t, penalty = zip(*cells)
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(i), as_long(s), as_long(t), torch.tensor(penalty, device=self.device)

    def _cell_sampling(self) -> CellSampling:
        if self._settings is None:  # rebuilt only when sessions join or leave
            self._settings = CellSampling.build([s.sampling for s in self.by_slot], self.device)
        return self._settings
