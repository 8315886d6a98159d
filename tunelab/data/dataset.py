"""Training data for one run: read -> normalise -> dedupe -> tokenize -> split, then batches.

`build_datasets` runs the whole data pipeline with explicit arguments and returns a
`TrainingData`, which the trainer asks for a deterministic batch plan per epoch
(`epoch_plan`) and collates one batch at a time (`collate`), so a resumed run continues
at exactly the batch where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunelab.data.packing import Batch, collate, plan_batches
from tunelab.data.pipeline import load_tokenized, split_examples
from tunelab.data.render import TokenizedExample
from tunelab.data.sources import DataStats


@dataclass
class TrainingData:
    """Tokenized train/eval examples plus what batching needs (pad id, packing, row length)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    pad_id: int
    train_stats: DataStats
    eval_stats: DataStats | None = None
    notes: list[str] = field(default_factory=list)
    packing: bool = False  # several examples per row, attention kept within each (data.packing)
    max_length: int = 512  # tokens per packed row (data.max_seq_length)

    def summary(self) -> str:
        held_out = f"; eval {len(self.eval)} examples" if self.eval else "; no eval split"
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"train: {self.train_stats.summary()}{held_out}{extra}"

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> list[Batch]:
        """The micro-batches of one epoch (rows of example indices); same inputs, same plan."""
        lengths = [len(x) for x in self.train]
        return plan_batches(lengths, batch_size, seed=seed, epoch=epoch, packing=self.packing, max_length=self.max_length)

    def eval_plan(self, batch_size: int) -> list[Batch]:
        """The eval set's batches in a fixed length-sorted order (least padding)."""
        lengths = [len(x) for x in self.eval]
        return plan_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False, by_length=not self.packing,
                            packing=self.packing, max_length=self.max_length) if self.eval else []

    def collate(self, batch: Batch, *, split: str = "train") -> dict[str, torch.Tensor]:
        examples = self.train if split == "train" else self.eval
        return causal_only(collate([[examples[i] for i in row] for row in batch], self.pad_id, packed=self.packing))


def causal_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the attention mask of a right-padded batch, so attention takes the plain causal
    kernel (SDPA's is_causal path, which also skips the masked half of the work).

    This changes nothing a target sees: with causal attention every real token attends
    only to tokens before it, which are all real when padding is at the right end, and
    positions count from 0 either way. Padding positions compute garbage that no loss
    reads (their labels are ignored). A mask with a gap elsewhere is kept.
    """
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


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
        min_tokens=min_tokens, skip_invalid=skip_invalid, show_progress=True,
    )
    train, train_stats = load_tokenized(train_source, split=split, limit=limit, **common)
    eval_stats = None
    notes = []
    if eval_source is not None:
        eval_set, eval_stats = load_tokenized(eval_source, split=eval_split or split, limit=eval_limit, **common)
    elif eval_split is not None:
        eval_set, eval_stats = load_tokenized(train_source, split=eval_split, limit=eval_limit, **common)
    else:
        train, eval_set = split_examples(train, eval_fraction=eval_fraction, seed=seed)
        if eval_set:
            notes.append(f"{len(eval_set)} held out for eval (eval_fraction={eval_fraction}, seed {seed})")
        eval_set = eval_set[:eval_limit] if eval_limit else eval_set
    return TrainingData(train=train, eval=eval_set, pad_id=tokenizer.pad_token_id, train_stats=train_stats,
                        eval_stats=eval_stats, notes=notes)
