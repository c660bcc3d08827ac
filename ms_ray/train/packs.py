"""Which packs a rank trains on, and in which order.

Every rank reads the prepared packs through Ray Data (`get_dataset_shard`), sorts them by pack
id and keeps every world-th one, so the packs of a rank and their order per epoch (a seeded
permutation) are the same on every run: a resumed run replays exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.streams import check_table


def rank_packs(dataset, rank: int, world: int, schema=None, vocab_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """This rank's packs: tokens [N, R, C] and doc_ids [N, R], the same on every run. With a
    schema, every pack is checked here, once, where the data enters (stream count, token ids in
    [0, vocab_size)): the training forward then skips its per-batch check (a device sync)."""
    ids, tokens, docs = [], [], []
    for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        ids += list(batch["pack_id"])
        tokens += list(batch["tokens"])
        docs += list(batch["doc_ids"])
    order = np.argsort(np.array(ids, dtype=object).astype(str), kind="stable")
    usable = len(order) // world * world  # equal counts keep the ranks' steps in lockstep
    mine = order[:usable][rank::world]
    R = len(docs[0]) if docs else 0
    if not len(mine):
        return np.zeros((0, R, 1), np.int32), np.zeros((0, R), np.int32)
    table = np.stack([tokens[i] for i in mine]).reshape(len(mine), R, -1)
    if schema is not None:
        check_table(torch.from_numpy(table), schema, vocab_size, what="prepared packs")
    return table, np.stack([docs[i] for i in mine])


def batches(tokens, docs, batch_size: int, seed: int, epoch: int):
    """The batches of one epoch, in a seeded order: yields (index, tokens, doc_ids)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(tokens))
    for b in range(len(order) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield b, torch.from_numpy(tokens[idx]).long(), torch.from_numpy(docs[idx]).long()


def micro_batches(tokens, docs, batch_size: int, seed: int, epoch: int, batch: int, device=None):
    """Endless (epoch, batch index, tokens, doc_ids), on the host unless `device` is given, from
    batch `batch` of `epoch` on: a resumed run continues exactly where the saved one was."""
    skip = batch
    while True:
        for b, tok, doc in batches(tokens, docs, batch_size, seed, epoch):
            if b >= skip:
                yield (epoch, b, tok, doc) if device is None else (epoch, b, tok.to(device), doc.to(device))
        epoch, skip = epoch + 1, 0
