"""Rows in memory, split into train and validation: ``load_split(cfg, facts) -> Split``.
The test rows (``data.test_fraction``) are left out unless ``test=True``, which only
`dlaunch eval --split test` passes: no training process reads them.

Every source ends as torch tensors: features float32 shaped ``(N, *facts.input_shape)``
with int64 labels, or, for token data, int64 inputs ``seq[:, :-1]`` with the next tokens
``seq[:, 1:]`` as targets. The split and the normalisation statistics depend only on the
recipe (``split_seed``), never on the training seed, rank or world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from launcher.data.augment import ImageAugment
from launcher.data.classes import keep_classes
from launcher.data.facts import DataFacts, feature_columns, parquet_files
from launcher.data.image_rows import ImageRows, channel_stats
from launcher.data.images import scan_image_folder
from launcher.data.splits import seeded_permutation, split_indices
from launcher.errors import UsageError
from launcher.recipe import DataConfig

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Split:
    train: TensorDataset | ImageRows
    val: TensorDataset | ImageRows
    test: TensorDataset | ImageRows | None = None
    """Only when asked for."""


def load_split(cfg: DataConfig, facts: DataFacts, *, seed: int = 0, test: bool = False) -> Split:
    """Load every row of ``cfg``'s source and split it as ``facts`` says; an image
    folder's rows are listed here and decoded as they are read, its training images
    augmented from ``seed`` (the training seed)."""
    if facts.encoded_images:
        return _image_split(cfg, facts, seed, test)
    if cfg.kind == "tokens":
        seq = _load_tokens(cfg)
        _check_rows(cfg, facts, len(seq))
        rows = _rows(cfg, len(seq))
        inputs, targets = seq[:, :-1], seq[:, 1:]
        parts = [TensorDataset(inputs[r], targets[r]) for r in rows]
    else:
        x, y = _load_rows(cfg)
        _check_rows(cfg, facts, len(y))
        x = x.reshape(len(x), *facts.input_shape)
        rows = _rows(cfg, len(y), labels=y)
        xs = [x[r] for r in rows]
        if cfg.normalize:
            mean, std = _feature_stats(xs[0])  # the training rows' alone
            xs = [(part - mean) / std for part in xs]
        parts = [TensorDataset(part, y[r]) for part, r in zip(xs, rows, strict=True)]
    return Split(parts[0], parts[1], parts[2] if test else None)


def _check_rows(cfg: DataConfig, facts: DataFacts, num_rows: int) -> None:
    # The plan sized batches and steps from facts.num_rows; files that changed since
    # would silently break that arithmetic.
    if num_rows != facts.num_rows:
        raise UsageError(f"the data has {num_rows} rows but the plan was made for "
                         f"{facts.num_rows}; did the files change? plan the run again",
                         key="data.path" if cfg.source == "parquet" else "data.source")


def _image_split(cfg: DataConfig, facts: DataFacts, seed: int, test: bool) -> Split:
    """Image rows: an image folder's files, or a Parquet column's encoded files (all of
    them in memory: a few kB each, and DataLoader workers share them copy-on-write)."""
    if cfg.source == "images":
        folder = scan_image_folder(cfg.path or "")
        labels, files = folder.labels, folder.paths()
    else:
        table = _read_table(cfg, [cfg.image_column, cfg.label_column])
        labels = table.column(cfg.label_column).to_numpy().astype(np.int64)
        files = table.column(cfg.image_column).to_pylist()
    if cfg.classes is not None:
        kept, labels = keep_classes(labels, cfg.classes)
        files = [files[i] for i in kept]
    _check_rows(cfg, facts, len(files))
    rows = split_indices(cfg, len(files), labels=labels, times=_times(cfg), permutation=_randperm)
    paths = [[files[i] for i in r] for r in rows]
    if cfg.mean is not None and cfg.std is not None:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    elif cfg.normalize:
        mean, std = channel_stats(paths[0], cfg.image_size)  # the training rows' alone
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    a = cfg.augment
    augment = ImageAugment(size=cfg.image_size, random_crop=a.random_crop, crop_scale=tuple(a.crop_scale),
                           crop_ratio=tuple(a.crop_ratio), flip=a.flip, color_jitter=a.color_jitter)
    parts = [ImageRows(p, labels[r], size=cfg.image_size, mean=mean, std=std,
                       augment=augment if part == 0 else None, seed=seed)
             for part, (p, r) in enumerate(zip(paths, rows, strict=True))]
    return Split(parts[0], parts[1], parts[2] if test else None)


def _rows(cfg: DataConfig, num_rows: int, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[train, val, test] row indices, as ``split_indices`` picks them."""
    # A streamed run's ranks and planner pick rows with numpy's shuffle (they have no
    # torch, or no rows but their own): read whole, its rows must be the same.
    rows = split_indices(cfg, num_rows, labels=None if labels is None else labels.numpy(),
                         times=_times(cfg), permutation=seeded_permutation if cfg.streaming else _randperm)
    return [torch.from_numpy(r) for r in rows]


