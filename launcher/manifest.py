"""A checkpoint's manifest, manifest.json: every file's path, size and sha256, written
before the checkpoint is renamed into place; and the check of a checkpoint against it.

    {"files": [{"path": "engine/deepspeed/mp_rank_00_model_states.pt",
                "size": 10640, "sha256": "9f2c..."}, ...]}

Cost: sha256 reads every byte once, at 1.8 GB/s on one core of the 2-core development
machine (SHA-NI; 0.9 GB/s when both cores are busy): about 6 s for a 10 GB checkpoint,
paid by rank 0 when the checkpoint is written (its files still in the page cache) and
when a run resumes from it. Files are hashed on up to 8 threads (hashlib releases the
GIL), so a checkpoint of several files (ZeRO writes one per rank) goes faster where
cores are free. No torch here: `dlaunch plan` checks an `init_from` checkpoint with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
NO_MANIFEST = f"{MANIFEST}: missing"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # in chunks, without the GIL


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(checkpoint: Path) -> None:
    """List every file under ``checkpoint`` in its manifest.json."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = [{"path": str(p.relative_to(checkpoint)), "size": p.stat().st_size, "sha256": digest}
               for p, digest in zip(files, _hash_all(files), strict=True)]
    (checkpoint / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify(checkpoint: Path, *, hashes: bool = True) -> list[str]:
    """What is wrong with ``checkpoint``, one `file: what` each; [] when every file its
    manifest lists is there with its size and (``hashes``) its sha256, and its trainer
    state parses. A checkpoint without a manifest gets NO_MANIFEST (see `loadable`)."""
    problems = []
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE}: missing")
    except (ValueError, UnicodeDecodeError):
        problems.append(f"{TRAINER_STATE}: not JSON")
    try:
        entries = json.loads((checkpoint / MANIFEST).read_text())["files"]
        listed = [(e["path"], int(e["size"]), str(e["sha256"])) for e in entries]
    except FileNotFoundError:
        return [NO_MANIFEST, *problems]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return [f"{MANIFEST}: unreadable", *problems]
    whole = []
    for name, size, digest in listed:
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{name}: {path.stat().st_size} bytes, {size} in the manifest")
        else:
            whole.append((path, name, digest))
    if hashes:
        found = _hash_all([path for path, _, _ in whole])
        problems += [f"{name}: sha256 mismatch" for (_, name, digest), actual in zip(whole, found, strict=True)
                     if actual != digest]
    return problems


def loadable(problems: list[str]) -> bool:
    """Whether a checkpoint with these problems may be loaded: one with none, and one
    whose only problem is that it has no manifest. dlaunch wrote checkpoints atomically
    before it wrote manifests too, so such a checkpoint is whole unless its files were
    damaged since; refusing it would strand every run started before an upgrade. It is
    loaded with a warning that it could not be verified."""
    return problems in ([], [NO_MANIFEST])
