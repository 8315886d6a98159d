"""The training recipe on a tiny random Llama: methods, loss normalisation, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import TunelabError
from tunelab.models import load_for_inference
from tunelab.loss import TargetTokenLoss
from tunelab.train import accumulate_gradients, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(48, seed=3)))
    return path


def run_config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}", f"output.name={out.name}",
        "training.batch_size=4", "training.gradient_accumulation_steps=2", "training.learning_rate=5e-3",
        "training.warmup_steps=0", "training.logging_steps=1", "training.max_steps=6", "lora.r=4",
        "lora.alpha=8", "data.eval_fraction=0.15", "data.max_seq_length=128", "training.precision=fp32", *overrides,
    ])


def snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone().float()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
def test_each_method_learns_and_only_trainable_weights_change(method, tiny_model_dir, train_file, tmp_path):
    extra = ["full.freeze=[model.embed_tokens.*]", "training.learning_rate=1e-3"] if method == "full" else []
    config = run_config(tiny_model_dir, train_file, tmp_path / method, f"method={method}", "training.max_steps=8", *extra)
    base, _ = load_for_inference(str(tiny_model_dir), dtype="fp32", device="cpu")
    before = {n: p.detach().clone().float() for n, p in base.named_parameters()}
    result = train(config, quiet=True)
    losses = [r["loss"] for r in result.history if "loss" in r]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert losses[-1] < losses[0] and evals[-1] < evals[0], (losses, evals)

    after = snapshot(result.model)
    # Adapter weights have no base counterpart; LoRA's B (and DoRA's) starts at zero, so a
    # trained B is non-zero. Base weights are compared with their values before training.
    trainable_changed = [n for n, (grad, w) in after.items() if grad and (
        bool(w.abs().sum()) if _base_name(n) not in before else not torch.equal(w, before[_base_name(n)]))]
    assert trainable_changed, "no trainable parameter changed"
    lora_b = [n for n in after if "lora_B" in n]
    assert all(n in trainable_changed for n in lora_b), "a LoRA B matrix stayed at its zero init"
    for name, (grad, weight) in after.items():
        if not grad and weight.dtype.is_floating_point and _base_name(name) in before and method != "qlora":
            assert torch.equal(weight, before[_base_name(name)]), f"frozen {name} changed"
    if method == "qlora":
        import bitsandbytes as bnb

        layer = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert isinstance(layer, bnb.nn.Linear4bit)
    if method == "full":
        assert not after["model.embed_tokens.weight"][0]


def _base_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> plain HF name."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_loss_matches_transformers_plain_path(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 20))
    labels = ids.clone()
    labels[:, :7] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels[2, 15:] = -100
    loss_sum, count = TargetTokenLoss(tiny_llama)(input_ids=ids, labels=labels, attention_mask=mask)
    reference = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert count == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)


def test_batch_8_x_accum_1_equals_batch_1_x_accum_8(tiny_llama):
    """Same gradients whatever the split into micro-batches (token-weighted mean)."""
    from accelerate import Accelerator

    torch.manual_seed(1)
    lengths = [5, 9, 13, 6, 17, 8, 11, 4]
    rows = []
    for n in lengths:
        ids = torch.randint(3, 1000, (n,))
        labels = ids.clone()
        labels[: n // 2] = -100  # prompt part
        rows.append((ids, labels))

    def batch_of(items):
        width = max(len(i) for i, _ in items)
        ids = torch.full((len(items), width), 2)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, (i, l) in enumerate(items):
            ids[r, : len(i)], labels[r, : len(l)], mask[r, : len(i)] = i, l, 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    from tunelab.tasks.causal_lm import CausalLMLoss

    accelerator = Accelerator(cpu=True)
    loss_module = CausalLMLoss(TargetTokenLoss(tiny_llama))

    def grads(micro):
        tiny_llama.zero_grad(set_to_none=True)
        accumulate_gradients(loss_module, micro, accelerator)
        return {n: p.grad.clone() for n, p in tiny_llama.named_parameters() if p.grad is not None}

    one_big = grads([batch_of(rows)])
    eight_small = grads([batch_of([r]) for r in rows])
    assert one_big.keys() == eight_small.keys() and one_big
    for name in one_big:
        torch.testing.assert_close(eight_small[name], one_big[name], rtol=1e-4, atol=1e-6)


EXPECTED_RUN_FILES = {
    "config.yaml", "metrics.jsonl", "eval.json", "report.html",
    "final/adapter_config.json", "final/adapter_model.safetensors", "final/tokenizer.json",
    "final/tokenizer_config.json", "final/chat_template.jinja", "final/tunelab_model.json", "final/README.md",
}
CHECKPOINT_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tunelab_model.json", "README.md",
}


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts}


def test_run_folder_holds_exactly_the_documented_files(tiny_model_dir, train_file, tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_config(tiny_model_dir, train_file, run_dir, "training.save_steps=2", "training.keep_checkpoints=2"), quiet=True)
    assert result.run_dir == run_dir
    assert run_files(run_dir) == EXPECTED_RUN_FILES
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert {p.name for p in (run_dir / "checkpoints" / "step-4").iterdir()} == CHECKPOINT_FILES
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= metrics[1].keys()
    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert eval_json["step"] == 6 and eval_json["eval_loss"] == pytest.approx(result.eval_loss)
    assert json.loads((run_dir / "final" / "tunelab_model.json").read_text())["base_model"] == str(tiny_model_dir)


def test_saved_adapter_reproduces_the_trained_models_logits(tiny_model_dir, train_file, tmp_path):
    result = train(run_config(tiny_model_dir, train_file, tmp_path / "run", "lora.dropout=0.0"), quiet=True)
    ids = torch.tensor([[1, 17, 300, 42, 9, 2]])
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
        for merge in (False, True):
            reloaded, tokenizer = load_for_inference(str(result.run_dir), dtype="fp32", device="cpu", merge=merge)
            torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
        base, _ = load_for_inference(str(tiny_model_dir), dtype="fp32", device="cpu")
        assert not torch.allclose(base(input_ids=ids).logits, trained, atol=1e-4)
    assert tokenizer.chat_template == result.tokenizer.chat_template


def test_refuses_to_overwrite_an_existing_run(tiny_model_dir, train_file, tmp_path):
    config = run_config(tiny_model_dir, train_file, tmp_path / "run", "training.max_steps=1")
    train(config, quiet=True)
    with pytest.raises(TunelabError, match="already holds a run"):
        train(config, quiet=True)
    other = run_config(tiny_model_dir, train_file, tmp_path / "run", "training.max_steps=1", "lora.r=2",
                       "training.resume=true")
    with pytest.raises(TunelabError, match="different config"):
        train(other, quiet=True)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


KILL_AT_STEP_4 = textwrap.dedent("""
    import os, signal, sys
    import tunelab.checkpoint as checkpoint
    import tunelab.train as train_module
    from tunelab.config import load_config

    real_save = checkpoint.save_checkpoint

    def save_then_die(checkpoints_dir, **kwargs):
        path = real_save(checkpoints_dir, **kwargs)
        if kwargs["state"].global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash right after a checkpoint
        return path

    train_module.save_checkpoint = save_then_die
    train_module.train(load_config(None, sys.argv[1:]), quiet=True)
