"""Batch plans and collation.

The plan (which examples go into which batch, in which order) is separate from collation
(turning examples into tensors) so the trainer can resume exactly at batch k of epoch e:
the plan is a pure function of the example lengths, seed and epoch.

Plan representation: a list of batches; a batch is a list of ROWS; a row is a list of
example indices. Without packing every row holds one example (a padded batch of
`batch_size` rows); with packing a row holds as many examples as fit in `max_length`
tokens, and a batch is `batch_size` such rows. Collate one batch with

    collate([[tokenized[i] for i in row] for row in batch], pad_id, packed=packing)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from tunelab.data.render import IGNORE_INDEX, TokenizedExample

Row = list[int]
Batch = list[Row]
# Length bucketing sorts examples within chunks of this many batches: large enough that
# neighbours have similar lengths, small enough that batch composition stays random.
BY_LENGTH_CHUNK_BATCHES = 50


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    by_length: bool = True,
    packing: bool = False,
    max_length: int = 512,
) -> list[Batch]:
    """The batches of one epoch as rows of example indices (see the module docstring).

    The same lengths, seed and epoch always give the same plan; another epoch gives
    another order. `by_length` (without packing): examples are sorted by length within
    shuffled chunks of `BY_LENGTH_CHUNK_BATCHES` batches, so a batch needs little padding,
    then the batch order is shuffled. `packing`: examples are shuffled, then packed
    best-fit into rows of at most `max_length` tokens; rows are shuffled and grouped
    `batch_size` per batch. The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = [int(i) for i in rng.permutation(len(lengths))] if shuffle else list(range(len(lengths)))
    if packing:
        rows = pack_rows(order, lengths, max_length)
        if shuffle:
            rows = [rows[int(i)] for i in rng.permutation(len(rows))]
        return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    if by_length:
        chunk = batch_size * BY_LENGTH_CHUNK_BATCHES
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
            batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
        if shuffle:
            batches = [batches[int(i)] for i in rng.permutation(len(batches))]
    else:
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [[[index] for index in batch] for batch in batches]


def pack_rows(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[Row]:
    """Pack examples (taken in `order`) best-fit into rows of at most `max_length` tokens.

    Each example goes into the open row with the least room that still fits it, else a
    new row; rows keep their examples in insertion order. O(n log n) with a sorted list
    of (room left, row number).
    """
    rows: list[Row] = []
    open_rows: list[tuple[int, int]] = []  # (tokens of room left, row number), sorted
    for index in order:
        length = lengths[index]
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than the packing length {max_length}; truncate or drop it first")
        slot = bisect.bisect_left(open_rows, (length, -1))
        if slot < len(open_rows):
            room, row = open_rows.pop(slot)
            rows[row].append(index)
        else:
            room, row = max_length, len(rows)
            rows.append([index])
        if room - length > 0:
            bisect.insort(open_rows, (room - length, row))
    return rows


def collate(
    rows: Sequence[Sequence[TokenizedExample]], pad_id: int, *, packed: bool = False, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for one batch of rows (right-padded to the longest row).

    Padded (`packed=False`, one example per row): input_ids, labels (-100 on padding) and
    attention_mask. Padding is decided by position, never by comparing ids with pad_id
    (the pad id may also be the EOS/end-of-turn id, which is a target).

    Packed: input_ids, labels and position_ids restarting at 0 for every example, and NO
    attention_mask: given position_ids without a mask (and no cache), transformers builds
    a block-diagonal causal mask, so no example attends to another. The label at each
    example's first position is -100, so no token is trained to predict across a boundary.
    A row's padding tail gets its own positions from 0 and is not a target.
    """
    if pad_id is None:
        raise ValueError("pad_id is None; set tokenizer.pad_token (e.g. to the EOS token) before collating")
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row, and every row at least one example")
    if not packed and any(len(row) != 1 for row in rows):
        raise ValueError("a padded batch has exactly one example per row; use packed=True for rows of several examples")
    width = max(sum(len(example) for example in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if not packed:
        examples = [example for (example,) in rows]
        input_ids, attention_mask = right_pad([x.input_ids for x in examples], pad_id, width=width)
        labels, _ = right_pad([x.labels for x in examples], IGNORE_INDEX, width=width)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def right_pad(rows: Sequence[Sequence[int]], fill: int, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids as one (rows x width) long tensor padded on the right with `fill`, and its
    attention mask (1 on real positions). The one right-padding collator: training batches
    (causal LM, classification, preference), and teacher-forced scoring in evaluate.py.

    Padding is decided by position, never by comparing ids with a pad id (the pad id may also
    be the EOS id, which is a target). `width` defaults to the longest row.
    """
    width = max((len(row) for row in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask
