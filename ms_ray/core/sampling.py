"""Sampling of a decoded row: per-stream settings (Sampling), their tensors for one step
(CellSampling), and the vectorised draw (sample), greedy cells included."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    silence_penalty: float = 0.0  # subtracted from the silence logit (talk more when > 0)
    # > 1: tokens the stream already wrote in its current turn (since its last end token) are less
    # likely again (CTRL's penalty, as transformers applies it): breaks greedy loops
    repetition_penalty: float = 1.0


@dataclass
class CellSampling:
    """Sampling settings of every cell of a step, [n, C] tensors on the device, plus a host-side
    flag so that an all-greedy step needs no device->host look at the settings."""

    temperature: torch.Tensor  # 0 = greedy
    top_k: torch.Tensor  # 0 = off
    top_p: torch.Tensor
    silence_penalty: torch.Tensor
    any_random: bool

    @classmethod
    def build(cls, table: list[list[Sampling]], device) -> "CellSampling":
        values = [[(p.temperature, p.top_k, p.top_p, p.silence_penalty) for p in row] for row in table]
        t = torch.tensor(values, dtype=torch.float, device=device)  # [n, C, 4]
        random = any(p.temperature > 0 for row in table for p in row)
        return cls(t[..., 0], t[..., 1].long(), t[..., 2], t[..., 3], random)


def sample(logits: torch.Tensor, cells: CellSampling, silence_id: int, generator=None,
           repeated: tuple[torch.Tensor, ...] | None = None, own: dict | None = None) -> torch.Tensor:
    """Vectorised per-cell sampling: logits [n, C, V] -> tokens [n, C]. repeated: (cell rows,
    cell streams, token ids, penalties), one entry per token a cell's stream already wrote.
    own: {row: its own generator} (a seeded session's draws do not depend on its neighbours)."""
    logits = logits.to(torch.float32, copy=True)
    logits[..., silence_id] -= cells.silence_penalty
    if repeated is not None:
        i, s, t, penalty = repeated
        seen = logits[i, s, t]
        logits[i, s, t] = torch.where(seen > 0, seen / penalty, seen * penalty)
    greedy = logits.argmax(-1)
    if not cells.any_random:
        return greedy
    V = logits.shape[-1]
    scaled = logits / cells.temperature.clamp(min=1e-5)[..., None]
    sorted_logits, order = scaled.sort(-1, descending=True)  # [n, C, V]
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(cells.top_k > 0, cells.top_k, V)[..., None]
    probs = sorted_logits.softmax(-1)
    beyond_p = (probs.cumsum(-1) - probs) > cells.top_p[..., None]  # never removes the top token
    sorted_logits = sorted_logits.masked_fill((ranks >= k) | beyond_p, float("-inf"))
    probs = sorted_logits.softmax(-1)  # [n, C, V]
    pick = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(*order.shape[:2], 1)  # [n, C, 1]
    for i, own_generator in (own or {}).items():
        pick[i] = torch.multinomial(probs[i], 1, generator=own_generator)  # [C, 1]
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(cells.temperature > 0, sampled, greedy)
