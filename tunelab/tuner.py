"""The Python API: a config object and a tuner that trains, saves and generates.

    from tunelab import FineTuneConfig, FineTuner

    config = FineTuneConfig.load("configs/lora.yaml", ["training.epochs=1"])
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

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.train import TrainResult, train


class FineTuneConfig(RunConfig):
    """`RunConfig` with a loader: `FineTuneConfig.load(path, overrides)`."""

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
        if self.result is None or self.result.model is None:
            raise TunelabError("this FineTuner has not been trained yet: call train(...) first")
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

    def generate(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, system: str | None = None) -> str:
        """Answer one prompt with the trained model, through the run's chat template."""
        from tunelab.generate import GenerationSettings, encode_prompt, generate_completions, user_messages

        result = self._trained()
        model, tokenizer = result.model, result.tokenizer
        model.eval()
        ids = encode_prompt(tokenizer, user_messages(prompt, system))
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
