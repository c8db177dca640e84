"""From texts to padded batches: encoding, padding with loss masks, length bucketing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

#: A training batch: any nesting of dicts of tensors (``input_ids``, ``attention_mask``, ``labels``).
Batch = dict[str, Any]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
    sources: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Token ids with BOS (from the tokenizer) and EOS appended.

    A text longer than ``max_length`` (default: the model's context, see
    :func:`rtteval.scoring.check_context`) is refused, never truncated;
    ``sources`` (``path:line`` per text) let the error name the longest one's line.
    """
    from rtteval.scoring import check_context

    out = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=True, verbose=False)
        if add_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    check_context(
        tokenizer, [len(s) for s in out], sources, what="a training text", texts=texts,
        limit=max_length,
    )  # fmt: skip
    return out


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, loss_masks: Sequence[Sequence[int]] | None = None
) -> Batch:
    """Right-padded batch; ``labels`` are -100 on padding and outside each loss mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = t
        mask[i, : len(s)] = 1
        if loss_masks is None:
            labels[i, : len(s)] = t
        else:
            m = torch.tensor(loss_masks[i], dtype=torch.bool)
            labels[i, : len(s)] = torch.where(m, t, torch.full_like(t, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    bucket: bool = True,
    loss_masks: Sequence[Sequence[int]] | None = None,
) -> list[Batch]:
    """Shuffle, then group sequences of similar length so padding wastes little compute.

    Bucketing sorts within windows of 50 batches, then shuffles the batch
    order, so an epoch is still a random pass over the data.
    """
    order = list(range(len(seqs)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda j: len(seqs[j]))
        ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(groups)
    return [
        pad_batch(
            [seqs[i] for i in g], pad_id, None if loss_masks is None else [loss_masks[i] for i in g]
        )
        for g in groups
    ]


def count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
            return int(batch["attention_mask"].sum())
        return sum(count_tokens(v) for v in batch.values())
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
