"""Labelled texts for sequence classification: records -> (text, optional second text, label) ->
the model tokenizer's own encoding -> right-padded batches.

Fields are found by name (`TEXT_FIELDS`, `PAIR_FIELDS`, `LABEL_FIELDS`) or named in the config
(`classification.*_field`). Labels may be strings or integers; the label set is the sorted set of
training labels. Bad records raise a DataError with their `file:line` (or are skipped and counted
with `skip_invalid`); an eval label outside the training labels is an error naming its line.
`tunelab data validate --task classification` reports counts, class balance and lengths.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.data.packing import Batch, plan_batches, right_pad
from tunelab.data.pipeline import split_examples
from tunelab.data.records import DataStats, Location, Record
from tunelab.data.sources import read_source
from tunelab.errors import DataError

# Field names tried, in order, when the config does not name them.
# Field names tried, in order, when the config does not name them.
TEXT_FIELDS = ("text", "sentence", "content", "review", "document", "utterance", "query", "question")
PAIR_FIELDS = (
    ("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
    ("question", "sentence"), ("query", "passage"), ("sentence", "context"),
)
LABEL_FIELDS = ("label", "labels", "class", "category", "target", "intent", "sentiment")


@dataclass(frozen=True)
class LabelledText:
    """One tokenized example: token ids (and token types for encoder pairs), its class id, its origin."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int
    source: Location

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Fields:
    """Which record fields hold the text, the optional second text and the label."""

    text: str
    pair: str | None
    label: str | None


@dataclass(frozen=True)
class RawExample:
    text: str
    pair: str | None
    label: str | None  # label name (ints as their decimal text); None when the data has no labels
    source: Location


def detect_fields(
    records: Sequence[Record], *, text_field: str | None = None, pair_field: str | None = None,
    label_field: str | None = None, need_label: bool = True,
) -> Fields:
    """The text / pair / label fields: as configured, else found by name in the first records."""
    keys: set[str] = set()
    for record in records[:100]:
        keys.update(key for key, value in record.data.items() if value is not None)
    first = records[0].source
    if text_field is None:
        pairs = [(a, b) for a, b in PAIR_FIELDS if a in keys and b in keys]
        if pairs and pair_field is None:
            text_field, pair_field = pairs[0]
        else:
            text_field = next((name for name in TEXT_FIELDS if name in keys), None)
    if label_field is None:
        label_field = next((name for name in LABEL_FIELDS if name in keys and name != text_field), None)
    problems = []
    if text_field is None:
        problems.append(f"no text field (tried {', '.join(TEXT_FIELDS)})")
    if label_field is None and need_label:
        problems.append(f"no label field (tried {', '.join(LABEL_FIELDS)})")
    for name in (text_field, pair_field, label_field if need_label else None):
        if name is not None and name not in keys:
            problems.append(f'no field "{name}"')
    if problems:
        raise first.error(
            f"cannot find the classification fields: {'; '.join(problems)}; the records have {sorted(keys)}\n"
            "  fix: set classification.text_field, classification.label_field (and classification.text_pair_field "
            "for pairs), e.g. --text-field review --label-field stars"
        )
    return Fields(text_field, pair_field, label_field if label_field in keys else None)


def label_name(value: Any, where: Location, field_name: str) -> str:
    """A label as text: strings as they are (stripped), integers as decimals; anything else is an error."""
    if value is None:
        raise where.error(f'label field "{field_name}" is missing; every training and eval record needs a label')
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise where.error(f'label field "{field_name}" must be a string or an integer, got {value!r}')
    text = str(value).strip()
    if not text:
        raise where.error(f'label field "{field_name}" is empty')
    return text


