"""Training data for one run: read -> normalise -> dedupe -> tokenize -> split, then batches.

`build_datasets` runs the whole data pipeline with explicit arguments and returns a
`TrainingData`, which the trainer asks for a deterministic batch plan per epoch
(`epoch_plan`) and collates one batch at a time (`collate`), so a resumed run continues
at exactly the batch where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tunelab.data.formats import normalise, remove_duplicates
from tunelab.data.packing import Batch, collate, plan_batches
from tunelab.data.render import TokenizedExample, filter_by_length, tokenize_examples
from tunelab.data.sources import DataStats, read_source
from tunelab.errors import DataError


@dataclass
class TrainingData:
    """Tokenized train/eval examples plus what batching needs (pad id, counts)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    pad_id: int
    train_stats: DataStats
    eval_stats: DataStats | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        held_out = f"; eval {len(self.eval)} examples" if self.eval else "; no eval split"
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"train: {self.train_stats.summary()}{held_out}{extra}"

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int, packing: bool, max_length: int) -> list[Batch]:
        """The micro-batches of one epoch (rows of example indices); same inputs, same plan."""
        lengths = [len(x) for x in self.train]
        return plan_batches(lengths, batch_size, seed=seed, epoch=epoch, packing=packing, max_length=max_length)

    def num_batches(self, batch_size: int, *, packing: bool, max_length: int) -> int:
        return len(self.epoch_plan(batch_size, seed=0, epoch=0, packing=packing, max_length=max_length))

    def collate(self, batch: Batch, *, packing: bool) -> dict[str, torch.Tensor]:
        return collate([[self.train[i] for i in row] for row in batch], self.pad_id, packed=packing)

    def eval_batches(self, batch_size: int, *, packing: bool, max_length: int) -> list[dict[str, torch.Tensor]]:
        """Eval set as collated batches, in a fixed length-sorted order (least padding)."""
        if not self.eval:
            return []
        lengths = [len(x) for x in self.eval]
        plan = plan_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False, by_length=not packing,
                            packing=packing, max_length=max_length)
        return [collate([[self.eval[i] for i in row] for row in batch], self.pad_id, packed=packing) for batch in plan]


def split_off(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of items (at least one) chosen by a seeded permutation: (kept, held_out)."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    n_held = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(int(i) for i in order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_tokenized(
    source: str,
    tokenizer,
    *,
    fmt: str,
    fields: dict[str, str] | None,
    hf_config: str | None,
    split: str,
    system_prompt: str | None,
    max_length: int,
    truncation: str,
    train_on_prompt: bool,
    dedupe: bool,
    min_tokens: int,
    limit: int | None,
    skip_invalid: bool,
) -> tuple[list[TokenizedExample], DataStats]:
    """Read one source and turn it into tokenized examples, counting every stage."""
    stats = DataStats()
    records = read_source(source, split=split, hf_config=hf_config, skip_invalid=skip_invalid, stats=stats)
    examples = normalise(records, fmt=fmt, fields=fields, system_prompt=system_prompt, skip_invalid=skip_invalid, stats=stats)
    if dedupe:
        examples = remove_duplicates(examples, stats=stats)
    if limit is not None:
        examples = examples[:limit]
    tokenized, stats = tokenize_examples(
        examples, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt,
        truncation=truncation, skip_invalid=skip_invalid, stats=stats, show_progress=len(examples) > 2000,
    )
    if min_tokens:
        tokenized = filter_by_length(tokenized, min_tokens=min_tokens, stats=stats)
        if not tokenized:
            raise DataError(f"no examples left after the min_tokens={min_tokens} filter", path=str(source))
    return tokenized, stats


def build_datasets(
    *,
    train_source: str,
    eval_source: str | None,
    tokenizer,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    hf_config: str | None = None,
    split: str = "train",
    eval_split: str | None = None,
    system_prompt: str | None = None,
    max_length: int = 512,
    truncation: str = "truncate",
    train_on_prompt: bool = False,
    dedupe: bool = True,
    min_tokens: int = 0,
    limit: int | None = None,
    eval_fraction: float = 0.0,
    eval_limit: int | None = None,
    skip_invalid: bool = False,
    seed: int = 42,
) -> TrainingData:
    """The train and eval sets of a run: eval from its own source, or a seeded fraction of train."""
    common = dict(
        tokenizer=tokenizer, fmt=fmt, fields=fields, hf_config=hf_config, system_prompt=system_prompt,
        max_length=max_length, truncation=truncation, train_on_prompt=train_on_prompt, dedupe=dedupe,
        min_tokens=min_tokens, skip_invalid=skip_invalid,
    )
    train, train_stats = load_tokenized(train_source, split=split, limit=limit, **common)
    eval_stats = None
    notes = []
    if eval_source is not None:
        eval_set, eval_stats = load_tokenized(eval_source, split=eval_split or split, limit=eval_limit, **common)
    elif eval_split is not None:
        eval_set, eval_stats = load_tokenized(train_source, split=eval_split, limit=eval_limit, **common)
    else:
        train, eval_set = split_off(train, eval_fraction, seed)
        if eval_set:
            notes.append(f"{len(eval_set)} held out for eval (eval_fraction={eval_fraction}, seed {seed})")
        eval_set = eval_set[:eval_limit] if eval_limit else eval_set
    return TrainingData(train=train, eval=eval_set, pad_id=tokenizer.pad_token_id, train_stats=train_stats,
                        eval_stats=eval_stats, notes=notes)
