"""Merge and export (hf, gguf, onnx + int8, torchscript) on a tiny LoRA run: round trips, logits, files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import TunelabError
from tunelab.export import export_model, merge_model
from tunelab.export.verify import VerificationError, torch_logits_fn
from tunelab.models import load_for_inference

REPO = Path(__file__).resolve().parents[1]
EXPORT_FILES = {"export.json", "README.md"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
PROMPT_IDS = [[1, 28, 345, 9012, 77, 4], [1, 500, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


def _tunelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI entry point in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from tunelab import cli

    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(tiny_model_dir: Path, out: Path, method: str, *, records: list[dict] | None = None, extra: tuple[str, ...] = ()):
    from tunelab.train import train

    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}-train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (records or reasoning_problems(16, seed=3))))
    config = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={data}", f"output.dir={out.parent}", f"output.name={out.name}",
        f"method={method}", "training.precision=fp32", "training.batch_size=4", "training.gradient_accumulation_steps=1",
        "training.learning_rate=5e-2", "training.warmup_steps=0", "training.max_steps=3", "lora.r=4", "lora.alpha=8",
        "data.max_seq_length=128", *extra,
    ])
    train(config, quiet=True)
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _train(tiny_model_dir, tmp_path_factory.mktemp("runs") / "lora", "lora")


@pytest.fixture(scope="module")
def adapter_logits(lora_run) -> list[torch.Tensor]:
    """The trained model's logits, computed on the adapter-on-base model (never merged)."""
    model, _ = load_for_inference(str(lora_run), dtype="fp32", device="cpu", merge=False)
    fn = torch_logits_fn(model)
    return [fn(ids) for ids in PROMPT_IDS]


def _max_diff(reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, got))


# ----------------------------------------------------------------------------- merge / hf


