"""Checksums of a finished checkpoint: checksums.json in each step directory
holds the sha256 of every other file in it, written once orbax has finalised
the step; a step verifies when every listed file is there with its digest."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKSUMS = "checksums.json"


class DamagedCheckpointError(FileNotFoundError):
    """A checkpoint asked for is not there intact: a file is missing, differs
    from its checksum, or the step has no checksums (its save did not finish)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """Writes step_dir/checksums.json; atomic (a temporary file renamed), so
    a crash leaves either the whole file or none."""
    sums = {name: _sha256(step_dir / name) for name in _files(step_dir)}
    tmp = step_dir / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(sums, indent=0))
    os.replace(tmp, step_dir / CHECKSUMS)


def verify_checksums(step_dir: Path) -> None:
    """Raises DamagedCheckpointError naming the first file that is missing or
    differs from its checksum."""
    listing = step_dir / CHECKSUMS
    try:
        sums = json.loads(listing.read_text())
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{step_dir}: no {CHECKSUMS} (the save did not finish)") from None
    except ValueError:
        raise DamagedCheckpointError(f"{listing}: unreadable") from None
    for name, expected in sums.items():
        path = step_dir / name
        if not path.is_file():
            raise DamagedCheckpointError(f"{path}: missing")
        if _sha256(path) != expected:
            raise DamagedCheckpointError(f"{path}: checksum mismatch")


if __name__ == "__main__":
    # Adopts checkpoints written without checksums (trusting their files as they are):
    # python -m jaxkit.checkpoint.verify RUN_DIR/checkpoints/STEP ...
    import sys
    for arg in sys.argv[1:]:
        write_checksums(Path(arg))
        print(f"{arg}: {CHECKSUMS} written")
