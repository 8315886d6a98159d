"""ONNX: `torch.onnx.export(dynamo=True)` of the merged model with KV-cache inputs and outputs.

The graph takes `input_ids`, `attention_mask` (past + new positions), `position_ids` and one
`past.N.key` / `past.N.value` per layer ([batch, kv_heads, past, head_dim]; past may be 0),
and returns `logits` and `present.N.key` / `present.N.value`. Batch, sequence and past
lengths are dynamic, so one graph serves the prompt (past = 0) and every later token (one
new position per step): generation costs one token per step. `tunelab.export.onnx_runtime`
runs it.

`--quantize int8` quantizes the verified fp32 graph's weights to int8 in blocks of 32
(ONNX Runtime's MatMulNBits, int8 compute; the embedding stays fp32).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.merge import Source

MODEL_FILE = "model.onnx"
QUANTIZATIONS = ("int8",)
# Above this many parameter bytes the graph's weights go to a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000
OPSET = 18
INT8_BLOCK = 32  # weights per int8 scale (as GGUF q8_0)


class CausalLMWithCache(torch.nn.Module):
    """The model as a function of flat tensors: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's KV cache."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_onnx(source: Source, path: Path) -> dict:
    """Export the fp32 model with KV cache to `path` (+ `path.data` for large models)."""
    model = source.model
    if model.dtype != torch.float32:
        raise TunelabError("ONNX export needs the fp32 model")  # load_source always gives fp32
    layers, kv_heads, head_dim = cache_shape(model.config)
    wrapper = CausalLMWithCache(model).eval()
    # Example inputs: 2 sequences, 3 new positions after 2 cached ones (every length differs,
    # so no dimension is specialised to a constant).
    batch, new, past_len = 2, 3, 2
    ids = torch.randint(0, model.config.vocab_size, (batch, new))
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new).expand(batch, new)
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers))
    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq"), "past": torch.export.Dim("past")}
    dynamic_shapes = {
        "input_ids": {0: dims["batch"], 1: dims["seq"]},
        "attention_mask": {0: dims["batch"], 1: torch.export.Dim("total")},
        "position_ids": {0: dims["batch"], 1: dims["seq"]},
        "past": tuple({0: dims["batch"], 2: dims["past"]} for _ in range(2 * layers)),
    }
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = parameter_bytes > EXTERNAL_DATA_BYTES
    chatter = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (ids, mask, positions, *past), str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=input_names(layers), output_names=output_names(layers), opset_version=OPSET,
                optimize=True, external_data=external,
            )
    except Exception as err:  # an export failure is a tunelab/model limitation, say which model
        raise TunelabError(
            f"ONNX export of {type(model).__name__} failed: {type(err).__name__}: {str(err).splitlines()[0]}\n"
            "  fix: export --format hf or gguf instead, or report this with the model's config.json"
        ) from err
    return {"opset": OPSET, "kv_cache": True, "external_data": external, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


def quantize_int8(fp32_path: Path, int8_path: Path) -> dict:
    """Weight-only int8 of every MatMul with constant weights, in blocks of 32 (ONNX Runtime's MatMulNBits).

    Each block of 32 weights along the input dimension gets its own scale (like GGUF q8_0);
    the int8 kernels quantize activations per block too. ONNX Runtime's dynamic quantization (`quantize_dynamic`, which
    quantizes activations per tensor too) kept only 44-53% of SmolLM2-135M's next-token
    argmaxes, per channel or not, because of its activation outliers; this keeps 99.6%.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    # accuracy_level 4: the CPU kernel also quantizes activations to int8, per block of 32 (outliers stay
    # local): measured 98.8% top-1 and 1.8x fp32's speed on SmolLM2, vs 99.6% and 0.6x at level 0.
    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, bits=8, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(str(fp32_path), algo_config=config)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantizer.process()
        external = fp32_path.with_name(fp32_path.name + ".data").exists()
        quantizer.model.save_model_to_file(str(int8_path), external)
    return {"method": "onnxruntime MatMulNBits", "bits": 8, "block_size": INT8_BLOCK, "symmetric": True,
            "accuracy_level": 4}


def verify_onnx(source: Source, directory: Path, *, quantization: str | None, max_new_tokens: int = 16) -> dict:
    """Run the exported graph with ONNX Runtime: logits (no cache) and greedy answers (with cache)."""
    from tunelab.export.onnx_runtime import OnnxCausalLM

    runtime = OnnxCausalLM(directory)
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(runtime.prompt_logits, source.prompts))
    what = f"the ONNX model ({MODEL_FILE}) run by ONNX Runtime"
    if quantization is None:
        verify.check_logits(numbers, dtype="float32", what=what)
    else:
        verify.check_agreement(numbers, quantization=quantization, what=what)
    # Greedy answers run the KV-cache path: prompt once, then one position per step.
    reference_answers = verify.torch_greedy(source.model, source.tokenizer, source.prompts, max_new_tokens)
    answers = verify.torch_greedy(runtime, source.tokenizer, source.prompts, max_new_tokens)
    numbers.update(verify.greedy_agreement(reference_answers, answers))
    if quantization is None and numbers["greedy_token_agreement"] < verify.CACHE_AGREEMENT_TOLERANCE:
        raise verify.VerificationError(
            f"{what}: greedy answers with the KV cache differ from PyTorch's (token agreement "
            f"{numbers['greedy_token_agreement']:.3f}); nothing was written\n  fix: report this with the model's config.json"
        )
    return numbers


README = """# {name}: ONNX ({precision}, KV cache)

`model.onnx` is `{source}` (merged) exported with `torch.onnx.export(dynamo=True)` (opset {opset}) by tunelab {version}.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, past + seq], `position_ids` [batch, seq], and per layer
`past.N.key` / `past.N.value` [batch, {kv_heads}, past, {head_dim}] (past may be 0). Outputs: `logits` [batch, seq, vocab] and
`present.N.key` / `present.N.value` (feed them back as `past.*` with the next token).

With tunelab (ONNX Runtime, the chat template in this folder, stops at end of turn):

    tunelab generate {path} --prompt "What is 12 * 7?"
    tunelab eval {path} --data test.jsonl

With ONNX Runtime directly:

```python
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer

session = ort.InferenceSession("{path}/model.onnx")
tokenizer = AutoTokenizer.from_pretrained("{path}")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True, return_dict=True, return_tensors="np")["input_ids"]
empty = np.zeros((1, {kv_heads}, 0, {head_dim}), np.float32)
feed = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}}
feed.update({{f"past.{{i}}.{{kv}}": empty for i in range({layers}) for kv in ("key", "value")}})
logits = session.run(["logits"], feed)[0]
```

Verified with ONNX Runtime against PyTorch: {numbers}. Details in export.json.
"""