def test_merge_writes_a_plain_hf_directory_loadable_without_tunelab(lora_run, adapter_logits, tmp_path):
    out, info = merge_model(str(lora_run), tmp_path / "merged")
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors", "config.json", "generation_config.json", *TOKENIZER_FILES, *EXPORT_FILES
    }
    assert info["format"] == "hf" and info["dtype"] == "float32" and info["source"]["method"] == "lora"
    assert info["source"]["merge_verification"]["max_rel_logit_diff"] < 1e-4
    assert info["verification"]["max_abs_logit_diff"] < 1e-4 and info["total_bytes"] == sum(info["files"].values())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] in (2, [2])  # <|im_end|>
    # A fresh interpreter where `import tunelab` fails: plain transformers loads the directory.
    (tmp_path / "ids.json").write_text(json.dumps(PROMPT_IDS))
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.modules["tunelab"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        assert tokenizer.chat_template
        ids = json.load(open({str(tmp_path / "ids.json")!r}))
        with torch.no_grad():
            logits = [model(torch.tensor([i])).logits[0] for i in ids]
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert _max_diff(adapter_logits, torch.load(tmp_path / "logits.pt")) < 1e-4


@pytest.mark.parametrize("method", ["dora", "qlora"])
def test_dora_and_qlora_runs_merge_and_match_adapter_on_base(method, tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = _train(tiny_model_dir, tmp_path / method, method)
    code, _, stderr = _cli(monkeypatch, capsys, "merge", str(run), "--dtype", "bf16")
    assert code == 0, stderr[-3000:]
    info = json.loads((run / "merged" / "export.json").read_text())
    assert info["dtype"] == "bfloat16" and info["source"]["method"] == method
    assert info["source"]["merge_verification"]["max_rel_logit_diff"] < 1e-4  # fp32 fold
    assert 0 < info["verification"]["max_rel_logit_diff"] < 5e-2  # bf16 storage rounding, within tolerance
    kept = info["verification"]["fine_tune_retained"]  # bf16 rounding kept the update: far closer to the tuned model than the base
    assert kept["retention"] > 0.9 and kept["top1_vs_tuned"] > kept["top1_base_vs_tuned"]
    if method == "qlora":
        assert "unquantized" in info["source"]["note"] and "never into 4-bit" in " ".join(stderr.split())
        gap = info["source"]["qlora_gap"]  # the full-precision base is not the NF4 base the adapter trained on
        assert gap["qlora_base"] == "original" and gap["max_rel_logit_diff"] > 1e-3
        code, _, stderr = _cli(monkeypatch, capsys, "merge", str(run), "--qlora-base", "dequantized", "--dtype", "fp32",
                               "-o", str(tmp_path / "dequantized"))
        assert code == 0, stderr[-3000:]
        exact = json.loads((tmp_path / "dequantized" / "export.json").read_text())["source"]
        assert exact["qlora_gap"]["max_rel_logit_diff"] < 1e-4 and exact["qlora_gap"]["top1_agreement"] == 1.0
        assert "dequant(NF4(W))" in exact["note"]
    merged, _ = load_for_inference(str(run / "merged"), dtype="fp32", device="cpu")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # loaded as requested
    assert "lora" not in json.dumps(list(dict(merged.named_parameters())))


def test_hf_adapter_only_copies_the_adapter(lora_run, tmp_path):
    out, info = export_model(str(lora_run), "hf", tmp_path / "adapter", adapter_only=True)
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "tunelab_model.json", *TOKENIZER_FILES, *EXPORT_FILES
    }
    assert info["format"] == "hf-adapter" and info["source"]["method"] == "lora" and "copied byte for byte" in info["verification"]["note"]
    assert (out / "adapter_model.safetensors").read_bytes() == (lora_run / "final" / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- gguf


def _require_llama_cpp():
    """llama-cpp-python is in the dev extra (CI has it): skipped only on a machine that lacks it, never in CI."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]' builds it)")


def _tiny_config_dir(path: Path, tokenizer, config) -> Path:
    """A saved random model of `config` with the real SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases and norms, so a wrong layout cannot hide behind zeros and ones
        for name, parameter in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gguf_f32(lora_run, tmp_path_factory) -> tuple[Path, dict]:
    _require_llama_cpp()
    return export_model(str(lora_run), "gguf", tmp_path_factory.mktemp("gguf") / "gguf", quantize="f32")


def test_gguf_in_llama_cpp_reproduces_the_run_and_tunelab_generate(gguf_f32, lora_run):
    from llama_cpp import Llama

    from tunelab.generate import GenerationSettings, encode_prompt, generate_for_prompts, user_messages

    out, info = gguf_f32
    assert {p.name for p in out.iterdir()} == {"lora-F32.gguf", "Modelfile", *EXPORT_FILES}
    numbers = info["verification"]
    assert numbers["verified_by"].startswith("llama.cpp (llama-cpp-python") and info["verified_by"] == numbers["verified_by"]
    assert numbers["tokenizer_identical"] and numbers["max_rel_logit_diff"] < 1e-4 and numbers["top1_agreement"] == 1.0
    assert numbers["greedy_answers_identical"] == numbers["greedy_answers"] == 6
    assert numbers["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-3) and numbers["perplexity"]["tokens_scored"] == 4 * 127
    assert info["gguf"]["tensor_types"] == {"F32": 20} and info["gguf"]["pre_tokenizer"] == "gpt-2"  # the tied head is not written
    assert info["gguf"]["eot_token_id"] is None  # SmolLM2's EOS is <|im_end|> already
    # A llama-cpp-python user: the chat template inside the file, greedy; the same text as `tunelab generate`.
    prompts = ["What is 2 + 3?", "Name a color.", "Tom has 4 pens and buys 3 more. How many pens now?"]
    llm = Llama(model_path=str(out / "lora-F32.gguf"), n_ctx=512, verbose=False)
    replies = [llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, max_tokens=12, repeat_penalty=1.0)
               for p in prompts]
    llm.close()
    model, tokenizer = load_for_inference(str(lora_run), dtype="fp32", device="cpu")
    rows = generate_for_prompts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12), batch_size=1)
    # llama-cpp-python renders the file's template to the same prompt tokens, and continues it the same way.
    assert [r["usage"]["prompt_tokens"] for r in replies] == [len(encode_prompt(tokenizer, user_messages(p))) for p in prompts]
    assert [r["choices"][0]["message"]["content"].strip() for r in replies] == [r["completion"].strip() for r in rows]
    # Ollama: the run's ChatML as a Go template, SmolLM2's default system message, the end-of-turn stop.
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./lora-F32.gguf" in modelfile and "PARAMETER stop <|im_end|>" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert info["ollama"]["template"] == "chatml" and info["ollama"]["template_identical"]
    assert "ollama create lora -f Modelfile" in (out / "README.md").read_text()


