"""TorchScript and torch.export: the merged model as a logits function (input_ids, attention_mask) -> logits.

`model.torchscript.pt` is a `torch.jit.trace` of that function (`torch.jit.load` reloads it
anywhere libtorch runs, C++ included). TorchScript is in maintenance upstream, so the same
function is also saved as `model.pt2` with `torch.export` (dynamic batch and sequence),
which is the one to prefer: it keeps the shapes symbolic instead of tracing one example.
Both are verified after reloading, at sequence lengths other than the traced one. Neither
carries a KV cache: each call recomputes the whole sequence (use ONNX or GGUF to generate).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.merge import Source

TRACED_FILE = "model.torchscript.pt"
EXPORTED_FILE = "model.pt2"


class LogitsModule(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, without a cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _example(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    return ids, torch.ones_like(ids)


def write_torchscript(source: Source, directory: Path) -> dict:
    """Trace and save the logits module; returns metadata for export.json."""
    module = LogitsModule(source.model).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python values
            traced = torch.jit.trace(module, _example(source.model), check_trace=False, strict=False)
    except Exception as err:
        raise TunelabError(f"TorchScript tracing of {type(source.model).__name__} failed: {type(err).__name__}: {str(err).splitlines()[0]}"
                           "\n  fix: export --format onnx or hf instead") from err
    traced.save(str(directory / TRACED_FILE))
    return {"file": TRACED_FILE, "method": "torch.jit.trace"}


def write_exported(source: Source, directory: Path) -> dict:
    """torch.export the logits module with dynamic batch and sequence, saved as .pt2."""
    module = LogitsModule(source.model).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, _example(source.model), dynamic_shapes=shapes)
    torch.export.save(program, str(directory / EXPORTED_FILE))
    return {"file": EXPORTED_FILE, "method": "torch.export"}


def _logits_fn(module) -> verify.LogitsFn:
    def run(ids: list[int]) -> torch.Tensor:
        tensor = torch.tensor([ids])
        with torch.inference_mode():
            return module(tensor, torch.ones_like(tensor))[0].float()

    return run


def verify_torchscript(source: Source, directory: Path) -> dict:
    """Reload with torch.jit.load and compare logits on the prompts (their lengths differ from the trace)."""
    loaded = torch.jit.load(str(directory / TRACED_FILE))
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(_logits_fn(loaded), source.prompts))
    verify.check_logits(numbers, dtype="float32", what=f"the TorchScript module ({TRACED_FILE})")
    return numbers


def verify_exported(source: Source, directory: Path) -> dict:
    """Reload with torch.export.load and compare logits."""
    loaded = torch.export.load(str(directory / EXPORTED_FILE)).module()
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(_logits_fn(loaded), source.prompts))
    verify.check_logits(numbers, dtype="float32", what=f"the torch.export program ({EXPORTED_FILE})")
    return numbers


README = """# {name}: TorchScript + torch.export (fp32 logits)

`{source}` (merged) as a function `(input_ids, attention_mask) -> logits` [batch, seq, vocab], tunelab {version}.
No KV cache: each call computes the whole sequence (for generation use the ONNX or GGUF export).

Prefer `model.pt2` (torch.export; TorchScript is in maintenance upstream):

```python
import torch
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
program = torch.export.load("{path}/model.pt2").module()
logits = program(ids, torch.ones_like(ids))
traced = torch.jit.load("{path}/model.torchscript.pt")   # also loadable from C++ (torch::jit::load)
logits = traced(ids, torch.ones_like(ids))
```

Verified after reloading: {numbers}. Details in export.json.
"""
