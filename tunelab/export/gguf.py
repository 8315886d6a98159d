"""GGUF (llama.cpp, Ollama, LM Studio): written with the `gguf` package, read back by transformers.

Follows llama.cpp's `convert_hf_to_gguf.py` for the Llama family:

  * tensor names from gguf's own maps (`get_tensor_name_map`), so `model.layers.0.self_attn.q_proj`
    becomes `blk.0.attn_q`; a tied output head is not written (llama.cpp reuses token_embd);
  * Llama / Mistral q and k projections are permuted from Hugging Face's rotate-half rotary layout
    to GGML's interleaved one (`permute_qk`); Qwen2 keeps its layout and its attention biases;
  * 1-D tensors (norms, biases) stay f32; 2-D ones take the chosen type: f32, f16, bf16, or a
    block type quantized by gguf's numpy kernels (q8_0, q5_0/q5_1, q4_0/q4_1); a row whose length
    is not a multiple of the block size falls back to f16, as llama.cpp does;
  * the tokenizer (byte-level BPE: vocabulary, token types, merges, special ids, BOS flag) and
    the chat template go in the metadata, with the end-of-turn token as llama.cpp's EOT.

Verification loads the file back with `transformers` (`gguf_file=`), which de-quantizes it
and undoes the q/k permutation, and compares logits and greedy answers with the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.merge import Source

# Hugging Face architecture -> (GGUF architecture, permute q/k for GGML's rotary layout)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
# --quantize value -> (GGML tensor type for 2-D weights, llama.cpp file type)
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
DEFAULT_TYPE = "q8_0"
# Bytes per weight, for the disk-space check (block types include their scales).
BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07, "q5_1": 0.75, "q5_0": 0.69, "q4_1": 0.63, "q4_0": 0.57}
FILE_NAME = "model-{type}.gguf"


def check_supported(model: torch.nn.Module, quantize: str) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k), or one clear error naming what is supported."""
    if quantize not in TYPES:
        raise TunelabError(f"--quantize {quantize!r} is not a GGUF type; choose one of {', '.join(TYPES)}")
    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in ARCHITECTURES:
        raise TunelabError(
            f"GGUF export does not support {arch}; supported: {', '.join(ARCHITECTURES)} "
            "(the Llama family: SmolLM2, Llama, Mistral, Qwen2)\n  fix: export --format hf, onnx or torchscript instead"
        )
    rope = dict(model.config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise TunelabError(
            f"GGUF export supports plain rotary embeddings; this model uses rope_type={rope['rope_type']!r}\n"
            "  fix: export --format hf, onnx or torchscript instead"
        )
    return ARCHITECTURES[arch]


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half -> GGML interleaved rotary layout (llama.cpp's `LlamaModel.permute`)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the text splitting before BPE (`tokenizer.ggml.pre`)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            for name in ("llama-bpe", "qwen2", "gpt-4o", "tekken"):
                if regex == GGUF_PRE_TOKENIZER_SPLITS[name]:
                    return name
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Byte-level BPE vocabulary, types, merges, special ids and chat template; returns what was written."""
    import gguf

    from tunelab.models import end_of_turn_ids

    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise TunelabError(
            f"GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2, Mistral Nemo); this one is "
            f"{model.get('type')} with a {decoder} decoder\n  fix: export --format hf, onnx or torchscript instead"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the model's embedding is larger than the vocabulary: padding rows
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer_name(data)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(int(token_id))
    ends = [i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_token_id]
    if ends:
        writer.add_eot_token_id(ends[0])
    # Whether the tokenizer puts BOS in front of plain text (the chat template writes its own).
    bos_added = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(bos_added))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return {"tokenizer": "gpt2 (byte-level BPE)", "pre_tokenizer": pre, "tokens": len(tokens), "merges": len(merges)}


def write_gguf(source: Source, path: Path, quantize: str, *, on_tensor=None) -> dict:
    """Write the merged model as one GGUF file of type `quantize`; returns metadata for export.json."""
    import gguf

    model, config = source.model, source.model.config
    arch, permute = check_supported(model, quantize)
    tensor_type = gguf.GGMLQuantizationType[TYPES[quantize][0]]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(Path(source.name).name or source.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[TYPES[quantize][1]])
    if tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_info = add_tokenizer(writer, source.tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = model.state_dict()
    tied = bool(config.tie_word_embeddings)
    types_written: dict[str, int] = {}
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: no GGUF name for tensor {hf_name} of {arch}")
        data = tensor.detach().float()
        if permute and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head)
        elif permute and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_kv)
        array = data.numpy()
        kind = _tensor_type(array, tensor_type)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        types_written[kind.name] = types_written.get(kind.name, 0) + 1
        if on_tensor is not None:
            on_tensor()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensor_types": types_written, **tokenizer_info}


def _tensor_type(array: np.ndarray, wanted):
    """1-D tensors stay f32; rows that do not split into whole blocks fall back to f16."""
    import gguf

    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def tensor_count(source: Source) -> int:
    """How many tensors `write_gguf` writes (a tied output head is not one of them)."""
    return len(source.model.state_dict()) - int(bool(source.model.config.tie_word_embeddings))


def verify_gguf(source: Source, path: Path, quantize: str, *, max_new_tokens: int = 16) -> dict:
    """Load the file back with transformers; compare logits, greedy answers and tokenization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import _quiet_transformers

    _quiet_transformers()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    loaded.eval()
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(verify.torch_logits_fn(loaded), source.prompts))
    what = f"the GGUF file ({path.name}) read back by transformers"
    if quantize in ("f32", "f16", "bf16"):
        verify.check_logits(numbers, dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[quantize], what=what)
    else:
        verify.check_agreement(numbers, quantization=quantize, what=what)
    reference_answers = verify.torch_greedy(source.model, source.tokenizer, source.prompts, max_new_tokens)
    answers = verify.torch_greedy(loaded, source.tokenizer, source.prompts, max_new_tokens)
    numbers.update(verify.greedy_agreement(reference_answers, answers))
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [source.tokenizer.decode(p) for p in source.prompts] + list(verify.DEFAULT_PROMPTS)
    numbers["tokenizer_roundtrip_identical"] = all(
        source.tokenizer(t, add_special_tokens=False)["input_ids"] == reloaded_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
    )
    numbers["chat_template_identical"] = reloaded_tokenizer.chat_template == source.tokenizer.chat_template
    return numbers


README = """# {name}: GGUF ({quantize})

`{file}` is `{source}` (merged) for llama.cpp and the runtimes built on it (tunelab {version}).

    llama-cli -m {file} -cnv                        # llama.cpp, uses the chat template inside the file
    llama-server -m {file} --port 8080              # OpenAI-compatible server on 127.0.0.1
    # Ollama: a Modelfile with the line `FROM ./{file}`, then `ollama create {name} -f Modelfile`
    # LM Studio: copy the file into its models folder

From Python (transformers de-quantizes it to fp32):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}", gguf_file="{file}")
tokenizer = AutoTokenizer.from_pretrained("{path}", gguf_file="{file}")
```

tunelab reads it too: `tunelab generate {path}/{file} --prompt "..."`.

Verified by loading it back with transformers: {numbers}. Details in export.json.
"""
