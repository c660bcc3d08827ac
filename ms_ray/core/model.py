"""The multi-stream model: any Hugging Face decoder-only causal LM, read as a table of streams.

Shapes: B batch, R rows (time steps), C streams, S = R*C flattened cells (row-major:
r0s0, r0s1, ..., r1s0, ...), H hidden size, V vocabulary. The rule, exactly:
  - cell i attends cell j iff same packed document and (row(j) < row(i) or j == i);
    with a window of W rows (`window`), only rows row(i) - W ... row(i) - 1 of the earlier ones:
    a session's state is then its last W rows, whatever its age (decode.SlotCache keeps no more);
  - RoPE position = row index, restarting at every packed document;
  - a learned per-stream embedding (zero-initialised) is added to the token embedding;
  - the logit at cell (r, s) predicts the token at (r+1, s), weighted per stream.
Both paths apply it here: `forward` (whole tables, training) and `forward_rows` (new rows against a
KV cache, decoding) share the embedding and the positions (`_cells_forward`) and the rule (`allowed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .export import FORMAT_FILE, STREAM_EMBED_FILE, export_window
from .streams import StreamSchema, TableError, check_table, next_row_labels

ATTN_IMPL = "ms_ray"  # registered below; dispatches on the type of the mask it is given
FORMAT_VERSION = 1
IGNORE = -100

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # very old torch: sdpa only
    BlockMask, create_block_mask = None, None


def _attention(module, query, key, value, attention_mask, **kwargs):
    """One attention entry point for every wrapped model: a BlockMask goes to FlexAttention,
    a float mask to sdpa. Lets one model train with FlexAttention and decode with sdpa."""
    if BlockMask is not None and isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _attention)


# ---- positions and masks -----------------------------------------------------------------
def row_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, R]: the row index, restarting at the first row of every document."""
    B, R = doc_ids.shape
    rows = torch.arange(R, device=doc_ids.device).expand(B, R)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first_row = torch.where(starts, rows, torch.zeros_like(rows)).cummax(dim=1).values
    return rows - first_row


def allowed(q_idx, k_idx, q_doc, k_doc, num_streams: int, window: int | None = None) -> torch.Tensor:
    """The visibility rule on flat cell indices (any broadcastable shapes): same document and
    (earlier row, at most `window` rows back when set, or the cell itself). Tokens of one row
    never see each other."""
    q_row, k_row = q_idx // num_streams, k_idx // num_streams
    earlier_row = k_row < q_row
    if window is not None:
        earlier_row = earlier_row & (q_row - k_row <= window)
    return (q_doc == k_doc) & (earlier_row | (k_idx == q_idx))


def dense_visibility(doc_ids: torch.Tensor, num_streams: int, window: int | None = None) -> torch.Tensor:
    """The rule over all cell pairs of whole tables: [B, S, S] bool (True = attend), vectorised."""
    B, R = doc_ids.shape
    S = R * num_streams
    idx = torch.arange(S, device=doc_ids.device)
    cell_doc = doc_ids.repeat_interleave(num_streams, dim=1)  # [B, S]
    return allowed(idx[:, None], idx[None, :], cell_doc[:, :, None], cell_doc[:, None, :], num_streams, window)


def dense_mask(doc_ids: torch.Tensor, num_streams: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive float mask [B, 1, S, S] (0 = attend, dtype-min = blocked), built vectorised."""
    return additive(dense_visibility(doc_ids, num_streams, window), dtype)


def additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Visibility [B, Q, K] (bool) -> additive float mask [B, 1, Q, K]: 0 = attend, dtype-min = blocked."""
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=ok.device)
    return torch.where(ok[:, None], torch.zeros((), dtype=dtype, device=ok.device), blocked)


def flex_mask(doc_ids: torch.Tensor, num_streams: int, window: int | None = None):
    """FlexAttention BlockMask for the same rule: O(S^2 / block^2) memory instead of O(S^2)
    (with a window, blocks beyond it are skipped: O(S * W) work)."""
    B, R = doc_ids.shape
    S = R * num_streams
    cell_doc = doc_ids.repeat_interleave(num_streams, dim=1).contiguous()  # [B, S]

    def mask_mod(b, h, q, k):
        return allowed(q, k, cell_doc[b, q], cell_doc[b, k], num_streams, window)

    compile_it = doc_ids.device.type == "cuda"
    return create_block_mask(mask_mod, B, None, S, S, device=doc_ids.device, _compile=compile_it)


