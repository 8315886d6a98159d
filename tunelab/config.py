"""Run configuration: typed, documented fields; YAML/JSON loading; dotted CLI overrides.

One `RunConfig` describes a whole run. It is loaded from a YAML or JSON file, then
`key=value` overrides are applied (`training.learning_rate=1e-4 lora.r=8`), and every
problem is reported at once with its dotted path, file line, bad value and a fix
(unknown keys get a did-you-mean). Library code never sees this object: the recipe in
`train.py` unpacks it into explicit arguments.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import ConfigError

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Method = Literal["lora", "dora", "qlora", "full"]
Task = Literal["causal_lm", "classification"]


class Section(BaseModel):
    """Base for every config group: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str | None = Field(
        None, description="Hub id, local model directory or .gguf file; unset = bundled SmolLM2-135M-Instruct."
    )
    dtype: Precision = Field(
        "auto",
        description="dtype the base weights are stored in; auto = follow training.precision (bf16 frozen base for "
        "adapters where bf16 is fast, fp32 master weights for full). bf16 with method: full trains in pure bf16.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repo. Off unless you trust it.")


class FieldMapping(Section):
    """Custom format: which record fields hold the prompt, the response and (optionally) a system prompt."""

    prompt: str
    response: str
    system: str | None = None


class DataConfig(Section):
    train: str | None = Field(None, description="Training data: a file, a directory of files, or a hub dataset id.")
    eval: str | None = Field(None, description="Evaluation data; unset = split eval_fraction off the training data.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of train held out for eval (seeded).")
    format: Literal["auto", "text", "alpaca", "dolly", "chat", "sharegpt", "qa", "custom", "preference", "kto"] = Field(
        "auto", description="Record shape; auto = detected per file. preference and kto are read by task: preference."
    )
    fields: FieldMapping | None = Field(None, description="Field mapping for format: custom.")
    hf_config: str | None = Field(None, description="Hub dataset config name.")
    split: str = "train"
    eval_split: str | None = None
    system_prompt: str | None = Field(None, description="System message added to every conversation.")
    chat_template: str | None = Field(None, description="Fallback template name (e.g. chatml) when the tokenizer has none.")
    max_seq_length: int = Field(512, ge=8, description="Tokens per example (and per packed row).")
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: responses only).")
    packing: bool = Field(False, description="Pack several examples per row (attention stays per example).")
    dedupe: bool = Field(True, description="Drop exact duplicate examples.")
    min_tokens: int = Field(0, ge=0, description="Drop examples shorter than this many tokens.")
    limit: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    skip_invalid: bool = Field(False, description="Skip bad records (and report how many) instead of failing.")
    prepared: str | None = Field(None, description="Directory from `tunelab data prepare`, reused when it still matches.")


class ClassificationConfig(Section):
    """task: classification: which record fields hold the text, the optional second text and the label.

    Unset fields are detected from the data (text / sentence / content ..., sentence1 + sentence2,
    premise + hypothesis ..., label / class / category ...).
    """

    text_field: str | None = Field(None, description="Field holding the text to classify; unset = detected.")
    text_pair_field: str | None = Field(None, description="Field holding a second text (pair tasks); unset = detected.")
    label_field: str | None = Field(None, description="Field holding the label (a string or an integer); unset = detected.")


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; all-linear = every linear layer but the output head."
    )


class QuantizationConfig(Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4 or 8 bits (bitsandbytes). qlora implies 4.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype the 4/8-bit layers compute in; auto = the precision plan's compute dtype."
    )


class FullConfig(Section):
    freeze: list[str] = Field(
        default_factory=list,
        description="For method: full, glob patterns of parameter names to keep frozen, e.g. 'model.embed_tokens.*'.",
    )


class TrainingConfig(Section):
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    batch_size: int = Field(4, ge=1, description="Examples (or packed rows) per micro-batch per device.")
    gradient_accumulation_steps: int = Field(2, ge=1)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    warmup_steps: int = Field(100, ge=0)
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps; overrides warmup_steps.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0.0, description="Not applied to norms and biases.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 turns it off.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    precision: Precision = Field("auto", description="Compute precision; auto = bf16 where supported, else fp16 (GPU) / fp32.")
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; unset = at the end of each epoch.")
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps; unset = each epoch's end and every quarter of the run."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest K checkpoints.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evals without improvement.")
    resume: bool | Literal["auto"] = Field(False, description="true/auto: continue from the newest checkpoint of this run.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset = all cores.")
    compile: bool = Field(False, description="torch.compile the model (measure before turning on).")


class EvaluationConfig(Section):
    metrics: list[Literal["loss", "perplexity", "exact_match", "rouge", "bleu", "accuracy"]] = ["loss", "perplexity"]
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1, description="Evaluate at most N eval examples.")
    answer_regex: str | None = Field(None, description="Regex whose group 1 is the answer (exact_match).")


class OutputConfig(Section):
    dir: str = Field("runs", description="Parent folder of run folders.")
    name: str | None = Field(None, description="Run folder name; unset = the config file's name.")
    overwrite: bool = Field(False, description="Replace an existing run folder of a different run.")


