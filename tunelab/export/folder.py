"""Export folders: built in a temporary sibling, described by export.json + README, then renamed.

A reader never sees half an export: the artifact, `export.json` and `README.md` are
written into `.NAME.tmp-*` next to the destination and published with one rename
(`tunelab.checkpoint.publish_directory`). An existing destination is only replaced with
`overwrite`, and only once the new export is complete and verified.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError

EXPORT_FILE = "export.json"


def check_destination(out: Path, *, overwrite: bool, needed_bytes: int) -> None:
    """Refuse an existing destination without `overwrite`, and a disk without room for the export."""
    if out.exists() and not overwrite:
        raise TunelabError(f"{out} already exists\n  fix: pass --overwrite to replace it, or choose another -o DIR")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"{out} exists and is not a directory\n  fix: choose another -o DIR")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise TunelabError(
            f"not enough disk space for the export in {parent}: about {needed_bytes / 2**20:,.0f} MiB needed, "
            f"{free / 2**20:,.0f} MiB free\n  fix: free some space or choose another -o DIR"
        )


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`; removed if the block fails (nothing half-written stays)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sizes(directory: Path) -> dict[str, int]:
    """Bytes of every file in the folder, by relative path."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def finish(tmp: Path, out: Path, *, info: dict, readme: str) -> dict:
    """Write export.json (with file sizes and the tunelab version) and README.md, then publish."""
    from tunelab import __version__
    from tunelab.checkpoint import publish_directory

    (tmp / "README.md").write_text(readme)
    sizes = file_sizes(tmp)
    info = {**info, "files": sizes, "total_bytes": sum(sizes.values()), "tunelab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes folders private; exports are meant to be shared
    publish_directory(tmp, out)
    return info


def read_export_info(directory: Path) -> dict | None:
    """The export.json of an export folder, or None when the folder is not one."""
    path = directory / EXPORT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
