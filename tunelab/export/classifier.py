"""Classifier runs (`task: classification`) after training: merged into a plain
`AutoModelForSequenceClassification` directory, verified on class logits.

A classifier has no vocabulary head, no chat template and no generation, so it is
verified by its class logits (one row per text) instead of per-position vocabulary
logits and greedy answers; the numbers and tolerances are the same as for a language
model (`tunelab.export.verify`). The labels travel in config.json (id2label / label2id),
so `pipeline("text-classification", model=DIR)` names them without tunelab.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.console import console, status
from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.merge import Source, _run_config_for, _stored_dtype

# Texts the merged / saved classifier must score as the trained one does (tokenized plainly:
# a classifier reads raw text, not a chat).
VERIFICATION_TEXTS = (
    "The invoice I received charges me twice for the same month.",
    "The app crashes every time I open the settings page.",
    "How do I change the email address on my account?",
    "I would like to cancel my subscription and get a refund.",
    "Great service, the problem was solved within minutes!",
    "Your website has been down for two hours and I cannot log in.",
)


def verification_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(text, truncation=True, max_length=128)["input_ids"] for text in VERIFICATION_TEXTS]


def class_logits_fn(model: torch.nn.Module) -> verify.LogitsFn:
    """Class logits [1, num_labels] (fp32, CPU) of one text through a PyTorch classifier."""
    device = next(model.parameters()).device

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
        return out.logits.float().cpu()

    return run


def load_classifier_source(source: str, *, trust_remote_code: bool = False) -> Source:
    """A classifier run / checkpoint / saved classifier as one merged fp32 model on the CPU.

    An adapter run is loaded on its base classifier (a QLoRA run's base unquantized), its
    class logits measured, merged, and the merged logits checked against them.
    """
    from tunelab.models import ModelLoading, load_tokenizer, resolve_weights_dir
    from tunelab.tasks.classification import load_classifier, read_run_meta, resolve_source

    weights_dir = resolve_weights_dir(source)
    meta = read_run_meta(weights_dir)
    labels, method = meta["labels"], meta.get("method", "full")
    tokenizer = load_tokenizer(str(weights_dir), trust_remote_code=trust_remote_code)
    prompts = verification_ids(tokenizer)
    common = dict(labels=labels, pad_token_id=tokenizer.pad_token_id,
                  loading=ModelLoading(trust_remote_code=trust_remote_code, device="cpu"))
    if not (weights_dir / "adapter_config.json").is_file():
        with status(f"Loading the classifier {weights_dir} in fp32"):
            model = load_classifier(str(weights_dir), **common).eval()
        return Source(
            model=model, tokenizer=tokenizer, name=source, kind="model", method=method,
            saved_dtype=_stored_dtype(str(weights_dir)), weights_dir=weights_dir, run_config=_run_config_for(weights_dir),
            prompts=prompts, reference_logits=verify.all_logits(class_logits_fn(model), prompts), task="classification",
        )
    from peft import PeftModel

    base_source = resolve_source(meta["base_model"])
    note = " (QLoRA: the base is loaded unquantized, the adapter is never folded into 4-bit weights)" if method == "qlora" else ""
    with status(f"Loading {meta['base_model']} in fp32 with the {method} adapter of {weights_dir}{note}"):
        model = PeftModel.from_pretrained(load_classifier(base_source, **common), weights_dir).eval()
    reference = verify.all_logits(class_logits_fn(model), prompts)
    with status(f"Merging the {method} adapter and the trained head into the base classifier"):
        model = model.merge_and_unload().eval()
    check = verify.compare_logits(reference, verify.all_logits(class_logits_fn(model), prompts))
    verify.check_logits(check, dtype="float32", what="the merged classifier")
    console.print(f"[green]merge verified[/] adapter-on-base vs merged: {verify.format_numbers(check)}", highlight=False)
    return Source(
        model=model, tokenizer=tokenizer, name=source, kind="adapter", base_model=meta["base_model"], method=method,
        saved_dtype=_stored_dtype(base_source), weights_dir=weights_dir, run_config=_run_config_for(weights_dir),
        prompts=prompts, reference_logits=reference, merge_check=check, task="classification",
    )


def verify_directory(source: Source, directory: Path, dtype: torch.dtype) -> dict:
    """Reload with plain `AutoModelForSequenceClassification`, compare class logits with the
    source, and check that config.json names the run's classes in order."""
    import json

    from transformers import AutoModelForSequenceClassification

    from tunelab.export import hf

    numbers = hf.verify_directory(source, directory, dtype, model_class=AutoModelForSequenceClassification,
                                  logits_fn=class_logits_fn)
    labels = [source.model.config.id2label[i] for i in range(source.model.config.num_labels)]
    saved = json.loads((directory / "config.json").read_text())["id2label"]
    if [saved[str(i)] for i in range(len(saved))] != labels:
        raise verify.VerificationError(f"the saved classifier names its classes {saved}, the run {labels}; nothing was written")
    numbers["labels"] = labels
    return numbers


def check_format(source: str, fmt: str) -> None:
    """Classifiers export as Hugging Face directories; the other formats here are generating LMs."""
    if fmt != "hf":
        raise TunelabError(
            f"'{source}' is a classifier (task: classification); --format {fmt} exports a language model for "
            "generation (vocabulary logits, KV cache)\n"
            f"  fix: tunelab export {source} --format hf (a merged AutoModelForSequenceClassification directory), "
            "or --format hf --adapter-only"
        )


README = """# {name}: Hugging Face sequence classifier ({dtype})

Merged from `{source}` by tunelab {version}. Plain transformers loads it; tunelab is not needed:

```python
from transformers import pipeline

classify = pipeline("text-classification", model="{path}")
print(classify("My invoice is wrong."))   # [{{'label': ..., 'score': ...}}]
```

Labels (config.json id2label): {labels}.
Verified against the source: {numbers}. Details in export.json.
"""

ADAPTER_README = """# {name}: {method} adapter of a sequence classifier

The adapter and trained head of `{source}` (tunelab {version}), for base model `{base}`:

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

labels = {labels}
base = AutoModelForSequenceClassification.from_pretrained(
    "{base}", num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={{n: i for i, n in enumerate(labels)}},
    ignore_mismatched_sizes=True)  # the head comes from the adapter
model = PeftModel.from_pretrained(base, "{path}")
```

`tunelab predict {path} --input texts.jsonl` loads it on its base as well.
"""
