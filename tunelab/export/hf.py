"""Hugging Face format: the merged model as a plain `from_pretrained` directory (or the adapter alone).

The directory holds model.safetensors, config.json, generation_config.json (EOS includes
the chat template's end-of-turn token, so `generate` stops where tunelab stops), the
tokenizer and its chat template. It is verified by loading it back with
`AutoModelForCausalLM.from_pretrained` and comparing logits with the source.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tunelab.export import verify
from tunelab.export.merge import Source

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# A 16-bit merge that keeps this share of the fine-tune or less (see verify.retention) gets a warning.
RETENTION_WARNING = 0.5


def write_merged(source: Source, directory: Path, dtype: torch.dtype) -> None:
    """Save the merged model in `dtype` with tokenizer, chat template and generation config."""
    from tunelab.models import end_of_turn_ids

    model = source.model
    model.generation_config.eos_token_id = end_of_turn_ids(source.tokenizer)
    model.generation_config.pad_token_id = source.tokenizer.pad_token_id
    save_in_dtype(source, directory, dtype)


def save_in_dtype(source: Source, directory: Path, dtype: torch.dtype) -> None:
    """The model's weights in `dtype` (safetensors) and its tokenizer."""
    import copy

    model = source.model
    model.config.dtype = dtype
    # Cast a copy only when needed: the fp32 model stays the reference for other checks.
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    to_save.save_pretrained(directory, safe_serialization=True)
    source.tokenizer.save_pretrained(directory)


def verify_directory(
    source: Source, directory: Path, dtype: torch.dtype, *, model_class=None, logits_fn=verify.torch_logits_fn
) -> dict:
    """Reload the written directory with plain transformers (`model_class`, default
    AutoModelForCausalLM) and compare its logits with the source.

    The reloaded model computes in fp32 from the stored weights, so the difference is the
    storage dtype's rounding (none for fp32).
    """
    from transformers import AutoModelForCausalLM

    reloaded = (model_class or AutoModelForCausalLM).from_pretrained(directory, dtype=torch.float32)
    reloaded.eval()
    logits = verify.all_logits(logits_fn(reloaded), source.prompts)
    del reloaded
    numbers = verify.compare_logits(source.reference_logits, logits)
    verify.check_logits(numbers, dtype=DTYPE_NAMES[dtype], what=f"the saved model ({directory.name})")
    if dtype != torch.float32 and source.base_logits is not None:
        numbers["fine_tune_retained"] = verify.retention(source.reference_logits, logits, source.base_logits)
        if numbers["fine_tune_retained"]["retention"] <= RETENTION_WARNING:
            from tunelab.console import console

            console.print(f"[yellow]warning[/] the {DTYPE_NAMES[dtype]} merge keeps only "
                          f"{100 * numbers['fine_tune_retained']['retention']:.0f}% of the fine-tune (KL to the adapter model "
                          "against the base's): rounding to 16 bits swallowed the update\n  fix: merge with --dtype fp32",
                          highlight=False)
    return numbers


def copy_adapter(weights_dir: Path, directory: Path) -> None:
    """The adapter alone (+ tokenizer, chat template, tunelab_model.json naming its base)."""
    for path in sorted(weights_dir.iterdir()):
        if path.is_file() and (path.name in ADAPTER_FILES or path.name.startswith(("tokenizer", "chat_template", "special_tokens"))
                               or path.name == "tunelab_model.json"):
            shutil.copy2(path, directory / path.name)


README = """# {name}: Hugging Face model ({dtype})

Merged from `{source}` by tunelab {version}. Plain transformers loads it; tunelab is not needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))
```

Verified against the source: {numbers}. Details in export.json.
"""

ADAPTER_README = """# {name}: {method} adapter

The adapter of `{source}` (tunelab {version}), for base model `{base}`:

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{path}")
```

`tunelab generate {path} --prompt "..."` loads it on its base as well.
"""