class LoggingConfig(Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    project: str = "tunelab"


class RunConfig(Section):
    """A whole fine-tuning run."""

    task: Task = Field("causal_lm", description="causal_lm (generate replies) or classification (text -> label).")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    classification: ClassificationConfig = ClassificationConfig()
    method: Method = "lora"
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationConfig = QuantizationConfig()
    full: FullConfig = FullConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _qlora_means_4bit(self) -> RunConfig:
        if self.method == "qlora" and self.quantization.bits is None:
            self.quantization.bits = 4
        if self.method == "qlora" and self.quantization.bits != 4:
            raise ValueError("method: qlora needs quantization.bits: 4")
        if self.method == "full" and self.quantization.bits is not None:
            raise ValueError("method: full cannot train a quantized base; remove quantization.bits or use qlora")
        if self.data.format == "custom" and self.data.fields is None:
            raise ValueError("data.format: custom needs data.fields (prompt, response, optional system)")
        generated = [m for m in self.evaluation.metrics if m in GENERATION_METRICS]
        if generated and self.task == "classification":
            raise ValueError(
                f"evaluation.metrics: {', '.join(generated)} are generation metrics; a classifier is scored with "
                "accuracy and macro F1 on its eval set automatically; keep evaluation.metrics to loss"
            )
        if generated and self.data.eval is None and self.data.eval_split is None:
            raise ValueError(
                f"evaluation.metrics: {', '.join(generated)} are measured after training on prompt/answer data from "
                "data.eval (or data.eval_split); set one, or keep evaluation.metrics to loss, perplexity"
            )
        if self.task == "classification":
            _check_classification_data(self.data)
        return self


# Metrics that need the model to generate an answer (the rest are teacher-forced).
GENERATION_METRICS = ("exact_match", "rouge", "bleu", "accuracy")


def _check_classification_data(data: DataConfig) -> None:
    """Data keys that shape chat rendering or token packing, which a classifier does not use."""
    if data.format != "auto" or data.fields is not None:
        raise ValueError(
            "task: classification reads a text and a label per record, not a chat format; "
            "remove data.format / data.fields and set classification.text_field / label_field if needed"
        )
    if data.packing:
        raise ValueError("task: classification batches hold one text per row; set data.packing: false")
    if data.prepared is not None:
        raise ValueError(
            "task: classification tokenizes its texts at the start of the run (data prepare stores chat-rendered "
            "token ids); remove data.prepared"
        )


# Abbreviations people type, mapped to the real key, to sharpen the did-you-mean hints.
KEY_ALIASES = {
    "lr": "learning_rate",
    "bs": "batch_size",
    "batch": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "wd": "weight_decay",
    "epoch": "epochs",
    "num_epochs": "epochs",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_length": "max_seq_length",
    "seq_len": "max_seq_length",
    "warmup": "warmup_steps",
    "output_dir": "dir",
}


# Keys copied from transformers (TrainingArguments, from_pretrained), peft (LoraConfig) and
# bitsandbytes (BitsAndBytesConfig) configs: tunelab's key (with the value to give, where the
# meaning differs), so the did-you-mean names it wherever in the config the key was put.
FOREIGN_KEYS = {
    "torch_dtype": "model.dtype (auto, bf16, fp16 or fp32)",
    "model_name_or_path": "model.name",
    "model_name": "model.name",
    "device_map": (
        "tunelab has no such key: it places the model itself (the GPU when there is one, else the CPU); "
        "for several GPUs run `accelerate launch -m tunelab train ...`"
    ),
    "load_in_4bit": "quantization.bits: 4 (or method: qlora)",
    "load_in_8bit": "quantization.bits: 8",
    "bnb_4bit_quant_type": "quantization.quant_type",
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "bnb_4bit_compute_dtype": "quantization.compute_dtype",
    "lora_alpha": "lora.alpha",
    "lora_r": "lora.r",
    "lora_dropout": "lora.dropout",
    "use_dora": "method: dora",
    "num_train_epochs": "training.epochs",
    "per_device_train_batch_size": "training.batch_size",
    "per_device_eval_batch_size": "evaluation.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "lr_scheduler_type": "training.lr_scheduler",
    "optim": "training.optimizer",
    "bf16": "training.precision: bf16",
    "fp16": "training.precision: fp16",
    "report_to": "logging.trackers",
    "output_dir": "output.dir",
    "max_length": "data.max_seq_length",
}


def foreign_key_hint(dotted: str) -> str | None:
    """For a transformers / peft / bitsandbytes key put anywhere (`lora_alpha`, `training.num_train_epochs`):
    what tunelab calls it. None when the leaf is not such a key or already sits where tunelab has it."""
    leaf = dotted.rsplit(".", 1)[-1]
    hint = FOREIGN_KEYS.get(leaf)
    if hint is None or hint.split(" ", 1)[0].rstrip(":") == dotted:
        return None
    return hint


def known_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config may set, e.g. `training.learning_rate`."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += known_keys(annotation, path + ".")
    return keys


def suggest_key(dotted: str) -> str | None:
    """The most likely intended key for an unknown dotted key (`trainig.lr` -> `training.learning_rate`)."""
    keys = known_keys()
    parts = dotted.split(".")
    resolved: list[str] = []
    for depth, part in enumerate(parts):
        prefix = ".".join(resolved) + ("." if resolved else "")
        siblings = [k[len(prefix):] for k in keys if k.startswith(prefix) and k.count(".") == depth]
        if part in siblings:
            resolved.append(part)
            continue
        alias = KEY_ALIASES.get(part)
        if alias in siblings:
            resolved.append(alias)
            continue
        close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
        prefixed = [s for s in siblings if s.startswith(part) or part.startswith(s)] if len(part) >= 3 else []
        if close or prefixed:
            resolved.append((close or prefixed)[0])
            continue
        # The key may sit in the wrong section: look for the leaf anywhere.
        leaf = KEY_ALIASES.get(part, part)
        anywhere = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        return anywhere[0] if anywhere else None
    suggestion = ".".join(resolved)
    return suggestion if suggestion != dotted else None


def _yaml_line_index(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML/JSON document to its 1-based line, for error locations."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    index: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                index[path] = key_node.start_mark.line + 1
                walk(value_node, path + ".")

    if root is not None:
        walk(root, "")
    return index


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML or JSON config file into a dict plus a dotted-key -> line index."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path} (fix: check the path, or run without a config file)"])
    return parse_config_text(path.read_text(encoding="utf-8"), str(path), is_json=path.suffix == ".json")


