"""Glue: read -> normalise -> dedupe -> tokenize in one call; splits; validate and inspect.

`validate_data` and `inspect_examples` are the library cores of `tunelab data validate`
and `tunelab data inspect`; the `render_*` functions turn their results into Rich output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tunelab.data.formats import FieldMap, detect_file_formats, normalise, remove_duplicates
from tunelab.data.render import TokenizedExample, Truncation, filter_by_length, tokenize_examples
from tunelab.data.records import DataStats
from tunelab.data.sources import TextSplit, read_source
from tunelab.errors import TunelabError

T = TypeVar("T")
TRAINED_STYLE = "black on green"
UNTRAINED_STYLE = "dim"


def load_tokenized(
    source: str | Path,
    tokenizer,
    *,
    fmt: str = "auto",
    fields: FieldMap | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    split: str = "train",
    hf_config: str | None = None,
    text_split: TextSplit = "paragraphs",
    max_length: int = 512,
    train_on_prompt: bool = False,
    truncation: Truncation = "truncate",
    dedupe: bool = True,
    min_tokens: int = 0,
    limit: int | None = None,
    skip_invalid: bool = False,
    show_progress: bool = True,
) -> tuple[list[TokenizedExample], DataStats]:
    """Read a source, normalise its records, drop exact duplicates, tokenize, filter short ones.

    `limit` keeps only the first N examples (after deduplication). Returns the tokenized
    examples and the counts of every stage (read, invalid skipped, duplicates removed,
    filtered, truncated, dropped, kept per format, tokens).
    """
    stats = DataStats()
    records = read_source(source, split=split, hf_config=hf_config, text_split=text_split, skip_invalid=skip_invalid, stats=stats)
    examples = normalise(records, fmt=fmt, fields=fields, system_prompt=system_prompt, skip_invalid=skip_invalid, stats=stats)
    if dedupe:
        examples = remove_duplicates(examples, stats=stats)
    if limit is not None:
        examples = examples[:limit]
    tokenized, stats = tokenize_examples(
        examples,
        tokenizer,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        truncation=truncation,
        skip_invalid=skip_invalid,
        stats=stats,
        show_progress=show_progress,
    )
    if min_tokens > 0:
        tokenized = filter_by_length(tokenized, min_tokens=min_tokens, stats=stats)
        if not tokenized:
            raise TunelabError(f"{source}: no examples left after the min_tokens={min_tokens} filter ({stats.filtered} filtered)")
    return tokenized, stats


def source_formats(
    source: str | Path,
    *,
    fmt: str = "auto",
    fields: FieldMap | Mapping[str, str] | None = None,
    split: str = "train",
    hf_config: str | None = None,
) -> set[str]:
    """The formats a source's records are read as (one per file with fmt "auto"), without tokenizing.

    Training asks this before it loads data, to know whether the run needs a chat template
    at all: plain text does not, and a base model must not get one added for it.
    """
    if fields is not None or fmt == "custom":
        return {"custom"}
    if fmt != "auto":
        return {fmt}
    # Bad records are skipped here; the real read reports them with file:line.
    return detect_file_formats(read_source(source, split=split, hf_config=hf_config, skip_invalid=True))


def split_examples(items: Sequence[T], *, eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A deterministic (train, eval) split: a seeded random `eval_fraction` of the items is eval.

    Both parts keep the original order. A positive fraction always gives at least one eval
    item and leaves at least one train item. Split after deduplication, so no exact
    duplicate is in both parts.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise TunelabError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(items), []
    if len(items) < 2:
        raise TunelabError(f"cannot split {len(items)} example(s) into train and eval; add data or give a separate eval set")
    eval_count = min(max(1, round(len(items) * eval_fraction)), len(items) - 1)
    eval_indices = set(int(i) for i in np.random.default_rng(seed).permutation(len(items))[:eval_count])
    train = [item for i, item in enumerate(items) if i not in eval_indices]
    evaluation = [item for i, item in enumerate(items) if i in eval_indices]
    return train, evaluation


# --- validate ----------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What `validate_data` found: the counts, and the token length of every kept example."""

    source: str
    stats: DataStats
    lengths: list[int]
    max_length: int
    truncation: str
    chat_template_fallback: str | None = None

    def histogram(self, bins: int = 10) -> list[tuple[int, int, int]]:
        """(low, high, count) buckets of token lengths, equal width from the shortest to the longest."""
        if not self.lengths:
            return []
        low, top = min(self.lengths), max(self.lengths)
        width = max(1, -(-(top - low + 1) // bins))
        counts = [0] * bins
        for length in self.lengths:
            counts[(length - low) // width] += 1
        return [(low + k * width, low + (k + 1) * width - 1, counts[k]) for k in range(bins) if low + k * width <= top]


def validate_data(
    source: str | Path,
    tokenizer,
    *,
    fmt: str = "auto",
    fields: FieldMap | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    split: str = "train",
    hf_config: str | None = None,
    max_length: int = 512,
    truncation: Truncation = "truncate",
    train_on_prompt: bool = False,
    skip_invalid: bool = False,
    fallback_template: str = "chatml",
) -> ValidationReport:
    """Check a data source end to end (read, formats, chat template, label masks, lengths).

    Raises a DataError at the first bad record unless `skip_invalid`; then the report counts
    them. A tokenizer without a chat template gets `fallback_template` (noted in the report).
    """
    from tunelab.data.render import ensure_chat_template

    applied = ensure_chat_template(tokenizer, fallback_template)
    tokenized, stats = load_tokenized(
        source,
        tokenizer,
        fmt=fmt,
        fields=fields,
        system_prompt=system_prompt,
        split=split,
        hf_config=hf_config,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        truncation=truncation,
        skip_invalid=skip_invalid,
    )
    return ValidationReport(str(source), stats, [len(item) for item in tokenized], max_length, truncation, applied)


def render_validation_report(report: ValidationReport) -> RenderableType:
    """The report as Rich tables: counts, examples per format, a token-length histogram, problems."""
    stats = report.stats
    counts = Table(title=f"Data: {report.source}", show_header=False, title_justify="left")
    counts.add_column("what")
    counts.add_column("count", justify="right")
    rows = [
        ("records read", stats.read),
        ("invalid records skipped", stats.invalid_skipped),
        ("exact duplicates removed", stats.duplicates_removed),
        (f"truncated to {report.max_length} tokens", stats.truncated),
        (f"dropped (longer than {report.max_length} tokens)", stats.dropped),
        ("examples kept", stats.examples),
        ("tokens", stats.tokens),
        ("trained tokens (targets)", stats.trained_tokens),
    ]
    for label, value in rows:
        counts.add_row(label, f"{value:,}")
    formats = Table(title="Examples per format", title_justify="left")
    formats.add_column("format")
    formats.add_column("examples", justify="right")
    for name, count in sorted(stats.formats.items()):
        formats.add_row(name, f"{count:,}")
    parts: list[RenderableType] = [counts, formats, _histogram_table(report)]
    if report.chat_template_fallback:
        parts.append(Text(f"note: the tokenizer has no chat template; used the fallback {report.chat_template_fallback!r}", style="yellow"))
    if stats.problems:
        problems = Text(f"skipped records ({stats.invalid_skipped}; first {len(stats.problems)} shown):\n", style="yellow")
        for problem in stats.problems:
            problems.append(f"  {problem}\n", style="")
        parts.append(problems)
    if stats.invalid_skipped:
        parts.append(Text(f"{stats.examples:,} examples usable; {stats.invalid_skipped:,} invalid records skipped", style="bold yellow"))
    else:
        parts.append(Text(f"ok: {stats.examples:,} examples ready for training", style="bold green"))
    return Group(*parts)


def _histogram_table(report: ValidationReport, bar_width: int = 40) -> Table:
    lengths = report.lengths
    table = Table(
        title=f"Token lengths (min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)})", title_justify="left"
    )
    table.add_column("tokens", justify="right")
    table.add_column("examples", justify="right")
    table.add_column("")
    buckets = report.histogram()
    most = max(count for _, _, count in buckets)
    for low, high, count in buckets:
        bar = "█" * max(1, round(bar_width * count / most)) if count else ""
        table.add_row(f"{low}-{high}", f"{count:,}", Text(bar, style="cyan"))
    return table


# --- inspect -----------------------------------------------------------------------------


def inspect_examples(
    source: str | Path,
    tokenizer,
    *,
    n: int = 3,
    fmt: str = "auto",
    fields: FieldMap | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    split: str = "train",
    hf_config: str | None = None,
    max_length: int = 512,
    truncation: Truncation = "truncate",
    train_on_prompt: bool = False,
    skip_invalid: bool = False,
    fallback_template: str = "chatml",
) -> list[TokenizedExample]:
    """The first `n` examples of a source, tokenized exactly as training would see them.

    Only those records are normalised and tokenized, so a bad record further down does not
    stop a quick look (`validate_data` checks everything).
    """
    from tunelab.data.render import ensure_chat_template

    if n < 1:
        raise TunelabError(f"-n must be at least 1, got {n}")
    ensure_chat_template(tokenizer, fallback_template)
    records = read_source(source, split=split, hf_config=hf_config, skip_invalid=skip_invalid)
    examples = normalise(records, fmt=fmt, fields=fields, system_prompt=system_prompt, skip_invalid=skip_invalid, limit=n)
    tokenized, _ = tokenize_examples(
        examples, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt, truncation=truncation, skip_invalid=skip_invalid
    )
    return tokenized


def highlight_trained(example: TokenizedExample, tokenizer, *, markers: bool = False) -> Text:
    """The example's text with trained tokens (targets) highlighted and the rest dimmed.

    Tokens are decoded in runs of equal trained-ness, so multi-byte characters inside a
    run decode whole; special tokens (<|im_end|>) are shown. `markers` also wraps each
    trained run in ⟦ ⟧, for output without colours (a pipe, a file).
    """
    text = Text()
    trained = [label != -100 for label in example.labels]
    start = 0
    for end in range(1, len(trained) + 1):
        if end == len(trained) or trained[end] != trained[start]:
            piece = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=False)
            if trained[start]:
                text.append(f"⟦{piece}⟧" if markers else piece, style=TRAINED_STYLE)
            else:
                text.append(piece, style=UNTRAINED_STYLE)
            start = end
    return text


def render_inspection(examples: Sequence[TokenizedExample], tokenizer, *, markers: bool = False) -> RenderableType:
    """Each example's header (source, format, token counts) and its highlighted text (see highlight_trained)."""
    trained_label = "⟦trained⟧ (loss on these tokens)" if markers else "trained (loss on these tokens)"
    legend = Text.assemble("legend: ", (trained_label, TRAINED_STYLE), "  ", ("not trained", UNTRAINED_STYLE))
    parts: list[RenderableType] = [legend]
    for number, example in enumerate(examples, start=1):
        truncated = ", truncated" if example.truncated else ""
        header = f"── example {number}: {example.source} ({example.format}, {len(example)} tokens, {example.num_trained} trained{truncated})"
        parts += [Text(header, style="bold"), highlight_trained(example, tokenizer, markers=markers), Text("")]
    return Group(*parts)
