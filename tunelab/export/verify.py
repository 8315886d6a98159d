"""Verification of exported models: the artifact must compute what the trained model computes.

Every export is checked on a small prompt set (the run's eval data when there is some,
else built-in prompts), rendered with the model's chat template as at inference:

  * logits: the artifact's logits for every prompt position against PyTorch's, as the
    largest absolute difference and that difference relative to the largest |logit|;
  * top-1 agreement: how often the artifact's most likely next token (teacher-forced,
    every position) is PyTorch's;
  * greedy answers: whole greedy generations compared token for token.

Unquantized exports must stay within `RELATIVE_TOLERANCE` for their dtype; quantized ones
(GGUF q8_0/q4, ONNX int8) within `AGREEMENT_TOLERANCE` top-1 agreement. Failing is an
error (`VerificationError`) and nothing is published.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tunelab.errors import TunelabError

# Built-in prompts: short, varied (arithmetic, facts, code, instructions).
DEFAULT_PROMPTS = (
    "What is 12 * 7? Answer with the number.",
    "Name the capital of France.",
    "Write a Python function that returns the square of x.",
    "Give two tips for staying focused while studying.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Translate 'good morning' into Spanish.",
)
# Largest |logit difference| / largest |logit| allowed, by the dtype the artifact computes in.
# fp32 only reorders float operations; 16-bit storage rounds every weight (~2^-8 for bf16).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# Least top-1 agreement (teacher-forced, every prompt position) for quantized artifacts.
AGREEMENT_TOLERANCE = {"q8_0": 0.9, "int8": 0.9, "q6_k": 0.85, "q5_k_m": 0.8, "q5_0": 0.8, "q4_k_m": 0.7, "q4_0": 0.6,
                       "int4": 0.6}
# Largest perplexity ratio artifact / source on the perplexity text (llama.cpp's numbers for the bundled
# SmolLM2-135M on GSM8K text, -c 256: q8_0 +0.3%, Q4_K_M +4.9%, Q4_0 +16%; the bounds leave room for other models).
PERPLEXITY_TOLERANCE = {"f32": 1.001, "f16": 1.01, "bf16": 1.02, "q8_0": 1.02, "q6_k": 1.04, "q5_k_m": 1.06,
                        "q5_0": 1.08, "q4_k_m": 1.12, "q4_0": 1.3}
# Verification prompts keep at most this many tokens (their end: the generation prompt), so that
# reference logits stay small (positions x vocabulary x 4 bytes) however long the run's eval data is.
MAX_PROMPT_TOKENS = 256

# Least share of matching greedy tokens for an fp32 artifact's own generation loop (the KV-cache
# path of ONNX): fp32 reorderings may flip a near-tie late in an answer, nothing more.
CACHE_AGREEMENT_TOLERANCE = 0.9


class VerificationError(TunelabError):
    """The artifact does not reproduce the model within tolerance; it was not published."""


def verification_prompts(tokenizer, run_config: Path | None = None, *, count: int = 6) -> list[list[int]]:
    """Token ids of the prompts to verify with: the run's eval data when readable, else built-ins.

    `run_config` is a run's config.yaml; its `data.eval` (a JSONL/text file of prompts) is
    used when it exists on this machine.
    """
    from tunelab.generate import encode_prompt, user_messages

    prompts = list(DEFAULT_PROMPTS)
    eval_file = _eval_data_file(run_config)
    if eval_file is not None:
        from tunelab.errors import DataError
        from tunelab.generate import read_prompts

        try:
            prompts = read_prompts(str(eval_file))[:count] + prompts
        except DataError:
            pass  # eval data in a format without a prompt field: the built-ins still verify
    return [encode_prompt(tokenizer, user_messages(p))[-MAX_PROMPT_TOKENS:] for p in prompts[:count]]


def perplexity_text() -> str:
    """The bundled text perplexity is measured on: tunelab's synthetic word problems with worked answers
    (the demo's domain), deterministic, about 2,000 tokens."""
    from tunelab.data.synthetic import reasoning_problems

    return "\n\n".join(f"Question: {p['question']}\nAnswer: {p['answer']}" for p in reasoning_problems(24, seed=0))


def perplexity(fn: LogitsFn, ids: Sequence[int], *, context: int = 256, chunks: int = 4, bos: int | None = None) -> dict:
    """Perplexity as llama.cpp's `llama-perplexity -c CONTEXT` computes it.

    The token ids are cut into chunks of `context` tokens (the first replaced by BOS when the
    model adds one); each chunk is one forward pass, and only its second half is scored, so every
    scored token sees at least context / 2 tokens before it.
    """
    total = count = 0
    used = 0
    for start in range(0, len(ids) - context + 1, context):
        if used == chunks:
            break
        chunk = list(ids[start:start + context])
        if bos is not None:
            chunk[0] = bos
        logits = fn(chunk).double()
        first = context // 2
        log_probs = torch.log_softmax(logits[first:-1], dim=-1)
        targets = torch.tensor(chunk[first + 1:])
        total -= float(log_probs.gather(1, targets[:, None]).sum())
        count += len(targets)
        used += 1
    if not count:
        raise TunelabError(f"the perplexity text has {len(ids)} tokens, fewer than one chunk of {context}")
    return {"perplexity": math.exp(total / count), "tokens_scored": count, "context": context, "chunks": used}


def _eval_data_file(run_config: Path | None) -> Path | None:
    if run_config is None or not run_config.is_file():
        return None
    import yaml

    try:
        data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
    except yaml.YAMLError:
        return None
    path = Path(str(data.get("eval") or ""))
    return path if data.get("eval") and path.is_file() and path.suffix in (".jsonl", ".txt") else None


LogitsFn = Callable[[list[int]], torch.Tensor]


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Logits [positions, vocab] (fp32, CPU) of one prompt through a PyTorch causal LM."""
    device = next(model.parameters()).device

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        return out.logits[0].float().cpu()

    return run


def all_logits(fn: LogitsFn, prompts: Sequence[list[int]]) -> list[torch.Tensor]:
    return [fn(list(p)) for p in prompts]


def compare_logits(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> dict:
    """max |diff|, relative max |diff| and top-1 agreement over all prompt positions."""
    max_abs = 0.0
    scale = 0.0
    agree = total = 0
    for ref, got in zip(reference, candidate):
        got = got.float()
        if ref.shape != got.shape:
            raise VerificationError(f"the exported model returns logits of shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        max_abs = max(max_abs, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
    return {
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_abs / max(scale, 1e-12),
        "top1_agreement": agree / max(total, 1),
        "positions": total,
        "prompts": len(reference),
    }


def _mean_kl(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Mean KL(reference || candidate) per position, in nats."""
    total = count = 0.0
    for ref, got in zip(reference, candidate):
        p = torch.log_softmax(ref.double(), -1)
        q = torch.log_softmax(got.double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += ref.shape[0]
    return total / max(count, 1)


def retention(reference: Sequence[torch.Tensor], artifact: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> dict:
    """How much of the fine-tune a 16-bit artifact keeps: its distance to the fine-tuned model against the base's.

    `retention` = 1 - KL(tuned || artifact) / KL(tuned || base): 1 keeps everything, 0 or less is no closer
    to the fine-tuned model than the base itself (the rounding swallowed the update).
    """
    kl_artifact, kl_base = _mean_kl(reference, artifact), _mean_kl(reference, base)
    top1 = compare_logits(reference, artifact)["top1_agreement"]
    top1_base = compare_logits(reference, base)["top1_agreement"]
    return {"retention": 1 - kl_artifact / max(kl_base, 1e-30), "kl_to_tuned": kl_artifact, "kl_base_to_tuned": kl_base,
            "top1_vs_tuned": top1, "top1_base_vs_tuned": top1_base}


def greedy_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict:
    """How many greedy answers are identical, and the share of matching leading tokens."""
    same = sum(1 for a, b in zip(reference, candidate) if list(a) == list(b))
    prefix = total = 0
    for a, b in zip(reference, candidate):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        prefix += n
        total += max(len(a), 1)
    return {"greedy_answers_identical": same, "greedy_answers": len(reference), "greedy_token_agreement": prefix / max(total, 1)}


def reference_greedy(source, max_new_tokens: int) -> list[list[int]]:
    """The source's greedy answers to its verification prompts, computed once per length and kept on it."""
    key = ("greedy", max_new_tokens)
    if key not in source.cache:
        source.cache[key] = torch_greedy(source.model, source.tokenizer, source.prompts, max_new_tokens)
    return source.cache[key]


def torch_greedy(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers (token ids up to and including the end of turn) of a PyTorch model."""
    from tunelab.generate import GenerationSettings, build_generation_config, end_of_turn_ids, trim_at_stop

    config = build_generation_config(tokenizer, model, GenerationSettings(max_new_tokens=max_new_tokens))
    stop = set(end_of_turn_ids(tokenizer, model))
    device = next(model.parameters()).device
    answers = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device), generation_config=config)
            answers.append(trim_at_stop(out[0, len(ids):].tolist(), stop))
    return answers


def check_logits(numbers: dict, *, dtype: str, what: str) -> None:
    """Raise VerificationError when unquantized logits differ more than the dtype allows."""
    tolerance = RELATIVE_TOLERANCE[dtype]
    numbers["tolerance"] = {"max_rel_logit_diff": tolerance}
    if numbers["max_rel_logit_diff"] > tolerance:
        raise VerificationError(
            f"{what} does not reproduce the model: max |logit diff| {numbers['max_abs_logit_diff']:.3g} "
            f"({numbers['max_rel_logit_diff']:.3g} of the largest logit) exceeds the {dtype} tolerance {tolerance:g}; "
            "nothing was written\n  fix: report this as a bug with the model's config.json"
        )


def check_agreement(numbers: dict, *, quantization: str, what: str) -> None:
    """Raise VerificationError when a quantized artifact's top-1 agreement is below tolerance."""
    tolerance = AGREEMENT_TOLERANCE[quantization]
    numbers["tolerance"] = {"top1_agreement": tolerance}
    if numbers["top1_agreement"] < tolerance:
        raise VerificationError(
            f"{what}: {quantization} changes the model too much: top-1 agreement {numbers['top1_agreement']:.3f} "
            f"is below {tolerance}; nothing was written\n  fix: use a wider type (q8_0, f16) or no --quantize"
        )


def format_numbers(numbers: dict) -> str:
    """One line for the terminal: the verification numbers that matter."""
    parts = []
    if "max_abs_logit_diff" in numbers:
        parts.append(f"max |logit diff| {numbers['max_abs_logit_diff']:.3g} (rel {numbers['max_rel_logit_diff']:.2g})")
        parts.append(f"top-1 agreement {100 * numbers['top1_agreement']:.1f}%")
    if "greedy_answers" in numbers:
        parts.append(f"greedy answers identical {numbers['greedy_answers_identical']}/{numbers['greedy_answers']}")
    if "perplexity" in numbers:
        ppl = numbers["perplexity"]
        parts.append(f"perplexity {ppl['artifact']:.4g} vs source {ppl['source']:.4g} ({100 * (ppl['ratio'] - 1):+.1f}%)")
    return ", ".join(parts)


def dumps(numbers: dict) -> str:
    return json.dumps(numbers, indent=2)
