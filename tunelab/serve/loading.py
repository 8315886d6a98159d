"""From `tunelab serve SOURCE --adapter NAME=RUN ...` to the models the API serves.

SOURCE alone is loaded as `tunelab generate` loads it (an adapter run folded into its base
for speed). With adapters, the base is loaded ONCE and every run's LoRA adapter is attached to
it by name (peft's multi-adapter model); each served model id gets its own generation engine
(continuous batching within the id) over an `AdapterView`, which switches the active adapter
under a lock for each forward pass. So N adapters cost one base model of memory plus N small
adapters, and the engines take turns step by step instead of serving requests one at a time.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass
class ServedModel:
    """One id of `/v1/models`: its tokenizer (the run's own chat template), engine and limits."""

    id: str
    parent: str | None  # the base model's id for an adapter, None for the base
    tokenizer: Any
    engine: Any  # tunelab.engine.Engine
    chat_template: bool  # False: the run was trained on plain text; chat messages are joined as text
    context_tokens: int
    source: str
    created: int


def parse_adapter(option: str) -> tuple[str, str]:
    """`NAME=RUN` of --adapter, with NAME a valid model id."""
    name, sep, run = option.partition("=")
    if not sep or not run:
        raise TunelabError(f"--adapter {option!r}: expected NAME=RUN, e.g. --adapter support=runs/support")
    if not ADAPTER_NAME.match(name):
        raise TunelabError(
            f"--adapter {option!r}: the name {name!r} must start with a letter or digit and hold only "
            "letters, digits and . _ : - (at most 64 characters)"
        )
    return name, run


def model_id(source: str | None) -> str:
    """The id a source is served under: a run's folder name, a hub id as given, the bundled model's name."""
    from tunelab.models import BUNDLED_NAME, DEFAULT_MODEL

    if source in (None, DEFAULT_MODEL):
        return BUNDLED_NAME
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.name == "final":  # runs/NAME/final -> NAME
            path = path.parent
        elif path.parent.name == "checkpoints":  # runs/NAME/checkpoints/step-N -> NAME-step-N
            return f"{path.parent.parent.name}-{path.name}"
        return path.stem if path.suffix == ".gguf" else path.name
    return source


def load_models(
    source: str,
    adapters: list[tuple[str, str]],
    *,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_size: int = 8,
) -> list[ServedModel]:
    """Load SOURCE (and the adapters over it) and start one engine per served model id."""
    from tunelab.generate import load_for_generation

    names = [name for name, _ in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TunelabError(f"--adapter: the name {duplicates[0]!r} is given twice\n  fix: give each adapter its own name")
    adapter_dirs = [(name, adapter_weights(run, f"--adapter {name}={run}")) for name, run in adapters]
    source_dir = _weights_dir(source)
    if not adapters or source_dir is None or not (source_dir / "adapter_config.json").is_file():
        base_source = source
    else:  # SOURCE is itself an adapter run: serve its base, and SOURCE as one more adapter
        base_source = adapter_base(source_dir)
        adapter_dirs.insert(0, (model_id(source), source_dir))
    base_id = model_id(base_source)
    for name, _ in adapter_dirs:
        if name == base_id:
            raise TunelabError(f"--adapter {name}=...: the base model is served as {name!r} already\n  fix: pick another name")

    model, tokenizer = load_for_generation(base_source, dtype=dtype, device=device)
    if not isinstance(model, torch.nn.Module):
        raise TunelabError(f"'{source}' is not a PyTorch model (an ONNX export?): tunelab serve needs the run or model it came from")
    if not adapter_dirs:
        return [served(base_id, None, model, tokenizer, base_source, max_batch_size)]
    return attach_adapters(model, tokenizer, base_id, base_source, adapter_dirs, max_batch_size)


def attach_adapters(model, tokenizer, base_id: str, base_source: str, adapter_dirs: list[tuple[str, Path]],
                    max_batch_size: int) -> list[ServedModel]:
    """Attach every adapter to the one base model and make an engine per id (the base's included)."""
    from peft import PeftModel

    from tunelab.models import resolve_model_source

    base_resolved = _same_model_key(resolve_model_source(base_source))
    peft_model = None
    tokenizers = {}
    for name, weights in adapter_dirs:
        wanted = adapter_base(weights)
        if _same_model_key(resolve_model_source(wanted)) != base_resolved:
            raise TunelabError(
                f"--adapter {name}: {weights} was trained on {wanted!r}, not on the served base {base_source!r}\n"
                f"  fix: serve it over its own base (tunelab serve {wanted} --adapter {name}=...), or alone"
            )
        tokenizers[name] = adapter_tokenizer(weights, tokenizer, model, name)
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, weights, adapter_name=name)
        else:
            peft_model.load_adapter(weights, adapter_name=name)
    peft_model.eval()
    shared = SharedAdapters(peft_model)
    models = [served(base_id, None, AdapterView(shared, None), tokenizer, base_source, max_batch_size)]
    for name, weights in adapter_dirs:
        models.append(served(name, base_id, AdapterView(shared, name), tokenizers[name], str(weights), max_batch_size))
    return models


def served(model_name: str, parent: str | None, model, tokenizer, source: str, max_batch_size: int) -> ServedModel:
    """A ServedModel with its engine started (stopping at EOS and the chat end-of-turn tokens)."""
    from tunelab.engine import Engine
    from tunelab.generate import context_limit, end_of_turn_ids, has_chat_template

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, stop_token_ids=end_of_turn_ids(tokenizer, model))
    engine.start()
    return ServedModel(
        id=model_name, parent=parent, tokenizer=tokenizer, engine=engine, chat_template=has_chat_template(tokenizer),
        context_tokens=context_limit(model, tokenizer), source=source, created=int(time.time()),
    )


