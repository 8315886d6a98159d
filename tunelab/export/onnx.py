"""ONNX: `torch.onnx.export(dynamo=True)` of the merged model with KV-cache inputs and outputs.

The graph takes `input_ids`, `attention_mask` (past + new positions), `position_ids` and one
`past_key_values.N.key` / `.value` per layer ([batch, kv_heads, past, head_dim]; past may be 0),
and returns `logits` and `present.N.key` / `present.N.value`: the names onnxruntime-genai and
optimum use. Batch, sequence and past lengths are dynamic, so one graph serves the prompt
(past = 0) and every later token (one new position per step). `genai_config.json` beside it
lets `onnxruntime_genai.Model(folder)` run it; `tunelab.export.onnx_runtime` runs it too.

`--quantize int8` / `int4` quantize the verified fp32 graph's weights in blocks of 32 (ONNX
Runtime's MatMulNBits, a com.microsoft operator: such files run in ONNX Runtime only; int8
compute, accuracy level 4; the embedding stays fp32).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.merge import Source
from tunelab.export.onnx_runtime import MODEL_FILE, PAST_NAME, PRESENT_NAME

GENAI_CONFIG_FILE = "genai_config.json"
QUANTIZATIONS = ("int8", "int4")
# Above this many parameter bytes the graph's weights go to a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000
OPSET = 18
WEIGHT_BLOCK = 32  # weights per scale (as GGUF q8_0 / q4_0)


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
    return ["input_ids", "attention_mask", "position_ids"] + [PAST_NAME.format(layer=i, kv=kv) for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [PRESENT_NAME.format(layer=i, kv=kv) for i in range(layers) for kv in ("key", "value")]


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


def quantize_weights(fp32_path: Path, out_path: Path, bits: int) -> dict:
    """Weight-only int8 / int4 of every MatMul with constant weights, in blocks of 32 (ONNX Runtime's MatMulNBits).

    Each block of 32 weights along the input dimension gets its own scale (like GGUF q8_0 / q4_0);
    the kernels quantize activations per block too. ONNX Runtime's dynamic quantization (`quantize_dynamic`,
    which quantizes activations per tensor too) kept only 44-53% of SmolLM2-135M's next-token
    argmaxes, per channel or not, because of its activation outliers; int8 here keeps 99.6%.
    int4 is the onnxruntime-genai standard (its model builder's `-p int4`: block 32, accuracy level 4).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    # accuracy_level 4: the CPU kernel also quantizes activations to int8, per block of 32 (outliers stay
    # local): measured 98.8% top-1 and 1.8x fp32's speed on SmolLM2 for int8, vs 99.6% and 0.6x at level 0.
    config = DefaultWeightOnlyQuantConfig(block_size=WEIGHT_BLOCK, is_symmetric=True, bits=bits, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(str(fp32_path), algo_config=config)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantizer.process()
        external = fp32_path.with_name(fp32_path.name + ".data").exists()
        quantizer.model.save_model_to_file(str(out_path), external)
    return {"method": "onnxruntime MatMulNBits", "bits": bits, "block_size": WEIGHT_BLOCK, "symmetric": True,
            "accuracy_level": 4}


def write_genai_config(source: Source, directory: Path) -> dict:
    """genai_config.json: what onnxruntime-genai needs to open the folder (graph I/O names, cache shape, ids)."""
    from tunelab.models import end_of_turn_ids

    config, tokenizer = source.model.config, source.tokenizer
    layers, kv_heads, head_dim = cache_shape(config)
    genai = {
        "model": {
            "bos_token_id": tokenizer.bos_token_id,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": PAST_NAME.format(layer="%d", kv="key"),
                           "past_value_names": PAST_NAME.format(layer="%d", kv="value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_NAME.format(layer="%d", kv="key"),
                            "present_value_names": PRESENT_NAME.format(layer="%d", kv="value")},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": end_of_turn_ids(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        # Greedy by default, as `tunelab generate`; the cache grows by concatenation (no shared buffer:
        # the graph has plain attention, not GroupQueryAttention).
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (directory / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=4) + "\n")
    return genai


def genai_greedy(directory: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers generated by onnxruntime-genai from the folder (its own generator, cache and stop ids)."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    answers = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        answers.append(list(generator.get_sequence(0))[len(ids):])
        del generator
    return answers


def verify_onnx(source: Source, directory: Path, *, quantization: str | None, max_new_tokens: int = 16) -> dict:
    """Run the exported graph with ONNX Runtime (logits, no cache; greedy answers with the cache) and
    with onnxruntime-genai (greedy answers from the folder as its users load it)."""
    from tunelab.export.onnx_runtime import OnnxCausalLM

    runtime = OnnxCausalLM(directory)
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(runtime.prompt_logits, source.prompts))
    what = f"the ONNX model ({MODEL_FILE}) run by ONNX Runtime"
    if quantization is None:
        verify.check_logits(numbers, dtype="float32", what=what)
    else:
        verify.check_agreement(numbers, quantization=quantization, what=what)
    # Greedy answers run the KV-cache path: prompt once, then one position per step.
    reference_answers = verify.reference_greedy(source, max_new_tokens)
    answers = verify.torch_greedy(runtime, source.tokenizer, source.prompts, max_new_tokens)
    numbers.update(verify.greedy_agreement(reference_answers, answers))
    del runtime
    genai = verify.greedy_agreement(reference_answers, genai_greedy(directory, source.prompts, max_new_tokens))
    numbers["onnxruntime_genai"] = {"version": _genai_version(), **genai}
    if quantization is None:
        for runner, share in (("ONNX Runtime", numbers["greedy_token_agreement"]), ("onnxruntime-genai", genai["greedy_token_agreement"])):
            if share < verify.CACHE_AGREEMENT_TOLERANCE:
                raise verify.VerificationError(
                    f"{what}: greedy answers with {runner}'s KV cache differ from PyTorch's (token agreement "
                    f"{share:.3f}); nothing was written\n  fix: report this with the model's config.json"
                )
    return numbers


def _genai_version() -> str:
    import onnxruntime_genai as og

    return og.__version__


README = """# {name}: ONNX ({precision}, KV cache)

`model.onnx` is `{source}` (merged) exported with `torch.onnx.export(dynamo=True)` (opset {opset}) by tunelab {version}.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, past + seq], `position_ids` [batch, seq], and per layer
`past_key_values.N.key` / `.value` [batch, {kv_heads}, past, {head_dim}] (past may be 0). Outputs: `logits` [batch, seq, vocab]
and `present.N.key` / `present.N.value` (feed them back as `past_key_values.*` with the next token).{quantized_note}

With onnxruntime-genai (`genai_config.json` is in this folder):

```python
import onnxruntime_genai as og

model = og.Model("{path}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(tokenizer.apply_chat_template('[{{"role": "user", "content": "Hi"}}]', add_generation_prompt=True)))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

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
feed.update({{f"past_key_values.{{i}}.{{kv}}": empty for i in range({layers}) for kv in ("key", "value")}})
logits = session.run(["logits"], feed)[0]
```

Verified with ONNX Runtime against PyTorch: {numbers}. Details in export.json.
"""