def test_gguf_that_llama_cpp_computes_differently_publishes_nothing(lora_run, tmp_path, monkeypatch):
    from tunelab.export import gguf

    _require_llama_cpp()
    monkeypatch.setattr(gguf, "permute_qk", lambda weight, n_head: weight)  # HF's rotary layout left as it is
    with pytest.raises(VerificationError, match="run by llama.cpp does not reproduce the model"):
        export_model(str(lora_run), "gguf", tmp_path / "out", quantize="f32")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def wide_model_dir(tokenizer, tmp_path_factory) -> Path:
    """Rows of 256 (K-quant super-blocks): a tiny Llama whose tensors llama.cpp really K-quantizes."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    return _tiny_config_dir(tmp_path_factory.mktemp("models") / "wide", tokenizer, config)


def test_gguf_q4_k_m_is_made_and_verified_by_llama_cpp(wide_model_dir, tmp_path, monkeypatch, capsys):
    from tunelab.export import verify

    _require_llama_cpp()
    # A random model's next-token distribution is nearly flat (49,152 logits within a few tenths), so 4-bit
    # weights flip its argmax and shift its perplexity at will: here the gates are opened and the numbers only
    # recorded. The real-model test below gates Q4_K_M on SmolLM2 (top-1 >= 0.7, perplexity within 10% of f16).
    monkeypatch.setitem(verify.AGREEMENT_TOLERANCE, "q4_k_m", 0.0)
    monkeypatch.setitem(verify.PERPLEXITY_TOLERANCE, "q4_k_m", 100.0)
    code, stdout, stderr = _cli(monkeypatch, capsys, "export", str(wide_model_dir), "--format", "gguf", "-q", "q4_k_m",
                                "-o", str(tmp_path / "q4"))
    assert code == 0, stderr[-3000:]
    info = json.loads((tmp_path / "q4" / "export.json").read_text())
    assert {p.name for p in (tmp_path / "q4").iterdir()} == {"wide-Q4_K_M.gguf", "Modelfile", *EXPORT_FILES}  # no f16 left
    assert info["gguf"]["quantized_by"].startswith("llama_model_quantize")
    # llama.cpp's policy, not a uniform type: Q4_K matrices, some at Q6_K (the tied embedding / output, attn_v, ffn_down).
    types = info["gguf"]["tensor_types"]
    assert types["Q4_K"] >= 8 and types["Q6_K"] >= 1 and types["F32"] == 5
    numbers, f16 = info["verification"], info["verification_f16"]
    assert f16["max_rel_logit_diff"] < 2e-2 and f16["perplexity"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert numbers["tokenizer_identical"] and 0 < numbers["top1_agreement"] <= 1 and numbers["perplexity"]["artifact"] > 1
    assert numbers["tolerance"] == {"top1_agreement": 0.0} and numbers["verified_by"].startswith("llama.cpp")
    assert "perplexity" in stdout and "top-1 agreement" in stdout


def test_gguf_type_choices_and_pre_tokenizer_refusal(lora_run, monkeypatch, capsys):
    from tunelab.export import gguf

    code, _, stderr = _cli(monkeypatch, capsys, "export", str(lora_run), "--format", "gguf", "-q", "q4_1")
    assert code == 2 and "is not a GGUF type" in stderr and "q4_k_m" in stderr
    with pytest.raises(TunelabError, match="not one llama.cpp knows"):
        gguf.pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    assert gguf.file_name("run", "q5_k_m") == "run-Q5_K_M.gguf"


LLAMA_FAMILY = {
    # Qwen2: attention biases, no q/k permutation, an untied output head.
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    # Qwen3: q/k norms, head_dim != hidden / heads.
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    # Llama 3.2: llama3 rope scaling (rope_freqs), head_dim 32 != 64 / 4 (key_length), q/k biases permuted.
    "llama3": dict(model_type="llama", head_dim=32, attention_bias=True, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("family", sorted(LLAMA_FAMILY))
def test_gguf_architectures_load_and_match_in_llama_cpp(family, tokenizer, tmp_path):
    from transformers import AutoConfig

    _require_llama_cpp()
    extra = dict(LLAMA_FAMILY[family])
    config = AutoConfig.for_model(extra.pop("model_type"), vocab_size=49152, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    source = _tiny_config_dir(tmp_path / family, tokenizer, config)
    out, info = export_model(str(source), "gguf", tmp_path / "out", quantize="f32")
    numbers = info["verification"]
    assert numbers["verified_by"].startswith("llama.cpp") and numbers["max_rel_logit_diff"] < 1e-4
    assert numbers["greedy_answers_identical"] == 6 and numbers["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-3)
    assert info["gguf"]["architecture"] == {"qwen2": "qwen2", "qwen3": "qwen3", "llama3": "llama"}[family]


def test_gguf_rejects_unsupported_architectures(tmp_path, tokenizer, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code, _, stderr = _cli(monkeypatch, capsys, "export", str(tmp_path / "gpt2"), "--format", "gguf", "-o", str(tmp_path / "out"))
    stderr = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stderr
    assert "does not support GPT2LMHeadModel" in stderr and "LlamaForCausalLM" in stderr
    assert not (tmp_path / "out").exists()


def test_failed_verification_publishes_nothing(lora_run, tmp_path, monkeypatch):
    from tunelab.export import hf

    write = hf.write_merged

    def write_a_different_model(source, directory, dtype):
        with torch.no_grad():
            source.model.model.norm.weight.mul_(1.01)  # 1% off: far beyond the fp32 tolerance
        write(source, directory, dtype)

    monkeypatch.setattr(hf, "write_merged", write_a_different_model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an earlier export")
    with pytest.raises(VerificationError, match="does not reproduce the model"):
        export_model(str(lora_run), "hf", tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]  # the old export is untouched


# ----------------------------------------------------------------------------- runs that added tokens, text runs


@pytest.fixture(scope="module")
def base_without_chat_tokens(tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has neither <|im_start|> / <|im_end|> nor a chat template (a Llama-3 or
    Mistral base): training adds the chatml tokens and resizes the embedding."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("models") / "plainbase"
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (path / name).read_text().replace("<|im_start|>", "<|startoftext|>").replace("<|im_end|>", "<|stop|>")
        data = json.loads(text)
        data.pop("chat_template", None)
        (path / name).write_text(json.dumps(data))
    make_tiny_llama().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def added_tokens_run(base_without_chat_tokens, tmp_path_factory) -> Path:
    """A LoRA run on a base without the chat tokens: training added <|im_start|> / <|im_end|>."""
    return _train(base_without_chat_tokens, tmp_path_factory.mktemp("added") / "added", "lora")


def test_run_that_added_chat_tokens_merges_and_exports_to_gguf_and_torchscript(base_without_chat_tokens, added_tokens_run,
                                                                               tmp_path):
    from transformers import AutoTokenizer

    assert "<|im_start|>" not in AutoTokenizer.from_pretrained(base_without_chat_tokens).get_vocab()
    run = added_tokens_run
    tuned, tokenizer = load_for_inference(str(run), dtype="fp32", device="cpu", merge=False)
    assert len(tokenizer) == 49154 and tuned.config.vocab_size == 49154  # the base resized to the run's tokenizer
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"])
    assert 49152 in ids  # <|im_start|>, one of the added tokens
    reference = [torch_logits_fn(tuned)(ids)]
    merged_dir, _ = merge_model(str(run), tmp_path / "merged")
    merged, _ = load_for_inference(str(merged_dir), dtype="fp32", device="cpu")
    assert _max_diff(reference, [torch_logits_fn(merged)(ids)]) < 1e-4
    for fmt, quantize in (("gguf", "f32" if _has_llama_cpp() else "q8_0"), ("torchscript", None)):
        _, info = export_model(str(run), fmt, tmp_path / fmt, quantize=quantize)
        assert info["source"]["merge_verification"]["max_rel_logit_diff"] < 1e-4, fmt
        if fmt == "gguf":
            assert info["gguf"]["tokens"] == 49154 and info["verification"]["tokenizer_identical"]


@pytest.mark.xfail(strict=True, raises=VerificationError,
                   reason="known bug: onnxruntime-genai's greedy answers differ from PyTorch's on a run that added "
                          "chat tokens; the export refuses and writes nothing (strict: passes once fixed)")
def test_run_that_added_chat_tokens_exports_to_onnx(added_tokens_run, tmp_path):
    _, info = export_model(str(added_tokens_run), "onnx", tmp_path / "onnx")
    assert info["verification"]["onnxruntime_genai"]["greedy_answers_identical"] == 6
    assert not (tmp_path / "onnx").exists() or (tmp_path / "onnx" / "model.onnx").is_file()


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_text_run_exports_without_a_chat_template(tiny_model_dir, tmp_path):
    records = [{"text": f"{r['question']} {r['answer']}"} for r in reasoning_problems(16, seed=4)]
    run = _train(tiny_model_dir, tmp_path / "runs" / "text", "lora", records=records, extra=("data.format=text",))
    merged_dir, _ = merge_model(str(run))
    assert not (merged_dir / "chat_template.jinja").exists()  # the base's template was never trained with
    _, info = export_model(str(run), "gguf", tmp_path / "gguf", quantize="f32" if _has_llama_cpp() else "q8_0")
    assert info["gguf"]["chat_template"] is False and info["ollama"]["template"].startswith("plain text")
    assert 'TEMPLATE """{{ .Prompt }}"""' in (tmp_path / "gguf" / "Modelfile").read_text()


# ----------------------------------------------------------------------------- onnx


@pytest.fixture(scope="module")
def onnx_dir(lora_run, tmp_path_factory) -> Path:
    out, _ = export_model(str(lora_run), "onnx", tmp_path_factory.mktemp("onnx") / "onnx")
    return out


def test_onnx_export_with_kv_cache_matches_pytorch(onnx_dir, adapter_logits):
    from tunelab.export.onnx_runtime import OnnxCausalLM

    info = json.loads((onnx_dir / "export.json").read_text())
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx", "genai_config.json", "config.json", "generation_config.json", *TOKENIZER_FILES, *EXPORT_FILES
    }
    assert info["onnx"]["kv_cache"] and info["verification"]["max_rel_logit_diff"] < 1e-4
    assert info["verification"]["greedy_answers_identical"] == 6
    assert info["verification"]["onnxruntime_genai"]["greedy_answers_identical"] == 6
    runtime = OnnxCausalLM(onnx_dir)
    assert _max_diff(adapter_logits, [runtime.prompt_logits(ids) for ids in PROMPT_IDS]) < 1e-4
    # The cache path: prompt, then one position per step, equals the whole sequence at once.
    ids = torch.tensor([PROMPT_IDS[1]])
    full = runtime(ids).logits[0, -1]
    logits, past = runtime.step(ids[:, :-1].numpy(), torch.ones(1, 10, dtype=torch.long).numpy(),
                                torch.arange(10)[None].numpy(), runtime.empty_cache(1))
    last, _ = runtime.step(ids[:, -1:].numpy(), torch.ones(1, 11, dtype=torch.long).numpy(), torch.tensor([[10]]).numpy(), past)
    assert float((full - torch.from_numpy(last[0, -1])).abs().max()) < 1e-4


def test_onnx_that_onnxruntime_genai_runs_differently_publishes_nothing(lora_run, tmp_path, monkeypatch):
    from tunelab.export import onnx

    monkeypatch.setattr(onnx, "genai_greedy", lambda directory, prompts, n: [[0] * n for _ in prompts])  # a broken generator
    with pytest.raises(VerificationError, match="greedy answers with onnxruntime-genai's KV cache differ"):
        export_model(str(lora_run), "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_generate_and_eval_run_the_onnx_folder_through_onnx_runtime(onnx_dir, lora_run, tmp_path):
    from tunelab.evaluate import evaluate_sources
    from tunelab.export.onnx_runtime import OnnxCausalLM
    from tunelab.generate import GenerationSettings, generate_for_prompts

    model, tokenizer = load_for_inference(str(onnx_dir))
    assert isinstance(model, OnnxCausalLM)
    torch_model, _ = load_for_inference(str(lora_run), dtype="fp32", device="cpu")
    prompts = ["What is 2 + 3?", "Name a color.", "Tom has 4 pens and buys 3 more. How many pens now?"]
    settings = GenerationSettings(max_new_tokens=12)
    onnx_rows = generate_for_prompts(model, tokenizer, prompts, settings, batch_size=3)  # left-padded batch
    torch_rows = generate_for_prompts(torch_model, tokenizer, prompts, settings, batch_size=1)
    assert [r["completion"] for r in onnx_rows] == [r["completion"] for r in torch_rows]
    sampled = generate_for_prompts(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=8, temperature=0.9, num_samples=3), seed=1)
    assert len(sampled) == 3 and len({r["completion"] for r in sampled}) > 1

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(4, seed=9)))
    onnx_eval, torch_eval = (evaluate_sources([src], str(data), metrics=["loss"], output=tmp_path / name)[0]
                             for src, name in ((str(onnx_dir), "onnx"), (str(lora_run), "torch")))
    # Both fp32; they differ only in the order of float sums (ONNX Runtime's kernels vs torch's,
    # which changes with the CPU's vector width): ~1e-5 relative. bf16 anywhere would be ~1e-2.
    assert onnx_eval.scores["loss"] == pytest.approx(torch_eval.scores["loss"], rel=5e-5)
    assert onnx_eval.scores["params"] == torch_eval.scores["params"]

    cli = _tunelab("generate", str(onnx_dir), "--prompt", prompts[0], "--max-new-tokens", "12", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip() == torch_rows[0]["completion"]


def test_seed_style_export_onnx_int8_and_evaluate(lora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "onnx-int8"
    code, stdout, stderr = _cli(monkeypatch, capsys, "export", "--model-path", str(lora_run), "--output-path", str(out),
                                "--format", "onnx", "--quantize", "int8")
    assert code == 0, stderr[-3000:]
    assert "exported" in stdout and "top-1 agreement" in stdout
    info = json.loads((out / "export.json").read_text())
    assert info["quantization"] == "int8" and info["verification_fp32"]["max_rel_logit_diff"] < 1e-4
    assert info["verification"]["top1_agreement"] >= 0.9
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    constants = {i.name for i in graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 7  # q k v o gate up down, 2 layers
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]  # no fp32 weight left
    assert info["onnx"]["quantization"]["bits"] == 8 and info["onnx"]["quantization"]["block_size"] == 32
    code, _, stderr = _cli(monkeypatch, capsys, "export", "--model-path", str(lora_run), "--output-path", str(out), "--format", "onnx")
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert json.loads((out / "export.json").read_text())["quantization"] == "int8"  # untouched

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(3, seed=9)))
    code, _, stderr = _cli(monkeypatch, capsys, "evaluate", "--model-path", str(out), "--eval-data", str(data), "--metrics",
                           "loss,exact_match", "--max-new-tokens", "8", "--output", str(tmp_path / "eval"))
    assert code == 0, stderr[-3000:]
    scores = json.loads(next((tmp_path / "eval").rglob("scores.json")).read_text())
    assert scores["loss"] > 0 and scores["dtype"] == "int8"


# ----------------------------------------------------------------------------- torchscript


def test_torchscript_and_torch_export_reload_and_match(lora_run, adapter_logits, tmp_path):
    out, info = export_model(str(lora_run), "torchscript", tmp_path / "ts")
    assert {p.name for p in out.iterdir()} == {
        "model.torchscript.pt", "model.pt2", "config.json", "generation_config.json", *TOKENIZER_FILES, *EXPORT_FILES
    }
    assert info["preferred"] == "model.pt2"
    traced = torch.jit.load(str(out / "model.torchscript.pt"))
    program = torch.export.load(str(out / "model.pt2")).module()
    for module in (traced, program):
        got = []
        for ids in PROMPT_IDS:  # lengths 6 and 11; the trace used 7
            tensor = torch.tensor([ids])
            with torch.no_grad():
                got.append(module(tensor, torch.ones_like(tensor))[0])
        assert _max_diff(adapter_logits, got) < 1e-4


# ----------------------------------------------------------------------------- bad input, aliases


def test_bad_inputs_give_one_clear_message(lora_run, tmp_path, monkeypatch, capsys):
    cases = [
        (["export", str(lora_run), "--format", "tflite"], "--format 'tflite' is not one of hf, gguf, onnx, torchscript"),
        (["export", str(tmp_path / "missing"), "--format", "onnx"], "is not a run folder"),
        (["export", str(lora_run), "--format", "onnx", "--quantize", "q4_0"], "not available for ONNX"),
        (["export", str(lora_run), "--format", "torchscript", "--quantize", "int8"], "--quantize is for gguf"),
        (["export", str(lora_run), "--model-path", str(lora_run)], "not both or neither"),
        (["merge", str(tmp_path)], "holds no model"),
    ]
    for args, message in cases:
        code, _, stderr = _cli(monkeypatch, capsys, *args)
        assert code == 2 and "Traceback" not in stderr, (args, stderr[-2000:])
        assert message in " ".join(stderr.split()), (args, stderr)
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(10, 10, 0))
    with pytest.raises(TunelabError, match="not enough disk space"):
        merge_model(str(lora_run), tmp_path / "full-disk")
    assert not (tmp_path / "full-disk").exists()


def test_seed_style_train_generate_and_python_names(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(8, seed=3)))
    run = tmp_path / "runs" / "seed"
    code, _, stderr = _cli(monkeypatch, capsys, "train", "--model", str(tiny_model_dir), "--train-data", str(data), "--method", "lora",
                           "--epochs", "3", "--batch-size", "4", "--max-seq-length", "256", "--max-steps", "1", "--output", str(run),
                           "training.precision=fp32")
    assert code == 0, stderr[-3000:]
    assert "max_seq_length: 256" in (run / "config.yaml").read_text()
    code, stdout, stderr = _cli(monkeypatch, capsys, "generate", "--model-path", str(run), "--prompt", "Hi", "--max-length", "5",
                                "--temperature", "0.9", "--num-samples", "3", "--seed", "0")
    assert code == 0, stderr[-3000:]
    assert stdout.count("### prompt 1, sample") == 3

    import tunelab

    assert tunelab.LLMFineTuner is tunelab.FineTuner and tunelab.FineTuner.save_model is tunelab.FineTuner.save
    assert callable(tunelab.save_model)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_real_model_lora_run_merges_and_exports_to_gguf_q4_k_m_and_onnx_int4(bundled_dir, gsm8k_dir, tmp_path):
    """The bundled SmolLM2-135M-Instruct after a short LoRA run: merge, GGUF Q4_K_M in llama.cpp, ONNX int4 in onnxruntime-genai."""
    from transformers import AutoModelForCausalLM

    from tunelab.generate import encode_prompt, user_messages
    from tunelab.train import train

    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()[:16]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "runs" / "real"
    train(load_config(None, [
        f"data.train={tmp_path / 'train.jsonl'}", f"output.dir={run.parent}", "output.name=real", "training.max_steps=2",
        "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.learning_rate=1e-3",
        "data.max_seq_length=512", "lora.r=8",
    ]), quiet=True)
    adapter, tokenizer = load_for_inference(str(run), dtype="fp32", device="cpu", merge=False)
    ids = [encode_prompt(tokenizer, user_messages("What is 15 + 27?"))]
    reference = [torch_logits_fn(adapter)(ids[0])]
    del adapter

    merged_dir, merged = merge_model(str(run))
    assert merged_dir == run / "merged" and merged["verification"]["max_rel_logit_diff"] < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert _max_diff(reference, [torch_logits_fn(plain)(ids[0])]) < 1e-3  # logits of size ~20: fp32 reorderings only
    del plain

    _require_llama_cpp()
    gguf_dir, gguf_info = export_model(str(run), "gguf", quantize="q4_k_m")
    assert gguf_dir == run / "export" / "gguf-q4_k_m" and gguf_info["file"] == "real-Q4_K_M.gguf"
    numbers, f16 = gguf_info["verification"], gguf_info["verification_f16"]
    assert numbers["verified_by"].startswith("llama.cpp") and numbers["tokenizer_identical"]
    # llama.cpp's perplexity on the bundled text: Q4_K_M within 10% of the f16 file's (measured +4-5%).
    assert numbers["perplexity"]["artifact"] < 1.10 * f16["perplexity"]["artifact"]
    # f16 weights: perplexity as the source's; greedy answers follow fp32's until a near-tied
    # token flips (measured 0.83 of leading tokens on 2026-12-08, AMD EPYC).
    assert f16["perplexity"]["ratio"] == pytest.approx(1.0, abs=0.01) and f16["greedy_token_agreement"] >= 0.75
    assert numbers["greedy_answers"] == 6 and numbers["top1_agreement"] >= 0.7
    assert gguf_info["files"]["real-Q4_K_M.gguf"] < 0.2 * merged["files"]["model.safetensors"]
    assert gguf_info["ollama"]["template"] == "chatml" and gguf_info["ollama"]["template_identical"]

    onnx_dir, onnx_info = export_model(str(run), "onnx", quantize="int4")
    assert onnx_info["verification_fp32"]["max_rel_logit_diff"] < 1e-4
    # fp32 in onnxruntime-genai: the export's own gate is 0.9 of leading tokens; a near-tied token can
    # still flip the tail of an answer (4 of 6 identical on 2026-12-08, AMD EPYC).
    genai = onnx_info["verification_fp32"]["onnxruntime_genai"]
    assert genai["greedy_answers_identical"] >= 4 and genai["greedy_token_agreement"] >= 0.9
    assert onnx_info["verification"]["top1_agreement"] >= 0.6 and onnx_info["onnx"]["quantization"]["bits"] == 4
    from tunelab.export.onnx import genai_greedy

    (answer,) = genai_greedy(onnx_dir, ids, 24)  # onnxruntime-genai runs the int4 folder as its users load it
    assert len(answer) > 3 and tokenizer.decode(answer, skip_special_tokens=True).strip()