# ---- the model ---------------------------------------------------------------------------
@dataclass
class MultiStreamOutput:
    logits: torch.Tensor | None  # [B, R, C, V]; None from a loss that never held them (chunked_loss)
    loss: torch.Tensor | None = None  # weighted CE sum / normaliser
    loss_sum: torch.Tensor | None = None  # weighted CE summed over supervised cells
    num_supervised: torch.Tensor | None = None  # cells with a label and weight > 0
    stream_loss_sum: torch.Tensor | None = None  # [C] unweighted CE sums, for logging
    stream_count: torch.Tensor | None = None  # [C] labelled cells per stream

    def stream_losses(self, schema: StreamSchema) -> dict[str, float]:
        """Mean CE per stream (NaN-free: streams without labels are left out)."""
        sums, counts = self.stream_loss_sum.tolist(), self.stream_count.tolist()
        return {n: s / c for n, s, c in zip(schema.names, sums, counts) if c > 0}


class WeightedLinearCE(torch.autograd.Function):
    """sum_i w_i CE(h_i W^T, y_i) over cells i, with each cell's CE (for logging, no gradient), from
    hidden [N, H] and the output weight W [V, H], `chunk` cells at a time: a chunk's fp32 logits
    [chunk, V] live only while its CE and its gradients (w_i (softmax_i - onehot(y_i)) times W, and
    times h_i for W) are taken, in the forward; backward scales them by the upstream gradient. The
    [N, V] logits are never held whole and nothing is recomputed (Liger's fused linear CE, weighted)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, cell_w, chunk: int):
        ce = torch.zeros(len(hidden), dtype=torch.float32, device=hidden.device)  # [N]
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
            else None  # [V, H]
        for i in range(0, len(hidden), chunk):
            h, y, w = hidden[i : i + chunk], labels[i : i + chunk], cell_w[i : i + chunk]
            logits = (h @ weight.T).float()  # [n, V]
            lse = logits.logsumexp(-1)  # [n]
            target = y.clamp(min=0)[:, None]  # IGNORE cells: any index, their weight is 0
            ce[i : i + chunk] = (lse - logits.gather(1, target)[:, 0]) * (y != IGNORE)
            probs = logits.sub_(lse[:, None]).exp_()  # [n, V], in place: one buffer per chunk
            probs.scatter_add_(1, target, -torch.ones_like(target, dtype=probs.dtype))
            probs.mul_(w[:, None])  # d(w_i CE_i)/d logits
            if grad_h is not None:
                grad_h[i : i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(probs.T, h.float())  # in place: no [V, H] temporary per chunk
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * cell_w).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None)


def checkpointed_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """CE of each cell [N] from hidden [N, H], `chunk` cells at a time, each chunk's logits taken
    again in backward (torch.utils.checkpoint). For an output layer whose weight exists only inside
    its own call (DeepSpeed ZeRO-3 gathers it in the module's hooks): it is called as a module."""

    def chunk_ce(h, y):
        return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="none")

    return torch.cat([checkpoint(chunk_ce, hidden[i : i + chunk], labels[i : i + chunk], use_reentrant=False)
                      for i in range(0, len(hidden), chunk)])


