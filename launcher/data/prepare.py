"""``dlaunch data prepare SRC OUT``: a folder of images, a CSV file or a NumPy ``.npz``
turned into Parquet shards with a manifest (``_manifest.json``); ``dlaunch data verify
OUT`` checks them.

Why shards: every rank of a run can then read its own row groups
(``parquet_shards.RowGroups.for_rank``) instead of the whole dataset, and a CSV or npz
becomes a ``data.source: parquet`` directory the loader reads as it is. The manifest
records what was written (rows, columns, classes and their counts, each file's size and
sha256), so that a copy on another machine can be checked before a long run trusts it.

OUT appears complete or not at all: everything is written into a temporary sibling of
OUT, fsynced, then renamed to OUT in one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from launcher.data.images import ImageFolder, scan_image_folder
from launcher.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "dlaunch-shards"
VERSION = 1
MANIFEST = "_manifest.json"
"""Underscore first: pyarrow.dataset, pandas.read_parquet and Spark skip files named
``_*`` (as they skip ``_metadata`` and ``_SUCCESS``), so they read OUT as a Parquet
dataset with the manifest beside the shards."""
LABEL = "label"
"""The label's column in every prepared dataset, whatever the source called it: the
name ``data.label_column`` takes by default."""

ROWS_PER_SHARD = 8192
"""Rows per file. For ImageNet-sized JPEGs (about 110 kB) a shard is about 900 MB, the
size WebDataset and TFRecord pipelines settle on: few enough files to list and open
quickly, small enough to copy and check one at a time."""
ROW_GROUP_ROWS = 1024
"""Rows per row group, the unit a rank reads: about 110 MB of JPEGs (Parquet's advice
is 128 MB), and eight per shard, so that even a small dataset has row groups for every
rank of a mid-sized run."""

SourceKind = Literal["images", "csv", "npz"]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    """Arrow's name of the type: int64, double, float, string, binary."""


