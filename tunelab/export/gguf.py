"""GGUF (llama.cpp, Ollama, LM Studio): written with the `gguf` package, K-quants by llama.cpp, verified in llama.cpp.

Follows llama.cpp's `convert_hf_to_gguf.py` for the Llama family:

  * tensor names from gguf's own maps (`get_tensor_name_map`), so `model.layers.0.self_attn.q_proj`
    becomes `blk.0.attn_q`; a tied output head is not written (llama.cpp reuses token_embd);
  * Llama / Mistral q and k projections (weights and biases) are permuted from Hugging Face's
    rotate-half rotary layout to GGML's interleaved one (`permute_qk`); Qwen2 / Qwen3 keep theirs;
  * Llama 3.1 / 3.2 rope scaling becomes the `rope_freqs` tensor, as convert writes it;
  * `attention.key_length` / `value_length` are the config's head_dim (Mistral-Nemo-like shapes);
  * 1-D tensors (norms, biases) stay f32; 2-D ones take the chosen type: f32, f16, bf16 or q8_0
    by gguf's numpy kernels (a row that does not split into whole blocks falls back to f16);
  * K-quants (q6_k, q5_k_m, q4_k_m) and the legacy q5_0 / q4_0 are made from the f16 file by
    llama.cpp's own quantizer (`llama_model_quantize`, llama-cpp-python): its tensor-type policy
    (output / tied embedding at higher precision, fallbacks for short rows) is llama.cpp's;
  * the tokenizer (byte-level BPE: vocabulary, token types, merges, special ids, BOS flag) and
    the chat template go in the metadata; EOT only when the template's end-of-turn marker is
    not already EOS. An unknown pre-tokenizer is refused (llama.cpp's "default" splits differently).

Verification runs llama.cpp itself (`tunelab.export.llamacpp`): the file's tokenization of the
verification prompts must equal the Hugging Face tokenizer's, its logits and top-1 must match
the source's, its greedy answers are compared with PyTorch's, and llama.cpp's perplexity on a
text is measured beside the source's. Where llama-cpp-python is not installed, transformers'
GGUF reader is the (labelled) fallback. A `Modelfile` for Ollama is written beside the file.
"""

from __future__ import annotations

import json
import math
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
    "Qwen3ForCausalLM": ("qwen3", False),
}
# Types gguf-py writes itself: --quantize value -> (GGML tensor type for 2-D weights, llama.cpp file type)
WRITTEN_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
# Types llama.cpp's quantizer makes from the f16 file: --quantize value -> llama.cpp's name (LLAMA_FTYPE_MOSTLY_*).
# q5_0 / q4_0 are legacy block types (kept for old runtimes; the K-quants are smaller at equal quality).
QUANTIZED_TYPES = {"q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q5_0": "Q5_0", "q4_0": "Q4_0"}
LEGACY_TYPES = ("q5_0", "q4_0")
TYPES = (*WRITTEN_TYPES, *QUANTIZED_TYPES)
# Bytes per weight, for the disk-space check (block types include their scales; K-quant mixes on average).
BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72, "q4_k_m": 0.62,
                    "q5_0": 0.69, "q4_0": 0.57}
# Where `--quantize` needs llama.cpp's quantizer, the f16 intermediate is written first (deleted after).
INTERMEDIATE_BYTES_PER_WEIGHT = 2


def file_name(name: str, quantize: str) -> str:
    """The hub's naming: `NAME-Q4_K_M.gguf`, `NAME-F16.gguf`."""
    return f"{name}-{quantize.upper()}.gguf"


def needs_llama_cpp(quantize: str) -> bool:
    return quantize in QUANTIZED_TYPES


