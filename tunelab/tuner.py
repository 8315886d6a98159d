"""The Python API: a config object and a tuner that trains, saves and generates.

    from tunelab import FineTuneConfig, FineTuner

    config = FineTuneConfig.load("configs/lora.yaml", ["training.epochs=1"])
    # or flat keywords: FineTuneConfig(model_name="default", num_epochs=1, batch_size=4,
    #                                  learning_rate=2e-4, lora_r=8, lora_alpha=16, max_seq_length=512)
    tuner = FineTuner(config)
    tuner.train("data/train.jsonl", eval_data="data/eval.jsonl")
    print(tuner.generate("What is 12 * 7?"))
    tuner.save("my-adapter")

It drives the same recipe as `tunelab train`, so the run folder is written as usual.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, apply_override, build_config, load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.train import TrainResult, train

# Flat keyword names people know from other fine-tuning APIs -> the config key they set.
FLAT_KEYS = {
    "model_name": "model.name",
    "num_epochs": "training.epochs",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "learning_rate": "training.learning_rate",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay",
    "max_steps": "training.max_steps",
    "precision": "training.precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "seed": "training.seed",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "max_seq_length": "data.max_seq_length",
    "train_data": "data.train",
    "eval_data": "data.eval",
    "output_dir": "output.dir",
}


def nest_flat_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`{"num_epochs": 3, "lora": {...}}` -> `{"training": {"epochs": 3}, "lora": {...}}`.

    A setting given both flat and nested is an error, not a silent pick.
    """
    nested = {k: v for k, v in values.items() if k not in FLAT_KEYS}
    conflicts = []
    for flat, dotted in FLAT_KEYS.items():
        if flat not in values:
            continue
        section, key = dotted.split(".")
        if isinstance(nested.get(section), dict) and key in nested[section]:
            conflicts.append(f"{flat}: also given as {dotted}; keep one of them")
            continue
        if isinstance(nested.get(section), RunConfig.model_fields[section].annotation):
            nested[section] = nested[section].model_dump()
        apply_override(nested, dotted, values[flat])
    if conflicts:
        raise ConfigError(conflicts)
    return nested


class FineTuneConfig(RunConfig):
    """`RunConfig` built from sections or flat keywords, plus a file loader.

    `FineTuneConfig(model_name=..., num_epochs=3, batch_size=8, learning_rate=2e-4, lora_r=8,
    lora_alpha=16, max_seq_length=512)` sets `model.name`, `training.epochs`, ... (see
    `FLAT_KEYS`); sections work too (`training={"epochs": 3}`). Problems raise one ConfigError
    listing each with its key and a did-you-mean. `FineTuneConfig.load(path, overrides)` reads a file.
    """

    def __init__(self, **values: Any):
        super().__init__(**build_config(nest_flat_keys(values)).model_dump())

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> FineTuneConfig:
        return cls.model_validate(load_config(path, overrides).model_dump())


DataArg = str | Path | list[dict[str, Any]] | None


class FineTuner:
    """Fine-tune one model: `train(train_data, eval_data)`, then `generate(prompt)` and `save(path)`."""

    def __init__(self, config: RunConfig | None = None):
        self.config = config if config is not None else FineTuneConfig()
        self.result: TrainResult | None = None

    def train(self, train_data: DataArg = None, eval_data: DataArg = None) -> TrainResult:
        """Train on a data path (file, directory, hub id) or a list of records; returns the result."""
        config = self.config.model_copy(deep=True)
        with tempfile.TemporaryDirectory(prefix="tunelab-data-") as tmp:
            if train_data is not None:
                config.data.train = _as_source(train_data, Path(tmp) / "train.jsonl")
            if eval_data is not None:
                config.data.eval = _as_source(eval_data, Path(tmp) / "eval.jsonl")
            self.result = train(config)
        return self.result

    def _trained(self) -> TrainResult:
        if self.result is None or not self.result.final_dir.is_dir():
            raise TunelabError("this FineTuner has not been trained yet: call train(...) first")
        if self.result.model is None:  # a finished run that train(resume) returned without training again
            from tunelab.generate import load_for_generation

            self.result.model, self.result.tokenizer = load_for_generation(str(self.result.final_dir))
        return self.result

    def save(self, path: str | Path) -> Path:
        """Copy the trained adapter/model (+ tokenizer and chat template) to `path`."""
        result = self._trained()
        target = Path(path)
        if target.exists():
            raise TunelabError(f"{target} already exists; choose a new path")
        shutil.copytree(result.final_dir, target)
        return target

    save_model = save  # the seed's name for `save`

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, max_length: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, system: str | None = None) -> str:
        """Answer (or, for a run trained on plain text, continue) one prompt with the trained model.

        Prompts are rendered as in training: through the run's chat template for chat data,
        as raw text for plain-text data. Length: `max_new_tokens` generated tokens (default
        256), or `max_length` tokens in all, prompt included (as in transformers).
        """
        from tunelab.generate import GenerationSettings, encode_prompt, encode_text, generate_completions, user_messages
        from tunelab.models import trained_prompt_format

        if max_new_tokens is not None and max_length is not None:
            raise TunelabError("give max_new_tokens (generated tokens) or max_length (prompt + generated), not both")
        from tunelab.models import is_classifier

        if self.result is not None and is_classifier(str(self.result.final_dir)):
            raise TunelabError(
                "this run is a classifier (task: classification): it labels text, it does not generate any.\n"
                f"  fix: tunelab predict {self.result.run_dir} --input FILE (or FineTuner with task: causal_lm to generate)"
            )
        result = self._trained()
        model, tokenizer = result.model, result.tokenizer
        model.eval()
        use_template = trained_prompt_format(result.final_dir) == "chat"
        if system and not use_template:
            raise TunelabError("system= needs a chat run; this run was trained on plain text and continues raw text")
        ids = encode_prompt(tokenizer, user_messages(prompt, system)) if use_template else encode_text(tokenizer, prompt)
        if max_length is not None:
            if max_length <= len(ids):
                raise TunelabError(
                    f"max_length={max_length} leaves no room to generate: the prompt alone is {len(ids)} tokens\n"
                    "  fix: a larger max_length, or max_new_tokens=N to count generated tokens only"
                )
            max_new_tokens = max_length - len(ids)
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens if max_new_tokens is not None else 256, temperature=temperature, top_p=top_p
        )
        settings.check()
        return generate_completions(model, tokenizer, [ids], settings, batch_size=1)[0][0].text


def _as_source(data: str | Path | list[dict[str, Any]], spill: Path) -> str:
    """Paths pass through; in-memory records are written to a temporary JSONL file."""
    if isinstance(data, (str, Path)):
        return str(data)
    spill.write_text("".join(json.dumps(record) + "\n" for record in data), encoding="utf-8")
    return str(spill)


LLMFineTuner = FineTuner  # the seed's name for the tuner


def save_model(tuner: FineTuner, path: str | Path) -> Path:
    """The seed's `save_model(tuner, path)`: the same as `tuner.save(path)`."""
    return tuner.save(path)
