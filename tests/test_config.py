"""Config loading, overrides, validation messages, and the example configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.config import RunConfig, config_to_yaml, load_config, suggest_key
from tunelab.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_example_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "lora", "qlora", "full", "dora"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    config = load_config(path)
    assert config.method in ("lora", "dora", "qlora", "full")
    if config.method == "qlora":
        assert config.quantization.bits == 4


def test_defaults_match_the_documented_table():
    c = RunConfig()
    assert c.training.learning_rate == 2e-4
    assert c.training.batch_size == 4
    assert c.training.epochs == 3
    assert c.training.warmup_steps == 100
    assert c.training.weight_decay == 0.01
    assert c.data.max_seq_length == 512
    assert c.training.gradient_accumulation_steps == 2
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 32, 0.1)
    assert c.model.trust_remote_code is False


def test_overrides_parse_to_declared_types():
    c = load_config(None, [
        "training.learning_rate=1e-4", "lora.r=8", "data.packing=true", "training.epochs=5",
        "lora.target_modules=[q_proj,v_proj]", "model.name=HuggingFaceTB/SmolLM2-135M", "training.adam_betas=[0.9,0.95]",
    ])
    assert c.training.learning_rate == 1e-4 and isinstance(c.training.learning_rate, float)
    assert c.lora.r == 8 and isinstance(c.lora.r, int)
    assert c.data.packing is True
    assert c.training.epochs == 5
    assert c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert c.training.adam_betas == (0.9, 0.95)


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 3.0e-4\n  epochs: 2\n")
    c = load_config(path, ["training.epochs=7"])
    assert c.training.learning_rate == 3e-4 and c.training.epochs == 7


def test_json_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"method": "dora", "lora": {"r": 4}}')
    c = load_config(path)
    assert c.method == "dora" and c.lora.r == 4


def test_qlora_implies_4_bits_and_full_rejects_quantization():
    assert load_config(None, ["method=qlora"]).quantization.bits == 4
    with pytest.raises(ConfigError, match="method: full cannot train a quantized base"):
        load_config(None, ["method=full", "quantization.bits=4"])


def test_unknown_keys_suggest_the_right_one():
    assert suggest_key("trainig.lr") == "training.learning_rate"
    assert suggest_key("training.learing_rate") == "training.learning_rate"
    assert suggest_key("lora.rank") == "lora.r"
    assert suggest_key("learning_rate") == "training.learning_rate"  # right key, wrong section


def test_all_problems_reported_at_once_with_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model:\n  name: default\n"
        "trainig:\n  lr: 1e-4\n"
        "training:\n  learning_rate: -3\n  batch_size: four\n"
        "method: qlra\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert f"{path}:4: trainig.lr: unknown key; did you mean 'training.learning_rate'?" in text
    assert f"{path}:6: training.learning_rate: Input should be greater than 0 (got -3)" in text
    assert f"{path}:7: training.batch_size:" in text and "(got 'four')" in text
    assert f"{path}:8: method: Input should be 'lora', 'dora', 'qlora' or 'full' (got 'qlra')" in text


def test_bad_override_is_attributed_to_the_command_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.epochs=0", "lora.dropuot=0.2"])
    text = str(info.value)
    assert "command line: training.epochs: Input should be greater than or equal to 1 (got 0)" in text
    assert "command line: lora.dropuot: unknown key; did you mean 'lora.dropout'?" in text


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training:\n  learning_rate: [1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(path)


def test_resolved_yaml_round_trips():
    c = load_config(None, ["lora.r=4", "method=dora"])
    again = RunConfig.model_validate(yaml.safe_load(config_to_yaml(c)))
    assert again == c


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_typo_file_exits_nonzero_without_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trainig:\n  lr: 1e-4\nlora:\n  rank: 8\n")
    result = _cli("config", "validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip().startswith("- ")]
    assert lines == [
        f"  - {path}:2: trainig.lr: unknown key; did you mean 'training.learning_rate'?",
        f"  - {path}:4: lora.rank: unknown key; did you mean 'lora.r'?",
    ]


def test_cli_show_prints_resolved_config(tmp_path):
    result = _cli("config", "show", "training.learning_rate=5e-5", "lora.r=4")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["training"]["learning_rate"] == 5e-5 and data["lora"]["r"] == 4
    assert data["training"]["batch_size"] == 4


def test_first_override_may_hold_a_path(tmp_path):
    """`tunelab config show model.name=/some/dir ...`: an override whose value is a path is not a config file."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, ["config", "show", f"model.name={tmp_path / 'model'}", "lora.r=4"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["name"] == str(tmp_path / "model") and shown["lora"]["r"] == 4
