"""examples/colab_quickstart.ipynb runs top to bottom (nbclient, a real kernel), and a second
run after a "runtime restart" resumes from the checkpoint on the "Drive" folder.

The Parameters cell is swapped for test values: no pip install (this checkout is on
PYTHONPATH), a local folder in place of Drive, the tiny model, 4 steps, no input boxes.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "colab_quickstart.ipynb"


def execute(nb, work: Path) -> str:
    """Run every cell in a fresh kernel; return all the text the cells printed."""
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or "".join(output.get("data", {}).get("text/plain", "")))
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", "".join(texts))  # `!` runs in a pty: live-bar escapes


def test_notebook_trains_on_the_drive_folder_resumes_after_a_restart_and_chats(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    drive = tmp_path / "drive"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert 'TUNELAB_SOURCE = "git+' in parameters.source and "USE_DRIVE = True" in parameters.source
    parameters.source = "\n".join([
        'TUNELAB_SOURCE = ""', "USE_DRIVE = False", f'WORK_DIR = "{drive}"', f'MODEL = "{tiny_model_dir}"',
        "EXAMPLES = 40", "MAX_STEPS = 4", "SAVE_STEPS = 2", "INTERACTIVE = False",
        'EXTRA = "training.precision=fp32 training.batch_size=4 data.max_seq_length=128 training.logging_steps=1"',
    ])
    run_dir = drive / "runs" / "colab"

    first = execute(copy.deepcopy(nb), tmp_path)
    assert "Traceback" not in first and "error:" not in first, first[-3000:]
    assert "done 4 steps" in first and f"final model: {run_dir / 'final'}" in first
    assert (drive / "data" / "train.jsonl").is_file() and (drive / "colab.yaml").is_file()
    assert (run_dir / "checkpoints" / "step-2" / "state.json").is_file()
    assert "model> " in first

    # The runtime died after the step-2 checkpoint: the final model is gone, the checkpoint is on Drive.
    shutil.rmtree(run_dir / "final")
    second = execute(copy.deepcopy(nb), tmp_path)  # a new kernel: the restarted runtime
    assert "Traceback" not in second and "error:" not in second, second[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2'} (step 2" in second.replace("\n", "")
    assert "step 0: eval_loss" in first and "step 0: eval_loss" not in second  # no fresh start the second time
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
