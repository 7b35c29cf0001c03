"""What the planner must know about a dataset, found without torch and without reading
the data itself: row counts, the shape of one input, the number of classes.

Digits' figures are constants of scikit-learn's bundled dataset; synthetic data is
described by its recipe; Parquet answers from its footers (pyarrow reads no rows); an
image folder from its listing (no image is opened).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.data.classes import rows_of
from launcher.data.images import scan_image_folder
from launcher.data.splits import split_sizes
from launcher.errors import UsageError
from launcher.recipe import DataConfig

DIGITS_ROWS = 1797
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10
DIGITS_CLASS_ROWS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
"""Rows of each digit 0..9."""


@dataclass(frozen=True)
class DataFacts:
    num_rows: int
    num_train: int
    num_val: int
    input_shape: tuple[int, ...]
    """Shape of one sample's features; for token data, (seq_len,) of the model input."""
    num_classes: int
    """Classes, or the vocabulary size for token data."""
    num_test: int = 0
    """Rows of the test split, which neither training nor validation reads."""
    encoded_images: bool = False
    """Rows are encoded image files to decode: an image folder, or a Parquet image column."""
    row_groups: tuple[int, ...] = ()
    """Rows of each Parquet row group in order, when the data is streamed by row group."""


def feature_columns(cfg: DataConfig, names: list[str]) -> list[str]:
    """The recipe's feature columns; by default every column but the label and the time."""
    return cfg.feature_columns or [n for n in names if n not in (cfg.label_column, cfg.time_column)]


def parquet_files(path: str) -> list[Path]:
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
        if not files:
            raise UsageError(f"no .parquet files under {path!r}", key="data.path")
        return files
    if not root.exists():
        raise UsageError(f"{path!r} does not exist", key="data.path")
    return [root]


def _parquet_facts(cfg: DataConfig) -> tuple[int, tuple[int, ...], int, bool, dict[int, int]]:
    """(rows, input shape, classes, whether rows are encoded images, rows of each label)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    files = parquet_files(cfg.path or "")
    try:
        schema = pq.read_schema(files[0])
        num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UsageError(f"cannot read {str(files[0])!r} as Parquet: {exc}", key="data.path") from None
    names = schema.names
    if cfg.time_column is not None and cfg.time_column not in names:
        raise UsageError(f"column {cfg.time_column!r} not in {names}", key="data.time_column")
    if cfg.kind == "tokens":
        if cfg.tokens_column not in names:
            raise UsageError(f"column {cfg.tokens_column!r} not in {names}", key="data.tokens_column")
        # A token file says nothing cheap about its vocabulary: the recipe gives it.
        return num_rows, (cfg.seq_len - 1,), cfg.vocab_size, False, {}
    if cfg.label_column not in names:
        raise UsageError(f"column {cfg.label_column!r} not in {names}", key="data.label_column")
    # Class count needs the label values: read that one column (small) once.
    labels = ds.dataset([str(f) for f in files], format="parquet").to_table(columns=[cfg.label_column])
    num_classes = int(pc.max(labels.column(0)).as_py()) + 1
    counts = {int(c["values"]): int(c["counts"]) for c in pc.value_counts(labels.column(0)).to_pylist()
              if c["values"] is not None} if cfg.classes else {}
    if cfg.image_column in names and _is_binary(schema.field(cfg.image_column).type):
        return num_rows, (3, cfg.image_size, cfg.image_size), num_classes, True, counts
    if cfg.loader == "dali":
        raise UsageError(f"DALI decodes images; these files have no {cfg.image_column!r} column of "
                         "encoded images (data.image_column), use loader: torch", key="data.loader")
    features = feature_columns(cfg, names)
    missing = [c for c in features if c not in names]
    if missing:
        raise UsageError(f"columns {missing} not in {names}", key="data.feature_columns")
    return num_rows, (len(features),), num_classes, False, counts


def _is_binary(dtype: object) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def describe(cfg: DataConfig) -> DataFacts:
    try:
        return _describe(cfg)
    except OSError as exc:  # a path too long, unreadable, a loop of links: the user's to fix
        raise UsageError(f"cannot read {cfg.path!r}: {exc.strerror or exc}", key="data.path") from None


def _describe(cfg: DataConfig) -> DataFacts:
    encoded_images = cfg.source == "images"
    labels = None
    if cfg.source == "digits":
        num_rows, shape, classes = DIGITS_ROWS, DIGITS_SHAPE, DIGITS_CLASSES
        counts = dict(enumerate(DIGITS_CLASS_ROWS))
    elif cfg.source == "images":
        folder = scan_image_folder(cfg.path or "")  # lists the files, opens none
        num_rows, shape, classes = len(folder.files), (3, cfg.image_size, cfg.image_size), len(folder.classes)
        counts = dict(enumerate(int(n) for n in np.bincount(folder.labels)))
    elif cfg.source == "synthetic":
        num_rows = cfg.samples
        if cfg.kind == "tokens":
            shape, classes = (cfg.seq_len - 1,), cfg.vocab_size
        else:
            shape, classes = (cfg.num_features,), cfg.num_classes
        # The generator deals labels 0, 1, ..., C-1, 0, 1, ... before shuffling them.
        # Counted for the listed classes only: C may be more labels than memory holds.
        counts = {c: len(range(c, cfg.samples, cfg.num_classes)) for c in cfg.classes or () if c < cfg.num_classes}
        labels = f"0..{min(cfg.num_classes, cfg.samples) - 1}"
    else:
        num_rows, shape, classes, encoded_images, counts = _parquet_facts(cfg)
        if cfg.streaming and encoded_images:
            raise UsageError("streaming reads feature and token rows; an image column is read "
                             "whole (set data.streaming: false)", key="data.streaming")
    if cfg.classes is not None:
        num_rows, classes = rows_of(cfg.classes, counts, labels), len(cfg.classes)
    if cfg.shape is not None:
        if encoded_images:
            raise UsageError("images reach the model as 3 x image_size x image_size; set "
                             "data.image_size instead", key="data.shape")
        if cfg.kind == "tokens":
            raise UsageError("data.shape is for feature rows, not token sequences", key="data.shape")
        if math.prod(cfg.shape) != math.prod(shape):
            raise UsageError(f"shape {cfg.shape} holds {math.prod(cfg.shape)} values but each row "
                             f"has {math.prod(shape)}", key="data.shape")
        shape = tuple(cfg.shape)
    num_train, num_val, num_test = split_sizes(cfg, num_rows)
    row_groups = _row_group_sizes(cfg) if cfg.streaming else ()
    return DataFacts(num_rows, num_train, num_val, tuple(shape), classes, num_test, encoded_images,
                     row_groups)


def _row_group_sizes(cfg: DataConfig) -> tuple[int, ...]:
    from launcher.data.parquet_shards import RowGroups

    return tuple(g.num_rows for g in RowGroups.of(parquet_files(cfg.path or "")).groups)