def check_supported(model: torch.nn.Module, quantize: str) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k), or one clear error naming what is supported."""
    if quantize not in TYPES:
        raise TunelabError(f"--quantize {quantize!r} is not a GGUF type; choose one of {', '.join(TYPES)}")
    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in ARCHITECTURES:
        raise TunelabError(
            f"GGUF export does not support {arch}; supported: {', '.join(ARCHITECTURES)} "
            "(the Llama family: SmolLM2, Llama, Mistral, Qwen2, Qwen3)\n  fix: export --format hf, onnx or torchscript instead"
        )
    rope = dict(model.config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise TunelabError(
            f"GGUF export supports plain and Llama 3 rotary embeddings; this model uses rope_type={rope['rope_type']!r}\n"
            "  fix: export --format hf, onnx or torchscript instead"
        )
    return ARCHITECTURES[arch]


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1 / 3.2 frequency scaling as the `rope_freqs` tensor (convert_hf_to_gguf's formula)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


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
    raise TunelabError(
        f"GGUF export: this tokenizer's pre-tokenizer ({' + '.join(str(k) for k in kinds)}) is not one llama.cpp knows "
        "(llama-bpe, qwen2, gpt-4o, tekken, smollm, gpt-2); written as 'default' it would split text differently in "
        "llama.cpp\n  fix: export --format hf, onnx or torchscript instead"
    )


# End-of-turn markers of the chat templates tunelab knows (EOS itself is not one of them: it is EOS).
CHAT_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def chat_end_token(tokenizer) -> int | None:
    """The id of the chat template's end-of-turn marker when it exists and is not already EOS."""
    template = tokenizer.chat_template
    text = json.dumps(template) if isinstance(template, dict) else (template or "")
    vocab = tokenizer.get_vocab()
    for marker in CHAT_END_MARKERS:
        if marker in text and marker in vocab and vocab[marker] != tokenizer.eos_token_id:
            return vocab[marker]
    return None


