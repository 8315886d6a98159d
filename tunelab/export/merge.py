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
    base_logits: list[torch.Tensor] | None = None  # adapters: the base's logits without the adapter (fp32)
    qlora_gap: dict | None = None  # QLoRA: the export vs the model as trained (NF4 base + adapter)
    prompt_format: str = "chat"  # "text" for a run trained on plain text: its exports carry no chat template
    cache: dict = field(default_factory=dict)  # numbers computed once from the source (greedy answers, perplexity)


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


def _drop_untrained_template(tokenizer, weights_dir: Path | None) -> str:
    """A run trained on plain text was never prompted through a chat template: drop the one its
    tokenizer carries (an instruct base's), as `tunelab generate` does, so exports and their
    verification prompts format text as training did. Returns the run's prompt format."""
    from tunelab.models import trained_prompt_format

    prompt_format = trained_prompt_format(weights_dir)
    if prompt_format == "text":
        tokenizer.chat_template = None
    return prompt_format


QLORA_BASES = ("original", "dequantized")
# A QLoRA export whose top-1 agreement with the model as trained (NF4 base + adapter) falls below this is
# reported with a warning: the full-precision base differs from dequant(NF4(W)) enough to change answers.
QLORA_GAP_WARNING = 0.9


def _quantization_settings(run_config: Path | None) -> dict:
    """The run's `quantization` section (bits, quant_type, double_quant), defaults where unreadable."""
    import yaml

    settings = {"quant_type": "nf4", "double_quant": True}
    if run_config is not None and run_config.is_file():
        section = (yaml.safe_load(run_config.read_text()) or {}).get("quantization") or {}
        settings.update({k: section[k] for k in settings if k in section})
    return settings


def _load_nf4_base(base_source: str, tokenizer, run_config: Path | None, trust_remote_code: bool):
    """The base as QLoRA trained on it: 4-bit (bitsandbytes, CPU), fp32 compute."""
    from tunelab.models import ModelLoading, load_base_model

    loading = ModelLoading(bits=4, compute_dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code,
                           **_quantization_settings(run_config))
    base = load_base_model(base_source, loading)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    return base


