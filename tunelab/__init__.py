"""tunelab: fine-tune language models on your own data (LoRA, DoRA, QLoRA, full).

Public API:
    FineTuneConfig, FineTuner      configure, train, generate, save (tunelab.tuner)
    RunConfig, load_config         the typed run config (tunelab.config)
    train                          the training recipe: config -> run folder (tunelab.train)
    load_for_inference             load a run / checkpoint / model dir / hub id / ONNX export / default model
    merge_model, export_model      merge adapters; export verified hf / gguf / onnx / torchscript (tunelab.export)
    LLMFineTuner, save_model       the seed's names for FineTuner and FineTuner.save

Names are imported on first use, so `tunelab --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import os

# CPU tensors of 2 MB and more go on transparent huge pages (see tunelab/allocator.py).
# PyTorch reads this once, at its first CPU allocation, hence here, before torch loads.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# On AVX512-BF16 CPUs bitsandbytes tries to fetch a 4-bit kernel from the Hugging Face hub
# (the `kernels` package) and warns on every run when it cannot; its built-in kernel is used
# either way, so the warning only alarms.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_EXPORTS = {
    "FineTuneConfig": "tunelab.tuner",
    "FineTuner": "tunelab.tuner",
    "LLMFineTuner": "tunelab.tuner",
    "RunConfig": "tunelab.config",
    "load_config": "tunelab.config",
    "train": "tunelab.train",
    "load_for_inference": "tunelab.models",
    "save_model": "tunelab.tuner",
    "merge_model": "tunelab.export",
    "export_model": "tunelab.export",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