def chat_template_value(template) -> str | list[dict[str, str]] | None:
    """`tokenizer.chat_template` as gguf's writer takes it: a string, or named templates as a list."""
    if isinstance(template, dict):  # transformers 5: a model with named templates ("default", "tool_use", ...)
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Byte-level BPE vocabulary, types, merges, special ids and chat template; returns what was written."""
    import gguf

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
    eot = chat_end_token(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    # Whether the tokenizer puts BOS in front of plain text (the chat template writes its own).
    bos_added = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(bos_added))
    template = chat_template_value(tokenizer.chat_template)
    if template is not None:  # a run trained on plain text has none: it was never prompted through one
        writer.add_chat_template(template)
    return {"tokenizer": "gpt2 (byte-level BPE)", "pre_tokenizer": pre, "tokens": len(tokens), "merges": len(merges),
            "eot_token_id": eot, "chat_template": template is not None}


def write_gguf(source: Source, path: Path, quantize: str, *, on_tensor=None) -> dict:
    """Write the merged model as one GGUF file of a type gguf-py writes (f32, f16, bf16, q8_0).

    Tensors go through a temporary file (`use_temp_file`), not all held in memory until the end.
    Returns metadata for export.json.
    """
    import gguf

    model, config = source.model, source.model.config
    arch, permute = check_supported(model, quantize)
    if quantize not in WRITTEN_TYPES:
        raise TunelabError(f"write_gguf writes {', '.join(WRITTEN_TYPES)}; {quantize} is made by llama.cpp from f16")
    tensor_type = gguf.GGMLQuantizationType[WRITTEN_TYPES[quantize][0]]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(config.rope_parameters or {})
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
    writer.add_name(Path(source.name).name or source.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    # llama.cpp otherwise assumes hidden_size / heads, and refuses a model whose head_dim differs.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[WRITTEN_TYPES[quantize][1]])
    if tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_info = add_tokenizer(writer, source.tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    types_written: dict[str, int] = {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, head_dim))
        types_written["F32"] = 1
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: no GGUF name for tensor {hf_name} of {arch}")
        data = tensor.detach().float()
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
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


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (read from its header)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def tensor_count(source: Source) -> int:
    """How many tensors `write_gguf` writes (a tied output head is not one of them)."""
    return len(source.model.state_dict()) - int(bool(source.model.config.tie_word_embeddings))


def verify_gguf(source: Source, path: Path, quantize: str, *, max_new_tokens: int = 16) -> dict:
    """Verify the file in llama.cpp (or, without llama-cpp-python, with transformers' reader: labelled)."""
    from tunelab.export import llamacpp

    if llamacpp.version() is None:
        numbers = verify_with_transformers(source, path, quantize, max_new_tokens=max_new_tokens)
        numbers["verified_by"] = "transformers' GGUF reader (not llama.cpp: llama-cpp-python is not installed)"
        return numbers
    return verify_in_llama_cpp(source, path, quantize, max_new_tokens=max_new_tokens)


def _gate(numbers: dict, quantize: str, what: str) -> None:
    """Logits within the dtype's tolerance (unquantized) or top-1 agreement above the type's floor."""
    if quantize in ("f32", "f16", "bf16"):
        verify.check_logits(numbers, dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[quantize], what=what)
    else:
        verify.check_agreement(numbers, quantization=quantize, what=what)


def _tokenizer_texts(source: Source) -> list[str]:
    """Texts whose tokenization must agree: the rendered verification prompts (special tokens included) and plain text."""
    return [source.tokenizer.decode(p) for p in source.prompts] + list(verify.DEFAULT_PROMPTS)


def source_perplexity(source: Source) -> tuple[list[int], dict]:
    """(token ids, PyTorch perplexity of the source) on the perplexity text, computed once per source."""
    if "perplexity" not in source.cache:
        ids = source.tokenizer(verify.perplexity_text(), add_special_tokens=False)["input_ids"]
        source.cache["perplexity"] = (ids, verify.perplexity(verify.torch_logits_fn(source.model), ids, bos=_bos(source.tokenizer)))
    return source.cache["perplexity"]


def _bos(tokenizer) -> int | None:
    """BOS when the tokenizer puts one before plain text (llama-perplexity does the same)."""
    ids = tokenizer("a")["input_ids"]
    return ids[0] if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else None


def verify_in_llama_cpp(source: Source, path: Path, quantize: str, *, max_new_tokens: int = 16) -> dict:
    """Load the file in llama.cpp; gate on its tokenization, logits / top-1, greedy answers and perplexity."""
    from tunelab.export import llamacpp
    from tunelab.generate import end_of_turn_ids

    what = f"{path.name} run by llama.cpp"
    ppl_ids, source_ppl = source_perplexity(source)
    longest = max([len(p) for p in source.prompts] + [0]) + max_new_tokens
    model = llamacpp.LlamaCppModel(path, n_ctx=max(source_ppl["context"], longest + 8), f32_cache=quantize == "f32")
    try:
        mismatched = [t for t in _tokenizer_texts(source)
                      if model.tokenize(t) != source.tokenizer(t, add_special_tokens=False)["input_ids"]]
        if mismatched:
            raise verify.VerificationError(
                f"{what}: llama.cpp tokenizes {len(mismatched)} verification text(s) differently from the Hugging Face "
                f"tokenizer, e.g. {mismatched[0][:80]!r}; nothing was written\n  fix: report this with the tokenizer.json"
            )
        numbers = verify.compare_logits(source.reference_logits, verify.all_logits(model.logits, source.prompts))
        _gate(numbers, quantize, what)
        stop = set(end_of_turn_ids(source.tokenizer, source.model))
        answers = [model.greedy(p, max_new_tokens, stop) for p in source.prompts]
        numbers.update(verify.greedy_agreement(verify.reference_greedy(source, max_new_tokens), answers))
        if quantize == "f32" and numbers["greedy_token_agreement"] < verify.CACHE_AGREEMENT_TOLERANCE:
            raise verify.VerificationError(
                f"{what}: greedy answers with llama.cpp's KV cache differ from PyTorch's (token agreement "
                f"{numbers['greedy_token_agreement']:.3f}); nothing was written\n  fix: report this with the model's config.json"
            )
        artifact_ppl = verify.perplexity(model.logits, ppl_ids, bos=_bos(source.tokenizer))
    finally:
        model.close()
    ratio = artifact_ppl["perplexity"] / source_ppl["perplexity"]
    bound = verify.PERPLEXITY_TOLERANCE[quantize]
    numbers["perplexity"] = {"text": "tunelab's bundled word problems (verify.perplexity_text)", "context": source_ppl["context"],
                             "tokens_scored": source_ppl["tokens_scored"], "source": source_ppl["perplexity"],
                             "source_runtime": "PyTorch fp32", "artifact": artifact_ppl["perplexity"], "ratio": ratio,
                             "tolerance": bound}
    if ratio > bound:
        raise verify.VerificationError(
            f"{what}: {quantize} raises perplexity by {100 * (ratio - 1):.1f}% (allowed {100 * (bound - 1):.0f}%); "
            "nothing was written\n  fix: use a wider type (q6_k, q8_0, f16)"
        )
    numbers["tokenizer_identical"] = True
    numbers["chat_template"] = _llama_cpp_chat_check(source)
    numbers["verified_by"] = llamacpp.version()
    return numbers


def _llama_cpp_chat_check(source: Source) -> dict:
    """Whether llama.cpp's built-in template detection (llama-cli without --jinja) renders the run's chat format."""
    from tunelab.export import llamacpp
    from tunelab.generate import user_messages

    template = source.tokenizer.chat_template
    if not template:
        return {"present": False}
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    messages = user_messages(verify.DEFAULT_PROMPTS[0])
    expected = source.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = llamacpp.builtin_chat_render(template, messages)
    return {"present": True, "llama_cpp_builtin_detected": rendered is not None,
            "llama_cpp_builtin_identical": rendered == expected,
            "note": "llama-server, llama-cpp-python and `llama-cli --jinja` run the template itself (Jinja)"}


def verify_with_transformers(source: Source, path: Path, quantize: str, *, max_new_tokens: int = 16) -> dict:
    """The fallback without llama.cpp: load the file back with transformers; compare logits, greedy answers, tokenization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import _quiet_transformers

    _quiet_transformers()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    loaded.eval()
    numbers = verify.compare_logits(source.reference_logits, verify.all_logits(verify.torch_logits_fn(loaded), source.prompts))
    _gate(numbers, quantize, f"the GGUF file ({path.name}) read back by transformers")
    answers = verify.torch_greedy(loaded, source.tokenizer, source.prompts, max_new_tokens)
    numbers.update(verify.greedy_agreement(verify.reference_greedy(source, max_new_tokens), answers))
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    numbers["tokenizer_identical"] = all(
        source.tokenizer(t, add_special_tokens=False)["input_ids"] == reloaded_tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in _tokenizer_texts(source)
    )
    numbers["chat_template_identical"] = reloaded_tokenizer.chat_template == source.tokenizer.chat_template
    return numbers


# ----------------------------------------------------------------------------- Ollama

# Go templates (Ollama's TEMPLATE) for the chat formats tunelab knows, keyed by a marker of the Jinja template.
OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                               '{{ end }}<|im_start|>assistant\n'),
    "llama3": ("<|start_header_id|>", '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                                      '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
    "alpaca": ("### Instruction:", '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
                                   '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
                                   '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{eos}\n\n'
                                   '{{ end }}{{ end }}### Response:\n'),
}


def render_ollama(family: str, messages: list[dict[str, str]], eos: str = "") -> str:
    """What Ollama renders with OLLAMA_TEMPLATES[family] (the same text, in Python): to check the Modelfile."""
    parts = []
    for m in messages:
        if family == "chatml":
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        elif family == "llama3":
            parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>")
        elif m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}{eos}\n\n")
    ending = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "alpaca": "### Response:\n"}[family]
    return "".join(parts) + ending


def modelfile(source: Source, gguf_file: str, name: str, system_prompt: str | None) -> tuple[str, dict]:
    """An Ollama Modelfile for the file: FROM, the run's chat format as TEMPLATE, its system prompt, stop tokens.

    The TEMPLATE is checked here: rendered (in Python, as Ollama's Go template would) for the verification
    prompts, it must give exactly the text the run's Jinja template gives, including a default system
    message the Jinja template adds (it becomes SYSTEM). Returns (text, what export.json records).
    """
    from tunelab.generate import user_messages

    tokenizer = source.tokenizer
    lines = [f"# Ollama: ollama create {name} -f Modelfile   (then: ollama run {name})", f"FROM ./{gguf_file}"]
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    info: dict = {"file": "Modelfile"}
    if not template:  # trained on plain text: the prompt is the text to continue
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        info.update(template="plain text (the run was trained without a chat template)", stop=[])
        return "\n".join(lines) + "\n", info
    family = next((f for f, (marker, _) in OLLAMA_TEMPLATES.items() if marker in template), None)
    eos = tokenizer.eos_token or ""
    checks = [user_messages(p, system_prompt) for p in verify.DEFAULT_PROMPTS[:3]]
    system = system_prompt
    identical = False
    if family is not None:
        expected = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in checks]
        bos = tokenizer.bos_token or ""
        if bos and bos not in OLLAMA_TEMPLATES[family][1]:  # a template-written BOS (Llama 3): llama.cpp adds it itself
            expected = [e[len(bos):] if e.startswith(bos) else e for e in expected]
        if system is None:  # a template that adds a default system message (SmolLM2's): Ollama's SYSTEM says it
            default = _default_system(tokenizer, family, eos)
            system = default
        rendered = [render_ollama(family, ([{"role": "system", "content": system}] if system and m[0]["role"] != "system" else []) + m, eos)
                    for m in checks]
        identical = rendered == expected
    if family is None or not identical:
        lines.append("# The run's chat template is not one tunelab can write as an Ollama TEMPLATE: Ollama will guess it")
        lines.append("# from tokenizer.chat_template in the GGUF (its auto-detection knows the common ones).")
        info.update(template=None, template_identical=False)
    else:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[family][1].replace("{eos}", eos)}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        info.update(template=family, template_identical=True, system=system)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in _stop_ids(source)]
    lines += [f"PARAMETER stop {token}" for token in stops]
    info["stop"] = stops
    return "\n".join(lines) + "\n", info


def _default_system(tokenizer, family: str, eos: str) -> str | None:
    """The system message a template adds on its own, found by rendering one user turn without one."""
    from tunelab.generate import user_messages

    messages = user_messages("x")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = render_ollama(family, messages, eos)
    if text == plain or not text.endswith(plain):
        return None
    prefix = text[: -len(plain)]
    start = {"chatml": "<|im_start|>system\n", "llama3": "<|start_header_id|>system<|end_header_id|>\n\n", "alpaca": ""}[family]
    end = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "alpaca": "\n\n"}[family]
    bos = tokenizer.bos_token or ""
    if bos and prefix.startswith(bos) and not prefix.startswith(start):  # Llama 3's <|begin_of_text|> (llama.cpp adds it)
        prefix = prefix[len(bos):]
    if prefix.startswith(start) and prefix.endswith(end):
        return prefix[len(start): len(prefix) - len(end)]
    return None


def _stop_ids(source: Source) -> list[int]:
    """End-of-turn tokens that are in the vocabulary: EOS and the chat template's end marker."""
    from tunelab.generate import end_of_turn_ids

    return list(end_of_turn_ids(source.tokenizer, source.model))


README = """# {name}: GGUF ({quantize_label})

`{file}` is `{source}` (merged) for llama.cpp and the runtimes built on it (tunelab {version}).

    llama-cli -m {file} --jinja -cnv                # llama.cpp chat, with the chat template inside the file
    llama-server -m {file} --port 8080              # OpenAI-compatible server on 127.0.0.1 (Jinja templates by default)
    ollama create {name} -f Modelfile               # Ollama: the Modelfile beside this file (template, stop tokens)
    # LM Studio: copy the file into its models folder

`llama-cli` without `--jinja` uses llama.cpp's built-in template detection: {chat_note}.
{quantized_note}
From Python with llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="{path}/{file}", n_ctx=2048)
print(llm.create_chat_completion([{{"role": "user", "content": "Hi"}}], temperature=0)["choices"][0]["message"]["content"])
```

tunelab reads it too: `tunelab generate {path}/{file} --prompt "..."`.

Verified by {verified_by}: {numbers}. Details in export.json.
"""