def _dequantize_into(fp32_base: torch.nn.Module, nf4_base: torch.nn.Module) -> int:
    """Replace each fp32 Linear weight by dequant(NF4(W)), the weight QLoRA trained against; returns how many."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in nf4_base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            target = fp32_base.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(weight.reshape(target.weight.shape))
            replaced += 1
    return replaced


def qlora_gap(trained_logits: list[torch.Tensor], export_logits: list[torch.Tensor]) -> dict:
    """How far the export is from the model as trained (NF4 base + adapter): logits and top-1."""
    numbers = verify.compare_logits(trained_logits, export_logits)
    return {k: numbers[k] for k in ("max_abs_logit_diff", "max_rel_logit_diff", "top1_agreement", "positions")}


def load_source(source: str, *, trust_remote_code: bool = False, qlora_base: str = "original") -> Source:
    """Load a run / checkpoint / adapter / model dir / .gguf / hub id as one merged fp32 model.

    Adapters are verified while merging: the merged model's logits must equal the
    adapter-on-base logits (fp32 tolerance) on the verification prompts. A QLoRA run's
    export is also measured against the model as trained (NF4 base + adapter): `qlora_gap`.
    `qlora_base="dequantized"` merges into dequant(NF4(W)) instead of the original weights,
    which reproduces the trained model (the default keeps the original full-precision base).
    """
    if qlora_base not in QLORA_BASES:
        raise TunelabError(f"--qlora-base {qlora_base!r} is not one of {', '.join(QLORA_BASES)}")
    from tunelab.models import (
        DEFAULT_MODEL,
        ModelLoading,
        load_adapter_on_base,
        load_base_model,
        load_merged_model,
        load_tokenizer,
        read_model_meta,
        resolve_model_source,
        resolve_weights_dir,
    )

    path = Path(source).expanduser()
    if source not in (None, DEFAULT_MODEL) and not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise TunelabError(f"'{source}' is not a run folder, adapter, model directory or .gguf file (it does not exist)")
    weights_dir = resolve_weights_dir(source) if path.is_dir() else None
    run_config = _run_config_for(weights_dir)
    if weights_dir is not None and (weights_dir / "adapter_config.json").is_file():
        meta = read_model_meta(weights_dir)
        adapter_config = json.loads((weights_dir / "adapter_config.json").read_text())
        base_name = meta.get("base_model") or adapter_config.get("base_model_name_or_path")
        method = meta.get("method") or ("dora" if adapter_config.get("use_dora") else "lora")
        base_source = resolve_model_source(base_name)
        has_tokenizer = (weights_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(weights_dir if has_tokenizer else base_source), trust_remote_code=trust_remote_code)
        prompt_format = _drop_untrained_template(tokenizer, weights_dir)
        note = " (QLoRA: the base is loaded unquantized, the adapter is never folded into 4-bit weights)" if method == "qlora" else ""
        if method != "qlora" and qlora_base != "original":
            raise TunelabError(f"--qlora-base is for QLoRA runs; {source} is a {method} run")
        prompts = verify.verification_prompts(tokenizer, run_config)
        trained = None
        with status(f"Loading {base_name or 'default'} in fp32 with the {method} adapter of {weights_dir}{note}"):
            # The base may itself be a run (DPO on an SFT run): it is merged first.
            base = load_merged_model(base_source, ModelLoading(trust_remote_code=trust_remote_code, device="cpu"))
        if method == "qlora":
            with status(f"Loading {base_name or 'default'} in 4 bits with the adapter: the model as trained"):
                nf4 = _load_nf4_base(base_source, tokenizer, run_config, trust_remote_code)
                if qlora_base == "dequantized":
                    _dequantize_into(base, nf4)  # before the adapter wraps nf4's layers
                trained_model = load_adapter_on_base(nf4, tokenizer, weights_dir).eval()
                trained = verify.all_logits(verify.torch_logits_fn(trained_model), prompts)
                del trained_model, nf4
        model = load_adapter_on_base(base, tokenizer, weights_dir)
        model.eval()
        reference = verify.all_logits(verify.torch_logits_fn(model), prompts)
        with model.disable_adapter():  # the base alone: how much the fine-tune moved the logits (retention checks)
            base_logits = verify.all_logits(verify.torch_logits_fn(model), prompts)
        with status(f"Merging the {method} adapter into the base weights"):
            model = model.merge_and_unload()
            model.eval()
        merged = verify.all_logits(verify.torch_logits_fn(model), prompts)
        check = verify.compare_logits(reference, merged)
        verify.check_logits(check, dtype="float32", what="the merged model")
        console.print(f"[green]merge verified[/] adapter-on-base vs merged: {verify.format_numbers(check)}", highlight=False)
        gap = None
        if trained is not None:
            gap = {**qlora_gap(trained, merged), "qlora_base": qlora_base}
            console.print(f"QLoRA: the export ({qlora_base} base) vs the model as trained (NF4 base + adapter): "
                          f"top-1 agreement {100 * gap['top1_agreement']:.1f}%, max |logit diff| {gap['max_abs_logit_diff']:.3g}",
                          highlight=False)
            if gap["top1_agreement"] < QLORA_GAP_WARNING and qlora_base == "original":
                console.print("[yellow]warning[/] the full-precision base changes the QLoRA model's next tokens; "
                              "--qlora-base dequantized reproduces the model as trained", highlight=False)
        return Source(
            model=model, tokenizer=tokenizer, name=source, kind="adapter", base_model=base_name or DEFAULT_MODEL,
            method=method, saved_dtype=_stored_dtype(base_source), weights_dir=weights_dir, run_config=run_config,
            prompts=prompts, reference_logits=reference, merge_check=check, prompt_format=prompt_format,
            base_logits=base_logits, qlora_gap=gap,
        )
    model_source = str(weights_dir) if weights_dir is not None else resolve_model_source(source)
    tokenizer = load_tokenizer(model_source, trust_remote_code=trust_remote_code)
    prompt_format = _drop_untrained_template(tokenizer, weights_dir)
    with status(f"Loading {source} in fp32"):
        model = load_base_model(model_source, ModelLoading(trust_remote_code=trust_remote_code, device="cpu"))
        model.eval()
    prompts = verify.verification_prompts(tokenizer, run_config)
    reference = verify.all_logits(verify.torch_logits_fn(model), prompts)
    return Source(
        model=model, tokenizer=tokenizer, name=source, kind="model", saved_dtype=_stored_dtype(model_source),
        weights_dir=weights_dir, run_config=run_config, prompts=prompts, reference_logits=reference,
        prompt_format=prompt_format,
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
            base = ("dequant(NF4(W)), the weights it was trained against" if (source.qlora_gap or {}).get("qlora_base") == "dequantized"
                    else "the unquantized base (fp32)")
            info["note"] = f"QLoRA adapter merged into {base}, not into 4-bit weights"
            info["qlora_gap"] = source.qlora_gap
    if source.merge_check is not None:
        info["merge_verification"] = source.merge_check
    return info
