"""Run an ONNX export folder with ONNX Runtime, behind the small model interface tunelab uses.

`OnnxCausalLM` offers what `tunelab generate`, `eval` and `chat` call on a PyTorch model:
`model(input_ids, attention_mask, logits_to_keep=...)` returning `.logits`, and
`model.generate(input_ids, attention_mask, generation_config, streamer)` (greedy or
temperature / top-p sampling, several samples per prompt, stop tokens, left padding),
plus `config`, `generation_config` and `parameters()` for the bookkeeping. Generation
feeds the KV cache back, so each new token is one step over one position.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tunelab.errors import TunelabError

MODEL_FILE = "model.onnx"
# Cache inputs and outputs by layer, as onnxruntime-genai and optimum name them.
PAST_NAME = "past_key_values.{layer}.{kv}"
PRESENT_NAME = "present.{layer}.{kv}"


def is_onnx_export(path: Path) -> bool:
    """True for a folder written by `tunelab export --format onnx`."""
    info = path / "export.json"
    return path.is_dir() and info.is_file() and (path / MODEL_FILE).is_file() and json.loads(info.read_text()).get("format") == "onnx"


class OnnxCausalLM:
    """A causal LM exported by tunelab, run by ONNX Runtime on the CPU."""

    def __init__(self, directory: Path, *, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig, GenerationConfig

        self.directory = Path(directory)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.config = AutoConfig.from_pretrained(self.directory)
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.directory)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.layers = len(past_inputs) // 2
        self.kv_heads, self.head_dim = int(past_inputs[0].shape[1]), int(past_inputs[0].shape[3])
        info_path = self.directory / "export.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.parameter_count = int(info.get("parameters", 0))
        self.dtype = torch.int8 if info.get("quantization") in ("int8", "int4") else torch.float32
        self.device = torch.device("cpu")

    # --- the interface tunelab's generate / eval use ---------------------------------------

    def parameters(self):
        """One zero-stride tensor standing for the weights: its numel is the parameter count."""
        yield torch.zeros(1, dtype=self.dtype).expand(max(self.parameter_count, 1))

    def eval(self) -> OnnxCausalLM:
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep=None, **_) -> SimpleNamespace:
        """Logits of whole sequences (no cache), optionally only at `logits_to_keep` positions."""
        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        logits, _ = self.step(ids, mask, positions_from_mask(mask), self.empty_cache(ids.shape[0]))
        result = torch.from_numpy(logits)
        if isinstance(logits_to_keep, torch.Tensor):
            result = result[:, logits_to_keep.cpu()]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            result = result[:, -logits_to_keep:]
        return SimpleNamespace(logits=result)

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [positions, vocab] of one prompt (verification)."""
        return self(torch.tensor([ids])).logits[0]

    # --- the graph ---------------------------------------------------------------------------

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.layers)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run of the graph: new positions after `past`; returns logits and the grown cache."""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for layer in range(self.layers):
            feed[PAST_NAME.format(layer=layer, kv="key")] = past[2 * layer]
            feed[PAST_NAME.format(layer=layer, kv="value")] = past[2 * layer + 1]
        outputs = self.session.run(None, feed)
        return outputs[0], outputs[1:]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, generation_config=None,
                 streamer=None, **_) -> torch.Tensor:
        """Prompt ids followed by the generated ids, [batch * samples, prompt + new] (padded after a stop)."""
        config = generation_config or self.generation_config
        samples = config.num_return_sequences or 1
        ids = input_ids.cpu().numpy().astype(np.int64).repeat(samples, axis=0)
        mask = (np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64).repeat(samples, axis=0))
        stop = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        stop = np.array([s for s in stop if s is not None], dtype=np.int64)
        pad = config.pad_token_id if config.pad_token_id is not None else (stop[0] if len(stop) else 0)
        positions = positions_from_mask(mask)
        past = self.empty_cache(ids.shape[0])
        done = np.zeros(ids.shape[0], dtype=bool)
        generated = []
        step_ids = ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for _ in range(config.max_new_tokens):
            logits, past = self.step(step_ids, mask, positions, past)
            token = self.pick(logits[:, -1, :], config)
            token = np.where(done, pad, token)
            generated.append(token)
            if streamer is not None:
                streamer.put(torch.from_numpy(token))
            done |= np.isin(token, stop)
            if done.all():
                break
            step_ids = token[:, None]
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        new = np.stack(generated, axis=1) if generated else np.zeros((ids.shape[0], 0), dtype=np.int64)
        return torch.from_numpy(np.concatenate([ids, new], axis=1))

    @staticmethod
    def pick(logits: np.ndarray, config) -> np.ndarray:
        """Next token per row: argmax, or a sample at `temperature` from the top-p nucleus."""
        if not config.do_sample:
            return logits.argmax(axis=-1).astype(np.int64)
        scores = torch.from_numpy(logits).float() / max(config.temperature or 1.0, 1e-6)
        probs = torch.softmax(scores, dim=-1)
        top_p = config.top_p if config.top_p is not None else 1.0
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the token that crosses top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1)[:, 0].numpy().astype(np.int64)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids that skip padding (left or right): 0 at each row's first real token."""
    return np.clip(mask.cumsum(axis=1) - 1, 0, None).astype(np.int64)


def load_onnx_model(directory: Path) -> OnnxCausalLM:
    """An ONNX export folder's model on ONNX Runtime (`models.load_for_inference` adds its tokenizer)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise TunelabError("running an ONNX export needs ONNX Runtime\n  fix: pip install onnxruntime") from None
    return OnnxCausalLM(directory)
