"""After training: merge adapters and export verified artifacts (hf, gguf, onnx, torchscript).

    merge_model(source, out, dtype)                    -> a plain Hugging Face model directory
    export_model(source, fmt, out, quantize=...)       -> an export folder

Every export folder holds the artifact, `export.json` (format, source, dtype /
quantization, file sizes, verification numbers, tunelab version) and a README saying how
to load it in its runtime. An artifact that does not reproduce the source's logits within
the stated tolerance (`tunelab.export.verify`) is an error and is not published.

The modules: `merge` (load any source as one merged fp32 model), `verify`, `folder`
(temp folder -> export.json + README -> rename), and one per format: `hf`, `gguf`,
`onnx` (+ `onnx_runtime` to run it), `torchscript`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError

FORMATS = ("hf", "gguf", "onnx", "torchscript")


def _name(source: str) -> str:
    from tunelab.models import DEFAULT_MODEL, BUNDLED_NAME

    if source in (None, DEFAULT_MODEL):
        return BUNDLED_NAME
    path = Path(source)
    if path.name in ("final",) or path.name.startswith("step-"):
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return (path.stem if path.suffix == ".gguf" else path.name) or source.replace("/", "-")


def _run_dir(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if (path / "final").is_dir() and (path / "config.yaml").is_file() else None


def default_output(source: str, label: str) -> Path:
    """RUN/export/LABEL for a run folder, else ./export/NAME-LABEL."""
    run = _run_dir(source)
    if run is not None:
        return run / "export" / label
    return Path("export") / f"{_name(source)}-{label}"


def _parameter_bytes(model: torch.nn.Module, bytes_per_weight: float) -> int:
    return int(sum(p.numel() for p in model.parameters()) * bytes_per_weight) + (64 << 20)


def merge_model(source: str, out: str | Path | None = None, *, dtype: str = "auto", overwrite: bool = False,
                qlora_base: str = "original") -> tuple[Path, dict]:
    """Merge a run's / adapter's LoRA or DoRA into its base; write a plain HF directory; verify it.

    A model that is not an adapter is written as is (a format conversion). `qlora_base` (QLoRA
    runs): "original" merges into the full-precision base, "dequantized" into dequant(NF4(W)).
    Returns the directory and its export.json contents.
    """
    from tunelab.export import folder, hf
    from tunelab.export.merge import describe_source, resolve_merge_dtype

    from tunelab.console import console

    if out is None:
        run = _run_dir(source)
        out = run / "merged" if run is not None else Path(f"{_name(source)}-merged")
    out = Path(out)
    folder.check_destination(out, overwrite=overwrite, needed_bytes=0)
    loaded = _load(source, qlora_base=qlora_base)
    target = resolve_merge_dtype(dtype, loaded)
    folder.check_destination(out, overwrite=overwrite, needed_bytes=_parameter_bytes(loaded.model, torch.finfo(target).bits // 8))
    if loaded.method == "qlora":
        into = "dequant(NF4(W)), as trained" if qlora_base == "dequantized" else "the base loaded unquantized (fp32)"
        console.print(f"QLoRA run: the adapter is merged into {into}, never into 4-bit weights", highlight=False)
    from tunelab.console import status

    from tunelab.export import classifier

    is_classifier = loaded.task == "classification"
    with folder.building(out) as tmp:
        with status(f"Writing the merged model ({hf.DTYPE_NAMES[target]}) to {out}"):
            (hf.save_in_dtype if is_classifier else hf.write_merged)(loaded, tmp, target)  # a classifier generates nothing
        numbers = (classifier.verify_directory if is_classifier else hf.verify_directory)(loaded, tmp, target)
        info = {
            "format": "hf", "task": loaded.task, "source": describe_source(loaded), "dtype": hf.DTYPE_NAMES[target],
            "parameters": sum(p.numel() for p in loaded.model.parameters()), "verification": numbers,
        }
        from tunelab import __version__
        from tunelab.export.verify import format_numbers

        readme = (classifier.README if is_classifier else hf.README).format(
            name=_name(source), dtype=hf.DTYPE_NAMES[target], source=source, version=__version__, path=out,
            numbers=format_numbers(numbers), labels=", ".join(numbers.get("labels", [])),
        )
        info = folder.finish(tmp, out, info=info, readme=readme)
    return out, info


def export_model(
    source: str,
    fmt: str,
    out: str | Path | None = None,
    *,
    quantize: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    adapter_only: bool = False,
    qlora_base: str = "original",
) -> tuple[Path, dict]:
    """Export a run / adapter / model to one format, verified; returns the folder and its export.json."""
    from tunelab.export import gguf as gguf_format
    from tunelab.export import onnx as onnx_format

    if fmt not in FORMATS:
        raise TunelabError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        quantize = quantize or "f16"
        if quantize not in gguf_format.TYPES:
            raise TunelabError(f"--quantize {quantize!r} is not a GGUF type; choose one of {', '.join(gguf_format.TYPES)}")
        from tunelab.export import llamacpp

        if gguf_format.needs_llama_cpp(quantize) and llamacpp.version() is None:
            raise TunelabError(
                f"--quantize {quantize} is made by llama.cpp's quantizer, and llama-cpp-python is not installed\n"
                "  fix: pip install 'tunelab[gguf]' (builds llama.cpp, a few minutes), or choose f16 or q8_0"
            )
    elif fmt == "onnx":
        if quantize not in (None, *onnx_format.QUANTIZATIONS):
            raise TunelabError(f"--quantize {quantize!r} is not available for ONNX; choose {', '.join(onnx_format.QUANTIZATIONS)} or leave it out")
    elif quantize is not None:
        raise TunelabError(f"--quantize is for gguf ({', '.join(gguf_format.TYPES)}) and onnx (int8, int4), not --format {fmt}")
    if adapter_only and fmt != "hf":
        raise TunelabError("--adapter-only goes with --format hf")
    from tunelab.models import is_classifier

    if is_classifier(source):
        from tunelab.export.classifier import check_format

        check_format(source, fmt)
    label = fmt + (f"-{quantize}" if quantize and not (fmt == "gguf" and quantize == "f16") else "")
    out = Path(out) if out is not None else default_output(source, label)
    if fmt == "hf" and not adapter_only:
        return merge_model(source, out, dtype=dtype, overwrite=overwrite, qlora_base=qlora_base)
    if fmt == "hf":
        return _export_adapter(source, out, overwrite=overwrite)
    from tunelab.export import folder
    from tunelab.export.merge import load_source

    folder.check_destination(out, overwrite=overwrite, needed_bytes=0)
    loaded = load_source(source, qlora_base=qlora_base)
    if fmt == "gguf":
        gguf_format.check_supported(loaded.model, quantize)  # before any writing
    bytes_per_weight = 4 + (1 if quantize else 0)
    if fmt == "gguf":
        bytes_per_weight = gguf_format.BYTES_PER_WEIGHT[quantize] + (
            gguf_format.INTERMEDIATE_BYTES_PER_WEIGHT if gguf_format.needs_llama_cpp(quantize) else 0)
    folder.check_destination(out, overwrite=overwrite, needed_bytes=_parameter_bytes(loaded.model, bytes_per_weight))
    with folder.building(out) as tmp:
        if fmt == "gguf":
            info, readme_fields = _gguf(loaded, tmp, quantize, _name(source))
        elif fmt == "onnx":
            info, readme_fields = _onnx(loaded, tmp, quantize)
        else:
            info, readme_fields = _torchscript(loaded, tmp)
        from tunelab import __version__
        from tunelab.export.merge import describe_source
        from tunelab.export.verify import format_numbers

        info = {"format": fmt, "source": describe_source(loaded), **info,
                "parameters": sum(p.numel() for p in loaded.model.parameters())}
        readme = readme_fields.pop("template").format(
            name=_name(source), source=source, version=__version__, path=out,
            numbers=format_numbers(info["verification"]), **readme_fields,
        )
        info = folder.finish(tmp, out, info=info, readme=readme)
    return out, info


def _export_adapter(source: str, out: Path, *, overwrite: bool) -> tuple[Path, dict]:
    """Copy the adapter files as they are: no base is loaded (an 8B base would cost 32 GB in fp32 for a copy).

    Nothing is merged, so there is nothing to verify; export.json says so.
    """
    import json

    from tunelab import __version__
    from tunelab.export import classifier, folder, hf
    from tunelab.models import RUN_META_FILE, resolve_weights_dir

    folder.check_destination(out, overwrite=overwrite, needed_bytes=64 << 20)
    path = Path(source).expanduser()
    weights_dir = resolve_weights_dir(source) if path.is_dir() else None
    if weights_dir is None or not (weights_dir / "adapter_config.json").is_file():
        raise TunelabError(f"--adapter-only needs a LoRA/DoRA run or adapter; {source} is a full model")
    adapter_config = json.loads((weights_dir / "adapter_config.json").read_text())
    meta_path = weights_dir / RUN_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    task = meta.get("task", "causal_lm")
    method = meta.get("method") or ("dora" if adapter_config.get("use_dora") else "lora")
    base = adapter_config.get("base_model_name_or_path") or meta.get("base_model")
    template = classifier.ADAPTER_README if task == "classification" else hf.ADAPTER_README
    with folder.building(out) as tmp:
        hf.copy_adapter(weights_dir, tmp)
        info = {"format": "hf-adapter", "task": task,
                "source": {"path": source, "kind": "adapter", "base_model": base, "method": method, "adapter": str(weights_dir)},
                "verification": {"note": "the adapter files are copied byte for byte; nothing is merged or recomputed"}}
        readme = template.format(name=_name(source), method=method, source=source, version=__version__,
                                 base=base, path=out, labels=meta.get("labels", []))
        info = folder.finish(tmp, out, info=info, readme=readme)
    return out, info


def _load(source: str, *, qlora_base: str = "original"):
    """Any source as one merged fp32 model (`export.merge.Source`); classifier runs by their own loader."""
    from tunelab.export.classifier import load_classifier_source
    from tunelab.export.merge import load_source
    from tunelab.models import is_classifier

    return load_classifier_source(source) if is_classifier(source) else load_source(source, qlora_base=qlora_base)


def _save_runtime_files(loaded, directory: Path) -> None:
    """config.json, generation_config.json (end-of-turn EOS) and the tokenizer beside an artifact."""
    from tunelab.models import end_of_turn_ids

    loaded.model.config.save_pretrained(directory)
    generation = loaded.model.generation_config
    generation.eos_token_id = end_of_turn_ids(loaded.tokenizer)
    generation.pad_token_id = loaded.tokenizer.pad_token_id
    generation.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)


def _gguf(loaded, tmp: Path, quantize: str, name: str) -> tuple[dict, dict]:
    """Write the GGUF (f16 first where llama.cpp's quantizer makes the type), verify it, add a Modelfile."""
    from tunelab.console import progress, status
    from tunelab.export import gguf as gguf_format
    from tunelab.export import llamacpp

    file = gguf_format.file_name(name, quantize)
    quantized = gguf_format.needs_llama_cpp(quantize)
    written = tmp / (gguf_format.file_name(name, "f16") if quantized else file)
    with progress() as bar:
        task = bar.add_task(f"Writing GGUF {'f16' if quantized else quantize}", total=gguf_format.tensor_count(loaded))
        details = gguf_format.write_gguf(loaded, written, "f16" if quantized else quantize, on_tensor=lambda: bar.advance(task))
    runtime = llamacpp.version() or "transformers (llama-cpp-python is not installed)"
    info: dict = {"file": file, "quantization": quantize, "dtype": quantize, "legacy": quantize in gguf_format.LEGACY_TYPES}
    if quantized:
        with status(f"Verifying the f16 file with {runtime}"):
            info["verification_f16"] = gguf_format.verify_gguf(loaded, written, "f16")
        with status(f"Quantizing to {quantize.upper()} with llama.cpp's quantizer (llama_model_quantize)"):
            llamacpp.quantize(written, tmp / file, gguf_format.QUANTIZED_TYPES[quantize])
        written.unlink()
        details["quantized_by"] = f"llama_model_quantize, {llamacpp.version()}"
    details["tensor_types"] = gguf_format.tensor_types(tmp / file)
    with status(f"Verifying with {runtime}: tokenization, logits, greedy answers, perplexity"):
        numbers = gguf_format.verify_gguf(loaded, tmp / file, quantize)
    info.update(gguf=details, verification=numbers, verified_by=numbers["verified_by"])
    text, info["ollama"] = gguf_format.modelfile(loaded, file, name, _run_system_prompt(loaded))
    (tmp / "Modelfile").write_text(text)
    chat = numbers.get("chat_template") or {}
    chat_note = ("it renders this run's prompts exactly" if chat.get("llama_cpp_builtin_identical") else
                 "it does not render this run's prompts exactly, so pass --jinja" if chat.get("present") else
                 "this run was trained on plain text and the file has no chat template")
    quantized_note = ("\n`--quantize q4_0` / `q5_0` are legacy llama.cpp types; the K-quants (q4_k_m, q5_k_m, q6_k) are "
                      "smaller at equal quality.\n" if info["legacy"] else "")
    return info, {"template": gguf_format.README, "quantize_label": quantize.upper(), "file": file,
                  "verified_by": numbers["verified_by"], "chat_note": chat_note, "quantized_note": quantized_note}


def _run_system_prompt(loaded) -> str | None:
    """The system prompt the run was trained with (`data.system_prompt` of its config.yaml), if any."""
    import yaml

    if loaded.run_config is None:
        return None
    data = (yaml.safe_load(loaded.run_config.read_text()) or {}).get("data") or {}
    return data.get("system_prompt") or None


def _onnx(loaded, tmp: Path, quantize: str | None) -> tuple[dict, dict]:
    import shutil

    from tunelab.console import status
    from tunelab.export import onnx as onnx_format
    from tunelab.export.verify import format_numbers

    _save_runtime_files(loaded, tmp)
    with status("Exporting to ONNX with torch.onnx.export(dynamo=True), KV cache in and out"):
        details = onnx_format.export_onnx(loaded, tmp / onnx_format.MODEL_FILE)
    onnx_format.write_genai_config(loaded, tmp)
    (tmp / "export.json").write_text('{"format": "onnx"}\n')  # lets OnnxCausalLM read the folder while verifying
    with status("Verifying fp32 with ONNX Runtime and onnxruntime-genai: logits and greedy answers with the KV cache"):
        fp32_numbers = onnx_format.verify_onnx(loaded, tmp, quantization=None)
    info = {"file": onnx_format.MODEL_FILE, "dtype": "float32", "quantization": None, "onnx": details, "verification": fp32_numbers}
    if quantize in onnx_format.QUANTIZATIONS:
        bits = {"int8": 8, "int4": 4}[quantize]
        fp32_dir = tmp / "fp32"
        fp32_dir.mkdir()
        for path in list(tmp.iterdir()):
            if path.name.startswith(onnx_format.MODEL_FILE):
                shutil.move(str(path), fp32_dir / path.name)
        with status(f"Quantizing weights to {quantize} (ONNX Runtime MatMulNBits, blocks of 32)"):
            details["quantization"] = onnx_format.quantize_weights(fp32_dir / onnx_format.MODEL_FILE, tmp / onnx_format.MODEL_FILE, bits)
        shutil.rmtree(fp32_dir)
        (tmp / "export.json").write_text(f'{{"format": "onnx", "quantization": "{quantize}"}}\n')
        with status(f"Verifying {quantize} with ONNX Runtime and onnxruntime-genai: top-1 and greedy-answer agreement"):
            numbers = onnx_format.verify_onnx(loaded, tmp, quantization=quantize)
        info.update(dtype=f"{quantize} weights in blocks of 32, int8 compute", quantization=quantize, verification=numbers,
                    verification_fp32=fp32_numbers)
    layers, kv_heads, head_dim = onnx_format.cache_shape(loaded.model.config)
    quantized_note = ("\n\nThe weights are MatMulNBits (a com.microsoft operator): this file runs in ONNX Runtime only. "
                      f"Measured against PyTorch fp32: {format_numbers(info['verification'])}." if quantize else "")
    return info, {"template": onnx_format.README, "precision": quantize or "fp32", "opset": onnx_format.OPSET,
                  "kv_heads": kv_heads, "head_dim": head_dim, "layers": layers, "quantized_note": quantized_note}


def _torchscript(loaded, tmp: Path) -> tuple[dict, dict]:
    from tunelab.console import status
    from tunelab.export import torchscript

    _save_runtime_files(loaded, tmp)
    with status("Tracing the logits module (torch.jit.trace)"):
        traced = torchscript.write_torchscript(loaded, tmp)
    traced["verification"] = torchscript.verify_torchscript(loaded, tmp)
    with status("Exporting the logits module (torch.export, dynamic batch and sequence)"):
        exported = torchscript.write_exported(loaded, tmp)
    exported["verification"] = torchscript.verify_exported(loaded, tmp)
    info = {"file": torchscript.EXPORTED_FILE, "dtype": "float32", "quantization": None, "torchscript": traced,
            "torch_export": exported, "verification": exported["verification"], "preferred": torchscript.EXPORTED_FILE}
    return info, {"template": torchscript.README}