def read_labelled(
    records: Sequence[Record], fields: Fields, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[RawExample]:
    """Records -> (text, pair, label) examples; a bad record raises a DataError with its file:line."""
    stats = stats if stats is not None else DataStats()
    examples = []
    for record in records:
        data, where = record.data, record.source
        try:
            text = _text(data, fields.text, where)
            pair = _text(data, fields.pair, where) if fields.pair else None
            label = label_name(data.get(fields.label), where, fields.label) if fields.label else None
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skip(error)
            continue
        examples.append(RawExample(text, pair, label, where))
    stats.formats["classification"] = stats.formats.get("classification", 0) + len(examples)
    return examples


def _text(data: dict, name: str, where: Location) -> str:
    value = data.get(name)
    if value is None:
        raise where.error(f'field "{name}" is missing')
    if not isinstance(value, str):
        raise where.error(f'field "{name}" must be a string, got {value!r}')
    if not value.strip():
        raise where.error(f'field "{name}" is empty')
    return value


def label_set(examples: Sequence[RawExample]) -> list[str]:
    """The sorted training labels: numerically when every label is an integer, else alphabetically."""
    names = {example.label for example in examples if example.label is not None}
    if names and all(_is_int(name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def check_known_labels(examples: Sequence[RawExample], labels: Sequence[str]) -> None:
    """Every label must be one the model was trained on; the first unknown one is an error with its line."""
    known = set(labels)
    for example in examples:
        if example.label is not None and example.label not in known:
            raise example.source.error(
                f'label "{example.label}" does not occur in the training data, so the model cannot predict it '
                f"(training labels: {', '.join(labels)})\n  fix: correct the label, or add training examples with it"
            )


def tokenize_labelled(
    examples: Sequence[RawExample], tokenizer, labels: Sequence[str], *, max_length: int, truncation: str = "truncate",
    stats: DataStats | None = None,
) -> list[LabelledText]:
    """Tokenize with the model's own special tokens; over-long examples are truncated or dropped."""
    stats = stats if stats is not None else DataStats()
    if not examples:
        return []
    index = {name: i for i, name in enumerate(labels)}
    texts = [example.text for example in examples]
    pairs = [example.pair for example in examples] if examples[0].pair is not None else None
    encoded = tokenizer(texts, pairs, truncation=False, verbose=False)
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids")
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    dropped: set[int] = set()
    if long and truncation == "drop":
        dropped = set(long)
        stats.dropped += len(long)
    elif long:
        again = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                          truncation=True, max_length=max_length, verbose=False)
        for k, i in enumerate(long):
            ids[i] = again["input_ids"][k]
            if types is not None:
                types[i] = again["token_type_ids"][k]
        stats.truncated += len(long)
    out = []
    for i, example in enumerate(examples):
        if i in dropped:
            continue
        label = index[example.label] if example.label is not None else -1
        out.append(LabelledText(list(ids[i]), list(types[i]) if types is not None else None, label, example.source))
    stats.examples += len(out)
    stats.tokens += sum(len(x) for x in out)
    stats.trained_tokens += len(out)  # a classifier's targets are its examples
    return out


def remove_duplicate_examples(examples: Sequence[RawExample], stats: DataStats) -> list[RawExample]:
    """Drop exact repeats of (text, pair, label), keeping the first."""
    seen: set[tuple] = set()
    kept = []
    for example in examples:
        key = (example.text, example.pair, example.label)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    stats.duplicates_removed += len(examples) - len(kept)
    return kept


def collate_labelled(rows: Sequence[LabelledText], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (/ token_type_ids) right-padded to the longest row, and labels (B,)."""
    input_ids, attention_mask = right_pad([row.input_ids for row in rows], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if rows[0].token_type_ids is not None:
        batch["token_type_ids"], _ = right_pad([row.token_type_ids for row in rows], 0)
    batch["labels"] = torch.tensor([row.label for row in rows], dtype=torch.long)
    return batch


@dataclass
class ClassificationData:
    """A run's tokenized, labelled train/eval sets; plans and collates batches like `TrainingData`."""

    train: list[LabelledText]
    eval: list[LabelledText]
    labels: list[str]
    pad_id: int
    train_stats: DataStats
    notes: list[str] = field(default_factory=list)

    def class_counts(self, examples: Sequence[LabelledText]) -> dict[str, int]:
        counts = Counter(example.label for example in examples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.labels)}

    def summary(self) -> str:
        balance = ", ".join(f"{name} {count}" for name, count in self.class_counts(self.train).items())
        held_out = f"; eval {len(self.eval)} examples" if self.eval else "; no eval split"
        stats = self.train_stats
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"train: {stats.read} read, {stats.invalid_skipped} invalid skipped, {stats.duplicates_removed} duplicates "
            f"removed, {stats.truncated} truncated, {stats.dropped} dropped; {len(self.train)} examples, "
            f"{len(self.labels)} labels ({balance}), {stats.tokens} tokens{held_out}{extra}"
        )

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> list[Batch]:
        """Length-bucketed, shuffled batches of one epoch (a pure function of seed and epoch)."""
        return plan_batches([len(x) for x in self.train], batch_size, seed=seed, epoch=epoch)

    def eval_plan(self, batch_size: int) -> list[Batch]:
        """The eval set's batches, length-sorted, in a fixed order."""
        return plan_batches([len(x) for x in self.eval], batch_size, seed=0, epoch=0, shuffle=False) if self.eval else []

    def collate(self, batch: Batch, *, split: str = "train") -> dict[str, torch.Tensor]:
        examples = self.train if split == "train" else self.eval
        return collate_labelled([examples[i] for (i,) in batch], self.pad_id)


def load_labelled(
    source: str, *, split: str, hf_config: str | None, fields: dict[str, str | None], skip_invalid: bool,
    stats: DataStats, need_label: bool = True,
) -> tuple[list[RawExample], Fields]:
    """Read a source and pick out text / pair / label of every record."""
    records = read_source(source, split=split, hf_config=hf_config, skip_invalid=skip_invalid, stats=stats)
    found = detect_fields(records, text_field=fields.get("text"), pair_field=fields.get("pair"),
                          label_field=fields.get("label"), need_label=need_label)
    return read_labelled(records, found, skip_invalid=skip_invalid, stats=stats), found


def build_classification_data(
    *,
    train_source: str,
    eval_source: str | None,
    tokenizer,
    fields: dict[str, str | None],
    hf_config: str | None = None,
    split: str = "train",
    eval_split: str | None = None,
    max_length: int = 512,
    truncation: str = "truncate",
    dedupe: bool = True,
    limit: int | None = None,
    eval_fraction: float = 0.0,
    eval_limit: int | None = None,
    skip_invalid: bool = False,
    seed: int = 42,
) -> ClassificationData:
    """The train and eval sets: eval from its own source (or split), or a seeded fraction of train."""
    stats = DataStats()
    train, found = load_labelled(train_source, split=split, hf_config=hf_config, fields=fields, skip_invalid=skip_invalid, stats=stats)
    if dedupe:
        train = remove_duplicate_examples(train, stats)
    train = train[:limit] if limit else train
    labels = label_set(train)
    if len(labels) < 2:
        raise DataError(
            f"the training data has {len(labels)} distinct label(s) ({', '.join(labels)}); a classifier needs at least 2\n"
            f'  fix: check the label field ("{found.label}")',
            path=train_source,
        )
    notes = [f'fields: text "{found.text}"' + (f', pair "{found.pair}"' if found.pair else "") + f', label "{found.label}"']
    if eval_source is not None or eval_split is not None:
        eval_stats = DataStats()
        held_out, _ = load_labelled(eval_source or train_source, split=eval_split or split, hf_config=hf_config,
                                    fields=fields, skip_invalid=skip_invalid, stats=eval_stats)
        held_out = held_out[:eval_limit] if eval_limit else held_out
    else:
        train, held_out = split_examples(train, eval_fraction=eval_fraction, seed=seed)
        if held_out:
            notes.append(f"{len(held_out)} held out for eval (eval_fraction={eval_fraction}, seed {seed})")
        held_out = held_out[:eval_limit] if eval_limit else held_out
    check_known_labels(held_out, labels)
    train_tokens = tokenize_labelled(train, tokenizer, labels, max_length=max_length, truncation=truncation, stats=stats)
    eval_tokens = tokenize_labelled(held_out, tokenizer, labels, max_length=max_length, truncation=truncation)
    return ClassificationData(train=train_tokens, eval=eval_tokens, labels=labels, pad_id=tokenizer.pad_token_id,
                              train_stats=stats, notes=notes)


def validate_classification_data(
    source: str, tokenizer, *, fields: dict[str, str | None], split: str = "train", max_length: int = 512,
    skip_invalid: bool = False,
):
    """`tunelab data validate --task classification`: counts, class balance and token lengths."""
    from tunelab.data.pipeline import ValidationReport

    stats = DataStats()
    raw, found = load_labelled(source, split=split, hf_config=None, fields=fields, skip_invalid=skip_invalid, stats=stats)
    raw = remove_duplicate_examples(raw, stats)
    labels = label_set(raw)
    rows = tokenize_labelled(raw, tokenizer, labels, max_length=max_length, stats=stats)
    counts = Counter(example.label for example in raw)
    balance = {name: counts[name] for name in labels}
    report = ValidationReport(str(source), stats, [len(x) for x in rows], max_length, "truncate")
    return report, balance, found


def render_class_balance(balance: dict[str, int], found: Fields, bar_width: int = 40):
    """A Rich table of examples per label, with shares and bars."""
    from rich.table import Table
    from rich.text import Text

    total = sum(balance.values())
    pair = f', pair "{found.pair}"' if found.pair else ""
    table = Table(title=f'Class balance (text "{found.text}"{pair}, label "{found.label}")', title_justify="left")
    table.add_column("label")
    table.add_column("examples", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    most = max(balance.values()) if balance else 1
    for name, count in balance.items():
        table.add_row(name, f"{count:,}", f"{count / total:.1%}", Text("█" * max(1, round(bar_width * count / most)), style="cyan"))
    return table
