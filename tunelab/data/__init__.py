"""Data layer: read sources, normalise formats, render with the chat template, batch.

    records = read_source(path_or_hub_id, split="train", hf_config=None, skip_invalid=False)
    examples = normalise(records, fmt="auto", fields=None, system_prompt=None)
    tokenized, stats = tokenize_examples(examples, tokenizer, max_length=512)
    train, eval = split_examples(tokenized, eval_fraction=0.1, seed=0)
    plan = plan_batches([len(t) for t in train], batch_size=8, seed=0, epoch=0)
    batch = collate([[train[i] for i in row] for row in plan[0]], pad_id=tokenizer.pad_token_id)

or `load_tokenized(path, tokenizer, ...)` for the first three steps plus deduplication.
"""

from tunelab.data.formats import (
    FORMATS,
    Example,
    FieldMap,
    detect_format,
    normalise,
    parse_field_map,
    remove_duplicates,
)
from tunelab.data.packing import Batch, collate, pack_rows, plan_batches
from tunelab.data.pipeline import (
    ValidationReport,
    highlight_trained,
    inspect_examples,
    load_tokenized,
    render_inspection,
    render_validation_report,
    split_examples,
    validate_data,
)
from tunelab.data.render import (
    FALLBACK_TEMPLATES,
    IGNORE_INDEX,
    TokenizedExample,
    control_token_ids,
    conversation_ids_and_mask,
    end_of_turn_token_id,
    ensure_chat_template,
    filter_by_length,
    set_chat_template,
    tokenize_example,
    tokenize_examples,
)
from tunelab.data.records import DataStats, Location, Record
from tunelab.data.sources import read_source

__all__ = [
    "FALLBACK_TEMPLATES",
    "FORMATS",
    "IGNORE_INDEX",
    "Batch",
    "DataStats",
    "Example",
    "FieldMap",
    "Location",
    "Record",
    "TokenizedExample",
    "ValidationReport",
    "collate",
    "control_token_ids",
    "conversation_ids_and_mask",
    "detect_format",
    "end_of_turn_token_id",
    "ensure_chat_template",
    "filter_by_length",
    "highlight_trained",
    "inspect_examples",
    "load_tokenized",
    "normalise",
    "pack_rows",
    "parse_field_map",
    "plan_batches",
    "read_source",
    "remove_duplicates",
    "render_inspection",
    "render_validation_report",
    "set_chat_template",
    "split_examples",
    "tokenize_example",
    "tokenize_examples",
    "validate_data",
]
