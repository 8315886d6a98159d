"""Tokenize once, reuse many times: `tunelab data prepare` output and its fingerprint.

A prepared directory holds the tokenized train/eval examples (`train.jsonl`,
`eval.jsonl`: ids, labels, origin) and `manifest.json` with a fingerprint of
everything that decides them: the data arguments, the tokenizer (vocabulary, special
tokens, chat template) and each source file's size and modification time. Training
reuses the directory only when its fingerprint matches; otherwise it says why and
tokenizes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.data.dataset import TrainingData
from tunelab.data.render import TokenizedExample
from tunelab.data.records import DataStats, Location

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the serialized tokenizer, special tokens and chat template."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()


def _source_stamp(source: str | None) -> Any:
    """Size and mtime of a local file (or of every file in a directory); hub ids stand for themselves."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        return [_source_stamp(str(p)) for p in sorted(path.rglob("*")) if p.is_file()]
    return source


def data_fingerprint(data_args: dict[str, Any], tokenizer) -> str:
    """Fingerprint of `build_datasets` arguments (sources stamped by size/mtime) plus the tokenizer."""
    stamped = dict(data_args)
    stamped["train_source"] = _source_stamp(data_args.get("train_source"))
    stamped["eval_source"] = _source_stamp(data_args.get("eval_source"))
    payload = json.dumps(stamped, sort_keys=True, default=str) + tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(payload.encode()).hexdigest()


def _example_row(example: TokenizedExample) -> str:
    source = example.source
    return json.dumps({
        "input_ids": example.input_ids, "labels": example.labels, "format": example.format,
        "truncated": example.truncated, "path": source.path, "line": source.line, "index": source.index,
    })


def _example_from_row(line: str) -> TokenizedExample:
    row = json.loads(line)
    return TokenizedExample(
        row["input_ids"], row["labels"], Location(row["path"], row["line"], row["index"]), row["format"], row["truncated"]
    )


def save_prepared(data: TrainingData, directory: Path, fingerprint: str) -> Path:
    """Write the tokenized sets and manifest into `directory` atomically (temp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (tmp / "train.jsonl").write_text("".join(_example_row(x) + "\n" for x in data.train))
        (tmp / "eval.jsonl").write_text("".join(_example_row(x) + "\n" for x in data.eval))
        manifest = {
            "fingerprint": fingerprint, "train_examples": len(data.train), "eval_examples": len(data.eval),
            "summary": data.summary(), "notes": data.notes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_prepared(directory: Path, fingerprint: str, pad_id: int) -> tuple[TrainingData | None, str]:
    """The prepared data if its fingerprint matches, else (None, why not)."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        return None, f"{directory} holds no prepared data (no {MANIFEST}); run `tunelab data prepare`"
    manifest = json.loads(manifest_path.read_text())
    if manifest["fingerprint"] != fingerprint:
        return None, f"{directory} was prepared from other data, settings or tokenizer"
    read = lambda name: [_example_from_row(ln) for ln in (Path(directory) / name).read_text().splitlines() if ln]
    train, held_out = read("train.jsonl"), read("eval.jsonl")
    stats = DataStats(examples=len(train), tokens=sum(len(x) for x in train), trained_tokens=sum(x.num_trained for x in train))
    notes = [f"reused prepared data from {directory}", *manifest.get("notes", [])]
    return TrainingData(train=train, eval=held_out, pad_id=pad_id, train_stats=stats, notes=notes), ""
