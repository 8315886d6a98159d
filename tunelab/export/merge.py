"""Fold LoRA / DoRA adapters into the base weights, and load any source as one plain model.

`load_source` is the entry point of every export: a run folder, checkpoint or adapter is
loaded on its base *unquantized* in fp32 (a QLoRA run's 4-bit base is re-read from the
original weights: folding an update into 4-bit blocks would round it away), the adapter's
logits are measured, the adapter is merged, and the merged logits are checked against
them. A model directory, .gguf, hub id or the bundled default is loaded as is.

`merge` writes the merged model as a plain Hugging Face directory (safetensors,
config.json, tokenizer + chat template, generation_config whose EOS includes the
end-of-turn token), loadable by `AutoModelForCausalLM.from_pretrained` without tunelab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.console import console, status
from tunelab.errors import TunelabError
from tunelab.export import verify

MERGE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Source:
    """A source loaded for export: the merged fp32 model, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # as the user gave it
    kind: str  # "adapter" or "model"
    base_model: str | None = None  # adapters: the base as recorded with the run
    method: str | None = None  # adapters: lora, dora or qlora
    saved_dtype: torch.dtype = torch.float32  # the dtype the base's weights are stored in
    weights_dir: Path | None = None  # the adapter / model directory read
    run_config: Path | None = None  # config.yaml of the run, when the source is (in) a run
    prompts: list[list[int]] = field(default_factory=list)  # verification prompt ids
    reference_logits: list[torch.Tensor] = field(default_factory=list)  # fp32 logits of the source as trained
    merge_check: dict | None = None  # adapter-on-base vs merged numbers
    task: str = "causal_lm"  # or "classification" (tunelab.export.classifier)


def _run_config_for(weights_dir: Path | None) -> Path | None:
    """config.yaml of the run holding this final/ or checkpoints/step-N/ folder, if any."""
    if weights_dir is None:
        return None
    for folder in (weights_dir.parent, weights_dir.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _stored_dtype(source: str) -> torch.dtype:
    """The dtype a model directory's config says its weights are stored in (fp32 if unstated)."""
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return torch.float32
    name = json.loads(config_path.read_text()).get("dtype") or json.loads(config_path.read_text()).get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def load_source(source: str, *, trust_remote_code: bool = False) -> Source:
    """Load a run / checkpoint / adapter / model dir / .gguf / hub id as one merged fp32 model.

    Adapters are verified while merging: the merged model's logits must equal the
    adapter-on-base logits (fp32 tolerance) on the verification prompts.
    """
    from tunelab.models import (
        DEFAULT_MODEL,
        RUN_META_FILE,
        ModelLoading,
        load_base_model,
        load_merged_model,
        load_tokenizer,
        resolve_model_source,
        resolve_weights_dir,
    )

    path = Path(source).expanduser()
    if source not in (None, DEFAULT_MODEL) and not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise TunelabError(f"'{source}' is not a run folder, adapter, model directory or .gguf file (it does not exist)")
    weights_dir = resolve_weights_dir(source) if path.is_dir() else None
    run_config = _run_config_for(weights_dir)
    if weights_dir is not None and (weights_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        meta_path = weights_dir / RUN_META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        adapter_config = json.loads((weights_dir / "adapter_config.json").read_text())
        base_name = meta.get("base_model") or adapter_config.get("base_model_name_or_path")
        method = meta.get("method") or ("dora" if adapter_config.get("use_dora") else "lora")
        base_source = resolve_model_source(base_name)
        has_tokenizer = (weights_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(weights_dir if has_tokenizer else base_source), trust_remote_code=trust_remote_code)
        note = " (QLoRA: the base is loaded unquantized, the adapter is never folded into 4-bit weights)" if method == "qlora" else ""
        with status(f"Loading {base_name or 'default'} in fp32 with the {method} adapter of {weights_dir}{note}"):
            # The base may itself be a run (DPO on an SFT run): it is merged first.
            base = load_merged_model(base_source, ModelLoading(trust_remote_code=trust_remote_code, device="cpu"))
            model = PeftModel.from_pretrained(base, weights_dir)
            model.eval()
        prompts = verify.verification_prompts(tokenizer, run_config)
        reference = verify.all_logits(verify.torch_logits_fn(model), prompts)
        with status(f"Merging the {method} adapter into the base weights"):
            model = model.merge_and_unload()
            model.eval()
        merged = verify.all_logits(verify.torch_logits_fn(model), prompts)
        check = verify.compare_logits(reference, merged)
        verify.check_logits(check, dtype="float32", what="the merged model")
        console.print(f"[green]merge verified[/] adapter-on-base vs merged: {verify.format_numbers(check)}", highlight=False)
        return Source(
            model=model, tokenizer=tokenizer, name=source, kind="adapter", base_model=base_name or DEFAULT_MODEL,
            method=method, saved_dtype=_stored_dtype(base_source), weights_dir=weights_dir, run_config=run_config,
            prompts=prompts, reference_logits=reference, merge_check=check,
        )
    model_source = str(weights_dir) if weights_dir is not None else resolve_model_source(source)
    tokenizer = load_tokenizer(model_source, trust_remote_code=trust_remote_code)
    with status(f"Loading {source} in fp32"):
        model = load_base_model(model_source, ModelLoading(trust_remote_code=trust_remote_code, device="cpu"))
        model.eval()
    prompts = verify.verification_prompts(tokenizer, run_config)
    reference = verify.all_logits(verify.torch_logits_fn(model), prompts)
    return Source(
        model=model, tokenizer=tokenizer, name=source, kind="model", saved_dtype=_stored_dtype(model_source),
        weights_dir=weights_dir, run_config=run_config, prompts=prompts, reference_logits=reference,
    )


def resolve_merge_dtype(name: str, source: Source) -> torch.dtype:
    """`auto` keeps the dtype the base is stored in; fp32 / bf16 / fp16 as named."""
    from tunelab.models import TORCH_DTYPES

    if name not in MERGE_DTYPES:
        raise TunelabError(f"--dtype {name!r} is not one of {', '.join(MERGE_DTYPES)}")
    return source.saved_dtype if name == "auto" else TORCH_DTYPES[name]


def describe_source(source: Source) -> dict:
    """The `source` block of export.json."""
    info = {"path": source.name, "kind": source.kind}
    if source.kind == "adapter":
        info.update(base_model=source.base_model, method=source.method, adapter=str(source.weights_dir))
        if source.method == "qlora":
            info["note"] = "QLoRA adapter merged into the unquantized base (fp32), not into 4-bit weights"
    if source.merge_check is not None:
        info["merge_verification"] = source.merge_check
    return info