@dataclass(frozen=True)
class Shard:
    file: str
    """Relative to the prepared directory: part-00000.parquet, ..."""
    rows: int
    row_groups: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What ``prepare`` wrote; ``_manifest.json`` holds it."""

    source_kind: SourceKind
    source_path: str
    label_source: str | None
    """The CSV column the labels came from (they are in ``label`` now); None otherwise."""
    rows: int
    seed: int | None
    """The seed rows were shuffled with, or None: source order."""
    columns: tuple[Column, ...]
    class_counts: dict[int, int]
    """Rows of each label present: the class balance."""
    class_names: tuple[str, ...] | None
    """Label i is class_names[i] (image folders, string labels); None for integer labels."""
    shape: tuple[int, ...] | None
    """Shape of one npz row before it was flattened into x0..x{F-1}: a recipe's
    ``data.shape``. None for other sources."""
    shards: tuple[Shard, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": {"kind": self.source_kind, "path": self.source_path, "label_column": self.label_source},
            "rows": self.rows,
            "seed": self.seed,
            "columns": [asdict(c) for c in self.columns],
            "classes": {"names": None if self.class_names is None else list(self.class_names),
                        "counts": {str(label): n for label, n in self.class_counts.items()}},
            "shape": None if self.shape is None else list(self.shape),
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} manifest of version {VERSION}: format {data.get('format')!r}, "
                             f"version {data.get('version')!r}")
        source, classes = data["source"], data["classes"]
        return cls(source_kind=source["kind"], source_path=source["path"], label_source=source["label_column"],
                   rows=data["rows"], seed=data["seed"], columns=tuple(Column(**c) for c in data["columns"]),
                   class_counts={int(label): n for label, n in classes["counts"].items()},
                   class_names=None if classes["names"] is None else tuple(classes["names"]),
                   shape=None if data["shape"] is None else tuple(data["shape"]),
                   shards=tuple(Shard(**s) for s in data["shards"]))


@dataclass(frozen=True)
class _Source:
    """Rows to write, fetched a row group at a time by ``take`` so that an image folder
    is never in memory whole."""

    kind: SourceKind
    schema: pa.Schema
    labels: np.ndarray
    """int64 label of every row, in source order."""
    take: Callable[[np.ndarray], pa.Table]
    """The rows at the given source positions, in that order."""
    class_names: tuple[str, ...] | None = None
    label_source: str | None = None
    shape: tuple[int, ...] | None = None


def prepare(source: str, out: str, *, label_column: str = LABEL, rows_per_shard: int = ROWS_PER_SHARD,
            row_group_rows: int = ROW_GROUP_ROWS, seed: int | None = None, overwrite: bool = False) -> Manifest:
    """Write ``source`` as OUT/part-NNNNN.parquet shards and OUT/_manifest.json.

    ``source`` is a folder of class folders of .jpg/.jpeg/.png (rows: ``image``, the
    file's bytes, not decoded; ``label``; ``path``, relative to the folder), a ``.csv``
    (its columns as pyarrow types them, ``label_column`` renamed ``label``), or an
    ``.npz`` with ``x`` (N, ...) and ``y`` (N,) (rows: ``x0``..``x{F-1}`` float32, x
    flattened, and ``label``). Labels are integers 0..C-1, or strings, mapped to the
    index of their class name in sorted order. A CSV or npz is read into memory whole;
    an image folder one row group of files at a time.

    ``seed`` None keeps the source order: rows stay where a person expects them, and a
    time-ordered table keeps its time order (walk_forward validation needs it). A seed
    shuffles rows (reproducibly) before sharding: an image folder is sorted by class, so
    unshuffled each shard and row group holds one or two classes, and a rank that
    streams a few row groups would train on a few classes at a time.

    OUT must not exist, unless ``overwrite``: then an earlier OUT (a directory with a
    _manifest.json) is replaced once the new one is complete."""
    for name, value in (("rows_per_shard", rows_per_shard), ("row_group_rows", row_group_rows)):
        if value < 1:
            raise UsageError(f"must be 1 or more, not {value}", key=name)
    target = Path(out).absolute()
    _check_out(Path(source).absolute(), target, overwrite)
    src = _read_source(Path(source), label_column)
    count = len(src.labels)
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        shards = _write_shards(src, order, staging, rows_per_shard, row_group_rows)
        manifest = _manifest(src, str(Path(source).absolute()), seed, shards)
        _write_json(staging / MANIFEST, manifest.to_json())
        _fsync(staging)
        _swap(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_manifest(out: str) -> Manifest:
    return Manifest.from_json(json.loads((Path(out) / MANIFEST).read_text()))


def verify(out: str) -> list[str]:
    """What is wrong with the prepared directory ``out``, one line each; [] when every
    shard has its manifest size, sha256, rows and row groups and no other .parquet file
    is there (a loader given ``out`` would read it too)."""
    root = Path(out)
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{root / MANIFEST}: cannot read it: {exc}"]
    problems = [problem for shard in manifest.shards for problem in _check_shard(root, shard)]
    listed = {shard.file for shard in manifest.shards}
    problems += [f"{name}: not in the manifest, yet a loader reading {out!r} would read it"
                 for name in sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
                 if name not in listed]
    total = sum(shard.rows for shard in manifest.shards)
    if total != manifest.rows:
        problems.append(f"the shards list {total} rows, the manifest's total is {manifest.rows}")
    return problems


def _check_shard(root: Path, shard: Shard) -> list[str]:
    import pyarrow.parquet as pq

    path = root / shard.file
    if not path.is_file():
        return [f"{shard.file}: missing"]
    size = path.stat().st_size
    if size != shard.bytes:
        return [f"{shard.file}: {size} bytes, the manifest says {shard.bytes}"]
    if _sha256(path) != shard.sha256:
        return [f"{shard.file}: its sha256 is not the manifest's; the file changed"]
    meta = pq.read_metadata(path)
    if (meta.num_rows, meta.num_row_groups) != (shard.rows, shard.row_groups):
        return [f"{shard.file}: {meta.num_rows} rows in {meta.num_row_groups} row groups, the manifest "
                f"says {shard.rows} in {shard.row_groups}"]
    return []


def _check_out(source: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not overwrite:
        raise UsageError(f"{str(target)!r} exists; choose a new directory or pass --overwrite", key="out")
    if not (target / MANIFEST).is_file():
        raise UsageError(f"{str(target)!r} is not a prepared dataset (it has no {MANIFEST}); overwrite "
                         "replaces only those", key="out")
    if source == target or target in source.parents:
        raise UsageError(f"the source {str(source)!r} is inside {str(target)!r}, which overwrite would "
                         "delete", key="out")


def _read_source(path: Path, label_column: str) -> _Source:
    if path.is_dir():
        return _images(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist", key="source")
    if path.suffix.lower() == ".csv":
        return _csv(path, label_column)
    if path.suffix.lower() == ".npz":
        return _npz(path)
    raise UsageError(f"{str(path)!r} is of no type prepare reads: give a folder of class folders, "
                     "a .csv or a .npz", key="source")


def _images(path: Path) -> _Source:
    import pyarrow as pa

    try:
        folder = scan_image_folder(str(path))
    except UsageError as err:
        raise UsageError(err.message, key="source") from None
    schema = pa.schema([("image", pa.binary()), (LABEL, pa.int64()), ("path", pa.string())])
    return _Source("images", schema, folder.labels, partial(_image_rows, folder, schema=schema),
                   class_names=folder.classes)


def _image_rows(folder: ImageFolder, rows: np.ndarray, *, schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    files = [folder.files[r] for r in rows]
    return pa.table([[(folder.root / f).read_bytes() for f in files], folder.labels[rows], files], schema=schema)


def _csv(path: Path, label_column: str) -> _Source:
    import pyarrow as pa
    import pyarrow.csv

    try:
        table = pyarrow.csv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise UsageError(f"cannot read {str(path)!r} as CSV: {exc}", key="source") from None
    if label_column not in table.column_names:
        raise UsageError(f"column {label_column!r} not in {table.column_names}", key="label_column")
    if label_column != LABEL and LABEL in table.column_names:
        raise UsageError(f"the CSV has a column {LABEL!r} besides the label column {label_column!r}; the "
                         f"shards call the label {LABEL!r}: rename or drop the other", key="label_column")
    _check_rows(table.num_rows, path)
    labels, names = _labels(table.column(label_column), label_column)
    position = table.column_names.index(label_column)
    table = table.set_column(position, LABEL, pa.array(labels))
    return _Source("csv", table.schema, labels, table.take, class_names=names, label_source=label_column)


def _npz(path: Path) -> _Source:
    import pyarrow as pa

    x, y = _npz_arrays(path)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"x has shape {x.shape} and y {y.shape}; they need N rows each, y one value a row",
                         key="source")
    shape = x.shape[1:] or (1,)
    if x.dtype.kind not in "biuf" or 0 in shape:
        raise UsageError(f"x holds {x.dtype} of shape {x.shape}; it must hold numbers, at least one a row",
                         key="source")
    _check_rows(len(y), path)
    labels, names = _labels(pa.chunked_array([pa.array(y)]), "y")
    features = np.asfortranarray(x.reshape(len(x), -1), dtype=np.float32)  # each column contiguous
    columns = {f"x{i}": features[:, i] for i in range(features.shape[1])} | {LABEL: labels}
    table = pa.table(columns)
    return _Source("npz", table.schema, labels, table.take, class_names=names, shape=tuple(shape))


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Its x and y, read whole; object arrays are refused (they would need pickle, which
    runs code from the file)."""
    try:
        arrays = np.load(path, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise UsageError(f"{str(path)!r} holds one array, not arrays x and y", key="source")
        with arrays:
            if not {"x", "y"} <= set(arrays.files):
                raise UsageError(f"{str(path)!r} holds arrays {sorted(arrays.files)}; it needs x (N, ...) "
                                 "and y (N,)", key="source")
            return arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:  # not a zip; an object array
        raise UsageError(f"cannot read {str(path)!r} as .npz: {exc}", key="source") from None


def _check_rows(num_rows: int, path: Path) -> None:
    if num_rows == 0:
        raise UsageError(f"{str(path)!r} holds no rows", key="source")


def _labels(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """int64 labels, with the class names when the source named them: integers as they
    are, strings as the index of their name among the sorted distinct names."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        raise UsageError(f"label column {name!r} has {column.null_count} missing values", key="label_column")
    if pa.types.is_integer(column.type):
        labels = column.to_numpy().astype(np.int64)
        if labels.min() < 0:
            raise UsageError(f"label column {name!r} has negative labels; use 0..C-1", key="label_column")
        return labels, None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        names = sorted(pc.unique(column).to_pylist())
        return pc.index_in(column, value_set=pa.array(names)).to_numpy().astype(np.int64), tuple(names)
    raise UsageError(f"label column {name!r} holds {column.type}; labels must be integers 0..C-1 or class "
                     "names (strings)", key="label_column")


def _write_shards(src: _Source, order: np.ndarray, folder: Path, rows_per_shard: int,
                  row_group_rows: int) -> list[Shard]:
    return [_write_shard(src, order[start:start + rows_per_shard], folder / f"part-{number:05d}.parquet",
                         row_group_rows)
            for number, start in enumerate(range(0, len(order), rows_per_shard))]


def _write_shard(src: _Source, positions: np.ndarray, path: Path, row_group_rows: int) -> Shard:
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, src.schema) as writer:
        for start in range(0, len(positions), row_group_rows):
            writer.write_table(src.take(positions[start:start + row_group_rows]), row_group_size=row_group_rows)
    _fsync(path)
    return Shard(path.name, len(positions), pq.read_metadata(path).num_row_groups, path.stat().st_size,
                 _sha256(path))


def _manifest(src: _Source, source_path: str, seed: int | None, shards: list[Shard]) -> Manifest:
    labels, counts = np.unique(src.labels, return_counts=True)
    return Manifest(source_kind=src.kind, source_path=source_path, label_source=src.label_source,
                    rows=len(src.labels), seed=seed,
                    columns=tuple(Column(f.name, str(f.type)) for f in src.schema),
                    class_counts={int(label): int(n) for label, n in zip(labels, counts)},
                    class_names=src.class_names, shape=src.shape, shards=tuple(shards))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
    _fsync(path)


def _swap(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` (``overwrite``) is moved aside
    first, put back if the rename fails, and deleted only once the new one is in place."""
    if not target.exists():
        os.rename(staging, target)
        _fsync(target.parent)
        return
    if not overwrite:  # made between _check_out and now
        raise UsageError(f"{str(target)!r} appeared while its data were written; not replacing it", key="out")
    old = staging.with_suffix(".old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync(target.parent)
    shutil.rmtree(old)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to the disk, so that a crash after
    the rename cannot leave OUT holding files that were never written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