""")


def test_resumed_run_matches_uninterrupted_run(tiny_model_dir, train_file, tmp_path):
    extra = ("training.save_steps=2", "training.max_steps=8", "lora.dropout=0.2", "training.keep_checkpoints=3")
    straight = train(run_config(tiny_model_dir, train_file, tmp_path / "straight", *extra), quiet=True)

    killed_config = run_config(tiny_model_dir, train_file, tmp_path / "killed", *extra)
    overrides = [f"{k}={v}" for k, v in _flatten(killed_config.model_dump(mode="json")).items() if v is not None]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, *overrides], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    assert (tmp_path / "killed" / "checkpoints" / "step-4" / "state.json").is_file()

    resumed = train(run_config(tiny_model_dir, train_file, tmp_path / "killed", *extra, "training.resume=true"), quiet=True)
    assert resumed.state.global_step == 8
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # no duplicated or missing steps after the resume
    assert straight.state.targets_seen == resumed.state.targets_seen


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import tunelab.checkpoint as checkpoint

    real_torch_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-4" in str(path) and str(path).endswith("scheduler.pt"):
            raise KeyboardInterrupt  # interrupted halfway through writing step 4
        return real_torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny_model_dir, train_file, run_dir, "training.save_steps=2"), quiet=True)
    monkeypatch.setattr(checkpoint.torch, "save", real_torch_save)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    state = json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["global_step"] == 2
    resumed = train(run_config(tiny_model_dir, train_file, run_dir, "training.save_steps=2", "training.resume=true"), quiet=True)
    assert resumed.state.global_step == 6


def test_prepared_data_is_reused_only_while_it_matches(tiny_model_dir, train_file, tmp_path):
    from tunelab.tasks.causal_lm import build_data, prepare_data
    from tunelab.train import load_run_tokenizer

    data_file = tmp_path / "train.jsonl"
    data_file.write_text(train_file.read_text())
    prepared = tmp_path / "prepared"
    config = run_config(tiny_model_dir, data_file, tmp_path / "run", f"data.prepared={prepared}")
    _, tokenizer, _ = load_run_tokenizer(config)
    fresh = prepare_data(config, tokenizer, prepared)
    assert sorted(p.name for p in prepared.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    said: list[str] = []
    reused = build_data(config, tokenizer, say=lambda *a, **k: said.append(str(a[0])))
    assert "reused prepared data" in reused.summary() and not said
    assert [x.input_ids for x in reused.train] == [x.input_ids for x in fresh.train]
    assert [x.labels for x in reused.eval] == [x.labels for x in fresh.eval]
    assert str(reused.train[0].source) == str(fresh.train[0].source)

    other = run_config(tiny_model_dir, data_file, tmp_path / "run", f"data.prepared={prepared}", "data.train_on_prompt=true")
    rebuilt = build_data(other, tokenizer, say=lambda *a, **k: said.append(str(a[0])))
    assert "reused" not in rebuilt.summary() and "prepared from other data" in said[-1]
    data_file.write_text(data_file.read_text() + json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    changed = build_data(config, tokenizer, say=lambda *a, **k: said.append(str(a[0])))
    assert "reused" not in changed.summary() and len(said) == 2


def test_python_api_trains_generates_and_saves(tiny_model_dir, tmp_path):
    from tunelab import FineTuneConfig, FineTuner

    records = reasoning_problems(24, seed=5)
    config = FineTuneConfig.load(None, [
        f"model.name={tiny_model_dir}", f"output.dir={tmp_path}", "output.name=api", "training.max_steps=2",
        "training.batch_size=4", "training.gradient_accumulation_steps=1", "lora.r=2",
    ])
    tuner = FineTuner(config)
    with pytest.raises(TunelabError, match="not been trained"):
        tuner.generate("hi")
    result = tuner.train(records[:20], eval_data=records[20:])
    assert result.state.global_step == 2 and result.eval_loss is not None
    text = tuner.generate("What is 2 + 2?", max_new_tokens=5)
    assert isinstance(text, str)
    saved = tuner.save(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "chat_template.jinja").is_file()


def _tunelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_train_with_flags_only(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "runs" / "flags"
    result = _tunelab("train", "--model", str(tiny_model_dir), "--data", str(train_file), "--method", "dora",
                      "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--max-steps", "2",
                      "--output", str(out), "lora.r=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done 2 steps" in result.stdout
    config = (out / "config.yaml").read_text()
    assert "method: dora" in config and "learning_rate: 0.001" in config and "r: 2" in config
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_cli_train_bad_inputs_give_one_clear_message(tiny_model_dir, tmp_path):
    missing = _tunelab("train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nope.jsonl" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "x"\n')
    broken = _tunelab("train", "--model", str(tiny_model_dir), "--data", str(bad), cwd=tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert f"{bad}:2:" in broken.stderr.replace("\n", "")
    no_data = _tunelab("train", "--model", str(tiny_model_dir), cwd=tmp_path)
    assert no_data.returncode == 2 and "data.train is not set" in no_data.stderr
    assert not (tmp_path / "runs").exists()  # failed runs leave no half-made run folder


@pytest.mark.real_model
def test_real_model_few_steps_on_gsm8k_lowers_eval_loss_and_still_stops(gsm8k_dir, tmp_path):
    """The bundled SmolLM2-135M-Instruct, LoRA, a few steps on real GSM8K problems."""
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join((gsm8k_dir / "test.jsonl").read_text().splitlines()[:8]) + "\n")
    config = load_config(None, [
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}", f"output.dir={tmp_path}",
        "output.name=real", "training.batch_size=4", "training.gradient_accumulation_steps=1", "training.max_steps=6",
        "training.learning_rate=1e-3", "training.warmup_steps=0", "training.logging_steps=1", "lora.dropout=0.0",
        "training.precision=fp32",
    ])
    result = train(config, quiet=True)
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.02, evals

    model, tokenizer = load_for_inference(str(result.run_dir), dtype="fp32", device="cpu")
    question = json.loads(lines[100])["question"]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=200, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.decode(new_tokens)
    assert "####" in tokenizer.decode(new_tokens)  # picked up GSM8K's answer format