class MultiStreamLM(nn.Module):
    """Wraps a HF causal LM (`base`) so that it reads and writes tables of streams."""

    # the loss takes the vocabulary projection this many MiB of fp32 logits at a time (None: all
    # logits at once, as a plain LM head does); a training setting (model.loss_chunk_mb), not saved
    loss_chunk_mb: float | None = 256

    def __init__(self, base: PreTrainedModel, schema: StreamSchema, attention: str = "auto",
                 window: int | None = None):
        super().__init__()
        if attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'flex', got {attention!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive number of rows or None, got {window!r}")
        self.base = base
        self.schema = schema
        self.attention = attention
        self.window = window  # rows a cell sees back (None: its whole document); saved with the model
        base.config._attn_implementation = ATTN_IMPL
        hidden = base.get_input_embeddings().embedding_dim
        self.stream_embed = nn.Embedding(schema.num_streams, hidden)
        nn.init.zeros_(self.stream_embed.weight)  # a pretrained model starts unchanged
        self.stream_embed.to(device=base.device, dtype=base.dtype)

    @property
    def num_streams(self) -> int:
        return self.schema.num_streams

    @property
    def vocab_size(self) -> int:
        return self.base.get_input_embeddings().num_embeddings

    @property
    def device(self) -> torch.device:
        return self.stream_embed.weight.device

    def use_flex(self, device: torch.device) -> bool:
        if self.attention == "auto":
            return device.type == "cuda" and create_block_mask is not None
        return self.attention == "flex"

    def embed(self, tokens: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """Token embedding + stream embedding: tokens [..., N], streams [N] -> [..., N, H]."""
        tok = self.base.get_input_embeddings()(tokens)
        return tok + self.stream_embed(streams).to(tok.dtype)[None]

    def _cells_forward(self, tokens, row_pos, visible, cache=None, keep_rows: int = 0,
                       hidden_only: bool = False) -> torch.Tensor:
        """The one call of the base model, for both paths: tokens [B, R, C] flattened row-major, each cell
        embedded with its stream and placed at its row's RoPE position row_pos [B, R]; `visible`: the rule
        for these R*C cells (over the cache's cells too, if any), bool [B, S, K] or a BlockMask.
        -> logits [B, R (keep_rows if > 0), C, V], or with hidden_only the last hidden states
        [B, R, C, H] (the base's decoder without its output layer: the chunked loss projects them)."""
        B, R, C = tokens.shape
        x = self.embed(tokens, torch.arange(C, device=tokens.device)).view(B, R * C, -1)  # [B, S, H]
        positions = row_pos[:, :, None].expand(B, R, C).reshape(B, R * C)  # [B, S]: each cell its row's
        mask = additive(visible, x.dtype) if isinstance(visible, torch.Tensor) else visible  # [B, 1, S, K]
        if hidden_only:
            out = self.base.get_decoder()(inputs_embeds=x, attention_mask=mask, position_ids=positions)
            return out.last_hidden_state.view(B, R, C, -1)
        out = self.base(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=cache is not None, logits_to_keep=keep_rows * C)
        return out.logits.view(B, -1, C, out.logits.shape[-1])

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        loss: bool = False,
        normaliser: float | torch.Tensor | None = None,
        keep_logits: bool = False,
        check: bool = True,
        layout_key: bytes | None = None,
    ) -> MultiStreamOutput:
        """tokens [B, R, C]; doc_ids [B, R] (packed documents, -1 = padding; default one
        document); labels [B, R, C] (default with loss=True: next row, same stream).
        `normaliser` replaces the local count of supervised cells, so data-parallel ranks
        can divide by the global count. With a loss, the logits are not returned (None) unless
        keep_logits: the loss then never holds them whole (`chunked_loss`).
        check=False skips the table check (a device->host sync): for callers that checked
        their data where it entered (training checks every pack once, train/packs.py).
        layout_key: the doc_ids' bytes as the caller has them on the host; FlexAttention's
        BlockMask is then built once per layout and reused when it repeats."""
        if check:
            check_table(tokens, self.schema, self.vocab_size)
        B, R, C = tokens.shape
        if doc_ids is None:
            doc_ids = torch.zeros(B, R, dtype=torch.long, device=tokens.device)
        elif doc_ids.shape != (B, R):
            raise TableError(f"doc_ids: expected shape {(B, R)}, got {tuple(doc_ids.shape)}")

        if self.use_flex(tokens.device):
            visible = self._block_mask(doc_ids, layout_key)
        else:
            visible = dense_visibility(doc_ids, C, self.window)
        loss = loss or labels is not None
        if loss and labels is None:
            labels = next_row_labels(tokens, doc_ids, IGNORE)
        if loss and not keep_logits and self.loss_chunk_mb:
            hidden = self._cells_forward(tokens, row_positions(doc_ids), visible, hidden_only=True)  # [B, R, C, H]
            return self.chunked_loss(hidden, labels, normaliser)
        logits = self._cells_forward(tokens, row_positions(doc_ids), visible)  # [B, R, C, V]
        return self.weighted_loss(logits, labels, normaliser) if loss else MultiStreamOutput(logits)

    def _block_mask(self, doc_ids: torch.Tensor, layout_key: bytes | None):
        """flex_mask, kept for the last 8 layouts seen (a BlockMask costs a compiled kernel call and a
        few small tensors; packs of fixed-length documents repeat one layout)."""
        if layout_key is None:
            return flex_mask(doc_ids, self.num_streams, self.window)
        cache = self.__dict__.setdefault("_block_masks", {})
        if layout_key not in cache:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[layout_key] = flex_mask(doc_ids, self.num_streams, self.window)
        return cache[layout_key]

    def forward_rows(self, rows: torch.Tensor, past_rows: list[int], cache, last_row_only: bool = False
                     ) -> torch.Tensor:
        """Run new rows of n sessions against a KV cache (decoding): rows [n, Q_rows, C], session i
        continuing after its past_rows[i] rows already in `cache` -> logits [n, Q_rows (1 if
        last_row_only), C, V]. The rule of `forward`, one document per session: a new cell sees
        every cached cell of an earlier row and itself; RoPE position = row index; stream embedding
        added. The cache is told the new cells' flat indices (`cache.place(cells [n, Q], kv_len)`,
        see decode.SlotCache), then each layer's `update` writes them and returns cells [0, kv_len).
        past_rows are host ints (no device sync); rows are not validated here (the decoder does)."""
        n, q_rows, C = rows.shape
        if C != self.num_streams or len(past_rows) != n:
            raise TableError(f"forward_rows: expected rows [n, Q_rows, {self.num_streams}] and n past_rows, "
                             f"got rows {tuple(rows.shape)} and {len(past_rows)} past_rows")
        Q, dev = q_rows * C, rows.device
        kv_len = max(past_rows) * C + Q  # the longest session's cells, new ones included
        past = torch.tensor(past_rows, device=dev)[:, None]  # [n, 1]
        cells = past * C + torch.arange(Q, device=dev)  # [n, Q] flat cell index of each new cell
        row_pos = past + torch.arange(q_rows, device=dev)  # [n, Q_rows] RoPE position = row index
        visible = allowed(cells[:, :, None], torch.arange(kv_len, device=dev), 0, 0, C, self.window)  # [n, Q, kv_len]
        cache.place(cells, kv_len)
        return self._cells_forward(rows, row_pos, visible, cache, keep_rows=1 if last_row_only else 0)

    def shift_positions(self, keys: torch.Tensor, rows: int) -> torch.Tensor:
        """Cached keys [..., D], rotated by RoPE at row position p -> the same keys at p - rows.
        RoPE is a rotation, R(p) R(-rows) = R(p - rows), and attention depends on position
        differences only: a cache whose keys and queries all move back by `rows` computes the same
        scores up to rounding. The decoder re-anchors a windowed session this way, so positions
        stay below the window's size at any age (float32 angles at row 10^6 would be off by ~0.1 rad)."""
        if not hasattr(self, "_inv_freq"):  # the base's rotary frequencies, found once
            self._inv_freq = next((m.inv_freq.double() for m in self.base.modules()
                                   if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
        inv_freq = self._inv_freq
        if inv_freq is None or 2 * inv_freq.numel() != keys.shape[-1]:
            found = None if inv_freq is None else inv_freq.numel()
            raise NotImplementedError(f"shift_positions needs full-width RoPE (inv_freq of {keys.shape[-1] // 2}); "
                                      f"{type(self.base).__name__} has {found}")
        angle = -rows * inv_freq.to(keys.device)  # [D/2]
        angle = torch.cat([angle, angle])  # [D], HF's layout: (x1, x2) halves share a frequency
        cos, sin = angle.cos().to(keys.dtype), angle.sin().to(keys.dtype)
        half = keys.shape[-1] // 2
        rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        return keys * cos + rotated_half * sin

    def weighted_loss(self, logits, labels, normaliser=None) -> MultiStreamOutput:
        """Next-row CE per cell, weighted per stream, divided by the supervised-cell count."""
        B, R, C, V = logits.shape
        if labels.shape != (B, R, C):
            raise TableError(f"labels: expected shape {(B, R, C)}, got {tuple(labels.shape)}")
        ce = F.cross_entropy(
            logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(B, R, C)
        return self._weighted(ce, labels, normaliser, logits)

    def chunked_loss(self, hidden, labels, normaliser=None) -> MultiStreamOutput:
        """weighted_loss from the last hidden states [B, R, C, H], the output layer applied
        loss_chunk_mb of fp32 logits at a time (the same loss and gradients; no logits kept)."""
        B, R, C, H = hidden.shape
        if labels.shape != (B, R, C):
            raise TableError(f"labels: expected shape {(B, R, C)}, got {tuple(labels.shape)}")
        head = self.base.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("the chunked loss takes an output layer without bias: "
                                      "set model.loss_chunk_mb: null")
        chunk = max(1, int(self.loss_chunk_mb * 2**20) // (4 * head.weight.shape[0]))
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        if hasattr(head.weight, "ds_id"):  # a ZeRO-3 partition: the weight exists inside the head's call only
            ce = checkpointed_cross_entropy(head, h, y, chunk).view(B, R, C)
            return self._weighted(ce, labels, normaliser)
        cell_w = self._cell_weights(labels)  # [B, R, C]
        loss_sum, ce = WeightedLinearCE.apply(h, head.weight, y, cell_w.reshape(-1), chunk)
        return self._weighted(ce.view(B, R, C), labels, normaliser, loss_sum=loss_sum, cell_w=cell_w)

    def _cell_weights(self, labels) -> torch.Tensor:
        """Each cell's loss weight [B, R, C]: its stream's, 0 where there is no label."""
        return (labels != IGNORE) * torch.tensor(self.schema.loss_weights, device=labels.device)

    def _weighted(self, ce, labels, normaliser, logits=None, loss_sum=None, cell_w=None) -> MultiStreamOutput:
        """CE per cell [B, R, C] -> the loss: weighted per stream (loss_sum: already weighted and
        summed, by WeightedLinearCE, with its cell_w), divided by the supervised-cell count."""
        labelled = labels != IGNORE  # [B, R, C]
        cell_w = self._cell_weights(labels) if cell_w is None else cell_w  # [B, R, C]
        loss_sum = (ce * cell_w).sum() if loss_sum is None else loss_sum
        num_supervised = (cell_w > 0).sum()
        denom = num_supervised.clamp(min=1) if normaliser is None else normaliser
        with torch.no_grad():
            stream_loss_sum = (ce * labelled).sum(dim=(0, 1))
            stream_count = labelled.sum(dim=(0, 1))
        return MultiStreamOutput(logits, loss_sum / denom, loss_sum, num_supervised, stream_loss_sum, stream_count)

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, tokenizer=None) -> Path:
        """One folder: standard HF config + safetensors for the base model (readable by any HF
        tool), the stream schema and the stream embedding beside them, and the tokenizer."""
        if hasattr(self.base, "peft_config"):  # peft would save the adapters alone: no loadable folder
            raise ValueError("save_pretrained: the base model carries LoRA adapters; merge them first "
                             "(ms_ray.core.lora.merge_lora)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(folder)
        save_file({"weight": self.stream_embed.weight.detach().cpu().contiguous()}, folder / STREAM_EMBED_FILE)
        self.schema.save(folder)
        (folder / FORMAT_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "window": self.window}) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, attention: str = "auto", dtype=None, device=None) -> "MultiStreamLM":
        folder = Path(folder)
        if not (folder / FORMAT_FILE).exists():
            raise FileNotFoundError(
                f"{folder} is not a multi-stream checkpoint (no {FORMAT_FILE}); "
                "to convert a plain HF model use MultiStreamLM.from_base"
            )
        schema = StreamSchema.load(folder)
        window = export_window(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", attn_implementation="sdpa")
        model = cls(base, schema, attention, window)
        weight = load_file(str(folder / STREAM_EMBED_FILE))["weight"]
        if weight.shape != model.stream_embed.weight.shape:
            raise TableError(
                f"{folder / STREAM_EMBED_FILE}: stream embedding shape {tuple(weight.shape)} does not match "
                f"schema ({schema.num_streams} streams) and hidden size"
            )
        with torch.no_grad():
            model.stream_embed.weight.copy_(weight)
        return model.to(device) if device is not None else model

    @classmethod
    def from_base(cls, base, schema: StreamSchema, tokenizer=None, attention: str = "auto", window: int | None = None):
        """Turn a single-stream HF model (a folder, or a loaded model plus its tokenizer) into a
        multi-stream one: add the schema's special tokens, resize the embeddings (new rows at
        the mean of the old ones), bind the schema. Returns (model, tokenizer)."""
        if isinstance(base, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(base)
            base = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
        if tokenizer is None:
            raise ValueError("from_base needs the base model's tokenizer")
        schema.add_special_tokens(tokenizer)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        return cls(base, schema.bind(tokenizer), attention, window), tokenizer

