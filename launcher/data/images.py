"""Folders of images, one sub-folder per class (the layout torchvision's ImageFolder,
Keras and DALI's ``fn.readers.file(file_root=...)`` all read): ``scan_image_folder``
lists them without opening a file.

Classes are the sub-folder names in sorted order, so label ``i`` means the same class on
every machine and for every loader; files are sorted too, so row ``n`` is the same image
everywhere and a split of the rows is a split of the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""What a class folder may hold: the formats every loader here decodes."""


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    files: tuple[str, ...]
    """Paths relative to ``root``, sorted; row n of the dataset is files[n]."""
    labels: np.ndarray
    """int64 class index of each file."""
    classes: tuple[str, ...]
    """Sub-folder names, sorted: label i is classes[i]."""

    def paths(self, rows: np.ndarray | None = None) -> list[str]:
        """Absolute paths of ``rows`` (all rows when None), in that order."""
        picked = self.files if rows is None else [self.files[r] for r in rows]
        return [str(self.root / f) for f in picked]


def scan_image_folder(path: str) -> ImageFolder:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{path!r} is not a directory of class folders", key="data.path")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UsageError(f"{path!r} holds {len(classes)} class folder(s); a classifier needs two "
                         "or more (root/<class>/<image>.jpg)", key="data.path")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(str(p.relative_to(root)) for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise UsageError(f"class folder {name!r} under {path!r} holds no "
                             f"{'/'.join(IMAGE_SUFFIXES)} files", key="data.path")
        files += found
        labels += [label] * len(found)
    return ImageFolder(root.resolve(), tuple(files), np.asarray(labels, dtype=np.int64), tuple(classes))