def parse_config_text(text: str, source: str, *, is_json: bool = False) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse config text (a file's, or an editor's in `tunelab ui`) into a dict plus a line index;
    problems are located as `source:line`."""
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError([f"{source}:{err.lineno}: invalid JSON: {err.msg}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError([f"{where}: invalid YAML: {getattr(err, 'problem', err)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the config must be a mapping of sections (model:, data:, training: ...)"])
    return data, _yaml_line_index(text)


def parse_override(item: str) -> tuple[str, Any]:
    """`training.learning_rate=1e-4` -> ("training.learning_rate", "1e-4"); values are YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError([f"override '{item}' is not key=value (e.g. training.learning_rate=1e-4)"])
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key inside nested dicts, creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _leaf_paths(value: Any, prefix: str) -> list[str]:
    """Dotted paths of the leaves under an unknown key, so each gets its own did-you-mean."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}.{k}")]
    return [prefix]


def _format_error(error: dict[str, Any], lines: dict[str, int], source: str | None, overridden: set[str]) -> list[str]:
    """One line per problem: `file:line: dotted.key: what is wrong (got X)`, plus a fix when known."""
    # Drop pydantic's union-branch tags such as `list[str]` / `literal['all-linear']`.
    loc = [str(p) for p in error["loc"] if not any(c in str(p) for c in "[]'")]
    dotted = ".".join(loc)

    def where(path: str) -> str:
        if path in overridden:
            return "command line: "
        if source and path in lines:
            return f"{source}:{lines[path]}: "
        return f"{source}: " if source else ""

    if error["type"] == "extra_forbidden":
        problems = []
        for path in _leaf_paths(error.get("input"), dotted):
            foreign = foreign_key_hint(path)
            suggestion = suggest_key(path)
            if foreign is not None and foreign.startswith("tunelab has no"):
                hint = f" (a transformers/peft/bitsandbytes name); {foreign}"
            elif foreign is not None:
                hint = f" (a transformers/peft/bitsandbytes name); tunelab's key is {foreign}"
            else:
                hint = f"; did you mean '{suggestion}'?" if suggestion else "; `tunelab config show` lists the keys"
            problems.append(f"{where(path)}{path}: unknown key{hint}")
        return problems
    message = error["msg"].removeprefix("Value error, ")
    if not dotted:
        return [f"{where('')}{message}"]
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    return [f"{where(dotted)}{dotted}: {message}{got_text}"]


def build_config(
    data: dict[str, Any],
    overrides: list[str] | None = None,
    *,
    source: str | None = None,
    lines: dict[str, int] | None = None,
) -> RunConfig:
    """Validate a config dict plus overrides; raise one ConfigError listing every problem."""
    data = json.loads(json.dumps(data))  # deep copy; the caller's dict stays untouched
    overridden = set()
    for item in overrides or []:
        key, value = parse_override(item)
        apply_override(data, key, value)
        overridden.add(key)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            for line in _format_error(e, lines or {}, source, overridden):
                if line not in problems:
                    problems.append(line)
        raise ConfigError(sorted(problems, key=_line_number)) from None


def _line_number(problem: str) -> int:
    """Sort key: problems in file order; command-line and unlocated ones after."""
    head = problem.split(": ", 1)[0]
    number = head.rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 1_000_000


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a YAML/JSON file (or defaults when None) and apply overrides."""
    if path is None:
        return build_config({}, overrides)
    data, lines = read_config_file(path)
    return build_config(data, overrides, source=str(path), lines=lines)


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder's config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
