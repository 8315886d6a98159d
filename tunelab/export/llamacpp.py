"""llama.cpp itself, through llama-cpp-python: K-quant quantizing and running GGUF files to verify them.

llama-cpp-python builds llama.cpp from source when installed (the `gguf` extra, in the default
`make` setup). Everything here is llama.cpp's own code: `llama_model_quantize` (the quantizer
behind `llama-quantize`, with its tensor-type policy), its tokenizer, its CPU kernels and its
KV cache. Where the package is missing, `version()` is None and GGUF verification falls back
to transformers' reader, saying so.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError


def version() -> str | None:
    """"llama.cpp (llama-cpp-python X.Y.Z)", or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


def _threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or max(1, min(8, os.cpu_count() or 1))


def quantize(f16_path: Path, out_path: Path, type_name: str) -> None:
    """llama.cpp's quantizer (`llama-quantize F16 OUT TYPE`): `type_name` is e.g. "Q4_K_M"."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = _threads()
    code = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), ctypes.byref(params))
    if code != 0 or not out_path.is_file():
        raise TunelabError(f"llama.cpp's quantizer failed ({type_name}, code {code}) on {f16_path.name}\n"
                           "  fix: export --quantize f16 or q8_0, and report this with the model's config.json")


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp: logits of token ids, greedy continuations, tokenization."""

    def __init__(self, path: Path, *, n_ctx: int = 512, f32_cache: bool = False):
        import llama_cpp

        self.path = Path(path)
        # llama.cpp keeps the KV cache in f16 by default (~1e-4 relative rounding); an f32 file is checked
        # with an f32 cache, so that its 1e-4 tolerance measures the file, not the cache.
        cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
        try:
            # n_batch = n_ctx: a whole prompt is one batch, so every position's logits come back.
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       logits_all=True, n_threads=_threads(), verbose=False, seed=0, **cache)
        except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
            raise TunelabError(f"llama.cpp cannot load {self.path.name}: {err}") from err
        self.n_ctx = n_ctx

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [positions, vocab] (fp32) of one sequence, computed by llama.cpp from an empty cache."""
        if len(ids) > self.n_ctx:
            raise TunelabError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop: set[int]) -> list[int]:
        """Greedy answer token ids (up to and including a stop token), llama.cpp's KV cache one token per step."""
        self.llm.reset()
        self.llm.eval(list(ids))
        answer: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            answer.append(token)
            if token in stop or self.llm.n_tokens >= self.n_ctx:
                break
            self.llm.eval([token])
        return answer

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of text, special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def close(self) -> None:
        self.llm.close()


def builtin_chat_render(template: str, messages: Sequence[dict[str, str]]) -> str | None:
    """The prompt llama.cpp's built-in template detection renders (`llama-cli` without --jinja), or None
    when llama.cpp does not recognise the template."""
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    size = 4096 + sum(len(m["content"]) for m in messages) * 2
    buffer = ctypes.create_string_buffer(size)
    written = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buffer, size)
    if written < 0:
        return None
    return buffer.raw[:written].decode("utf-8", errors="replace")