def _weights_dir(source: str) -> Path | None:
    from tunelab.models import DEFAULT_MODEL, resolve_weights_dir

    return resolve_weights_dir(source) if source != DEFAULT_MODEL else None


def adapter_weights(run: str, where: str) -> Path:
    """The adapter folder of a run (its final/), a checkpoint or an adapter directory."""
    weights = _weights_dir(run) if Path(run).expanduser().exists() else None
    if weights is None:
        raise TunelabError(f"{where}: no run or adapter folder at {run}")
    if not (weights / "adapter_config.json").is_file():
        raise TunelabError(
            f"{where}: {weights} holds a full model, not a LoRA adapter\n"
            "  fix: serve a full model as SOURCE on its own server (adapters share one base)"
        )
    return weights


def adapter_base(weights: Path) -> str:
    """The base model an adapter was trained on, as the run named it."""
    from tunelab.models import RUN_META_FILE

    meta = weights / RUN_META_FILE
    if meta.is_file():
        return json.loads(meta.read_text())["base_model"]
    return json.loads((weights / "adapter_config.json").read_text())["base_model_name_or_path"]


def adapter_tokenizer(weights: Path, base_tokenizer, model, name: str):
    """The tokenizer saved with the run (its training chat template); plain-text runs lose the template."""
    from tunelab.models import load_tokenizer, trained_prompt_format

    if (weights / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(weights))
    else:
        import copy

        tokenizer = copy.deepcopy(base_tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise TunelabError(
            f"--adapter {name}: the run added tokens to the vocabulary ({len(tokenizer)} > "
            f"{model.get_input_embeddings().num_embeddings}), so it cannot share the base's embedding\n"
            f"  fix: serve it alone: tunelab serve {weights}"
        )
    if trained_prompt_format(weights) != "chat":
        tokenizer.chat_template = None
    return tokenizer


def _same_model_key(resolved: str) -> str:
    path = Path(resolved).expanduser()
    return str(path.resolve()) if path.exists() else resolved


class SharedAdapters:
    """The peft model holding every adapter, the lock its forward passes take, the active one."""

    def __init__(self, peft_model):
        self.model = peft_model
        self.lock = threading.Lock()
        self.active: str | None = peft_model.active_adapter


class AdapterView(torch.nn.Module):
    """The shared peft model as one adapter (or the bare base, `adapter` None) sees it.

    Each forward pass takes the lock, switches the active adapter if another one ran last,
    and runs. The engine of each id holds its own KV cache; only the weights are shared.
    """

    def __init__(self, shared: SharedAdapters, adapter: str | None):
        super().__init__()
        self.shared = shared
        self.peft = shared.model  # a submodule, so parameters() and the device are the model's
        self.adapter = adapter

    @property
    def config(self):
        return self.peft.get_base_model().config

    @property
    def generation_config(self):
        return self.peft.get_base_model().generation_config

    @property
    def device(self) -> torch.device:
        return self.peft.get_base_model().device

    @property
    def dtype(self) -> torch.dtype:
        return self.peft.get_base_model().dtype

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.peft.get_input_embeddings()

    def forward(self, *args, **kwargs):
        with self.shared.lock:
            if self.adapter is None:
                with self.peft.disable_adapter():
                    return self.peft(*args, **kwargs)
            if self.shared.active != self.adapter:
                self.peft.set_adapter(self.adapter)
                self.shared.active = self.adapter
            return self.peft(*args, **kwargs)