def _randperm(num_rows: int, seed: int) -> np.ndarray:
    """The holdout shuffle: torch's seeded randperm, which drew every split before
    splits.py, so that the runs and checkpoints made then keep their rows."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).numpy()


def _times(cfg: DataConfig) -> np.ndarray | None:
    """The values of ``time_column`` (walk_forward orders rows by them), or None: the row
    order is the time order."""
    if cfg.time_column is None:
        return None
    column = _read_table(cfg, [cfg.time_column]).column(0)
    if column.null_count:
        raise UsageError(f"time column {cfg.time_column!r} has {column.null_count} missing "
                         "values; a row without a time has no place in the time order",
                         key="data.time_column")
    return column.to_numpy()


def _feature_stats(x_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the training rows: per channel for images (N, C, H, W), else per
    feature. Computed in float64 so that large splits do not lose precision; population
    std (as scikit-learn's StandardScaler), which is defined for a single row too."""
    x = x_train.double()
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    # A feature constant on the training split (a digits border pixel) would divide by
    # zero: leave it unscaled, as scikit-learn's StandardScaler does.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean[0].float(), std[0].float()


def _load_rows(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All (features float32 (N, F), labels int64 (N,)) of a classification source: the
    rows of ``data.classes`` only, relabelled, when it is set."""
    if cfg.source == "digits":
        x, y = _digits()
    elif cfg.source == "synthetic":
        x, y = _synthetic_classes(cfg)
    else:
        x, y = _parquet_rows(cfg)
    if cfg.classes is None:
        return x, y
    kept, labels = keep_classes(y.numpy(), cfg.classes)
    return x[torch.from_numpy(kept)], torch.from_numpy(labels)


def _load_tokens(cfg: DataConfig) -> torch.Tensor:
    """All token sequences, int64 (N, seq_len). (The recipe rejects digits as tokens.)"""
    if cfg.source == "synthetic":
        return _synthetic_tokens(cfg)
    return _parquet_tokens(cfg)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.from_numpy(digits.data).float() / 16.0  # pixel intensities are 0..16
    return x, torch.from_numpy(digits.target).long()


def _synthetic_classes(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one per class, with unit noise around centres drawn from
    N(0, 1): separable enough to learn, overlapping enough to not be trivial in few
    dimensions."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    centers = torch.randn(cfg.num_classes, cfg.num_features, generator=gen)
    # Balanced classes, shuffled: every class the planner counted is present.
    labels = (torch.arange(cfg.samples) % cfg.num_classes)[torch.randperm(cfg.samples, generator=gen)]
    x = centers[labels] + torch.randn(cfg.samples, cfg.num_features, generator=gen)
    return x, labels


def _synthetic_tokens(cfg: DataConfig) -> torch.Tensor:
    """Arithmetic sequences mod vocab_size: next = (prev + step) % vocab, with a random
    start and a step in {1, 2, 3} per row; the model must infer the step from context."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    start = torch.randint(cfg.vocab_size, (cfg.samples, 1), generator=gen)
    step = torch.randint(1, 4, (cfg.samples, 1), generator=gen)
    return (start + step * torch.arange(cfg.seq_len)) % cfg.vocab_size


def _read_table(cfg: DataConfig, columns: list[str]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(cfg.path or "")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def parquet_columns(cfg: DataConfig) -> list[str]:
    """The columns a run reads: the tokens, or the features and the label."""
    import pyarrow.parquet as pq

    if cfg.kind == "tokens":
        return [cfg.tokens_column]
    names = pq.read_schema(parquet_files(cfg.path or "")[0]).names
    return [*feature_columns(cfg, names), cfg.label_column]


def _parquet_rows(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return feature_rows(cfg, _read_table(cfg, parquet_columns(cfg)))


def feature_rows(cfg: DataConfig, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, F), labels int64 (N,)) of a table of ``parquet_columns``."""
    import pyarrow as pa

    features = table.column_names[:-1]
    bad = [c for c in features if not _is_numeric(table.schema.field(c).type)]
    if bad:
        raise UsageError(f"feature columns must hold one number per row; {bad} do not",
                         key="data.feature_columns")
    nulls = [c for c in features if table.column(c).null_count]
    if nulls:
        raise UsageError(f"feature columns {nulls} have missing values", key="data.feature_columns")
    label = table.column(cfg.label_column)
    if not pa.types.is_integer(label.type) or label.null_count:
        raise UsageError(f"label column {cfg.label_column!r} must hold integers without gaps, "
                         f"it is {label.type} with {label.null_count} missing",
                         key="data.label_column")
    x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in features])
    y = torch.from_numpy(label.to_numpy().astype(np.int64))
    if len(y) and int(y.min()) < 0:
        raise UsageError(f"label column {cfg.label_column!r} has negative labels; use 0..C-1",
                         key="data.label_column")
    return torch.from_numpy(x), y


def _is_numeric(dtype: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def _parquet_tokens(cfg: DataConfig) -> torch.Tensor:
    return token_rows(cfg, _read_table(cfg, [cfg.tokens_column]))


def token_rows(cfg: DataConfig, table: pa.Table) -> torch.Tensor:
    """The first seq_len tokens of every row of a table of the tokens column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(0).combine_chunks()
    kind = column.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and pa.types.is_integer(kind.value_type)):
        raise UsageError(f"column {cfg.tokens_column!r} must hold lists of token ids, it is {kind}",
                         key="data.tokens_column")
    lengths = pc.list_value_length(column).fill_null(0)
    short = pc.sum(pc.less(lengths, cfg.seq_len)).as_py() or 0
    if short:
        raise UsageError(f"{short} rows of {cfg.tokens_column!r} hold fewer than seq_len="
                         f"{cfg.seq_len} tokens; lower data.seq_len or drop those rows",
                         key="data.tokens_column")
    heads = pc.list_slice(column, 0, cfg.seq_len, return_fixed_size_list=True).flatten()
    if heads.null_count:
        raise UsageError(f"{cfg.tokens_column!r} has missing token ids", key="data.tokens_column")
    seq = torch.from_numpy(heads.to_numpy(zero_copy_only=False).astype(np.int64))
    seq = seq.reshape(len(column), cfg.seq_len)
    if len(seq) and (int(seq.min()) < 0 or int(seq.max()) >= cfg.vocab_size):
        raise UsageError(f"token ids in {cfg.tokens_column!r} span {int(seq.min())}..{int(seq.max())}, "
                         f"outside 0..{cfg.vocab_size - 1}; set data.vocab_size",
                         key="data.vocab_size")
    return seq
