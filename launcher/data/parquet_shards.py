"""Parquet read by row group, so that a rank reads its own rows and nothing else.

The whole-table loader (datasets.py) reads every row on every rank: fine for a digits
sized set, not for one larger than a node's memory. Here the unit of work is the row
group, the smallest part of a Parquet file that can be read alone:

- ``RowGroups.of(files)`` numbers the rows of every row group from the files' footers
  (no data page is read);
- ``RowGroups.for_rank(rank, world_size)`` deals whole row groups to ranks, the same
  deal on every rank with no communication, since each computes it from the same
  footers;
- ``read_rows(groups, columns)`` streams those groups, one table each, decoding only the
  named columns of a memory-mapped file;
- ``take(files, rows, columns)`` returns given global rows in the given order, reading
  each row group that holds one of them once, for samplers that pick rows at random.

``filesystem`` (any ``pyarrow.fs.FileSystem``: S3, GCS, HDFS) reads files that are not
local; local files are memory-mapped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from launcher.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs
    import pyarrow.parquet as pq


@dataclass(frozen=True)
class RowGroup:
    """One row group: where it is and which global rows it holds."""

    file: str
    index: int
    """Its number within ``file``, as ``ParquetFile.read_row_group`` takes it."""
    start: int
    """Global number of its first row: files in the order given, row groups in order."""
    num_rows: int

    @property
    def stop(self) -> int:
        """One past the global number of its last row."""
        return self.start + self.num_rows


@dataclass(frozen=True)
class RowGroups:
    """Every non-empty row group of a list of Parquet files, in global row order.

    Row groups of no rows are left out: no rank has anything to read in them."""

    groups: tuple[RowGroup, ...]
    schema: pa.Schema
    """The files' common Arrow schema."""

    @classmethod
    def of(cls, files: Iterable[str | Path], *, filesystem: pyarrow.fs.FileSystem | None = None) -> RowGroups:
        """Read the footers of ``files`` (and nothing else) and number their rows."""
        groups: list[RowGroup] = []
        schema = None
        start = 0
        for file in map(str, files):
            meta = _footer(file, filesystem)
            file_schema = meta.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema):
                raise UsageError(f"{file!r} has columns {file_schema.names} of other types than the "
                                 f"files before it {schema.names}; every file must share one schema",
                                 key="data.path")
            for index in range(meta.num_row_groups):
                num_rows = meta.row_group(index).num_rows
                if num_rows:
                    groups.append(RowGroup(file, index, start, num_rows))
                    start += num_rows
        if schema is None:
            raise UsageError("no Parquet files given", key="data.path")
        return cls(tuple(groups), schema)

    @property
    def num_rows(self) -> int:
        return self.groups[-1].stop if self.groups else 0

    def for_rank(self, rank: int, world_size: int) -> list[RowGroup]:
        """The row groups ``rank`` of ``world_size`` reads, in global order.

        Groups are dealt in order, each to the rank holding the fewest rows so far (the
        lowest rank on a tie). With groups of equal size, as ``prepare`` writes them, that
        is the strided deal ``i % world_size == rank``; with unequal ones the ranks' row
        counts still differ by at most the largest group.

        Strided, not contiguous: files are often in source order (an image folder is
        sorted by class), and a contiguous block would hand rank 0 the first classes
        alone; strided, every rank draws from the whole dataset. A rank may hold no
        group at all when there are fewer groups than ranks."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of 0..{world_size - 1}")
        owners = deal_row_groups([g.num_rows for g in self.groups], world_size)
        return [g for g, owner in zip(self.groups, owners, strict=True) if owner == rank]


def deal_row_groups(sizes: Sequence[int], world_size: int) -> list[int]:
    """The owning rank of each row group of ``sizes`` rows: least-loaded first, in order.
    Needs no file, so the planner deals the groups exactly as the ranks will."""
    loads = [(0, rank) for rank in range(world_size)]  # already a heap
    owners = []
    for size in sizes:
        load, rank = heapq.heappop(loads)
        owners.append(rank)
        heapq.heappush(loads, (load + size, rank))
    return owners


def rows(groups: Iterable[RowGroup]) -> np.ndarray:
    """Global row numbers of ``groups``, in the order ``read_rows`` yields them."""
    ranges = [np.arange(g.start, g.stop, dtype=np.int64) for g in groups]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def read_rows(groups: Iterable[RowGroup], columns: Sequence[str] | None = None, *, memory_map: bool = True,
              filesystem: pyarrow.fs.FileSystem | None = None) -> Iterator[pa.Table]:
    """One table per row group of ``groups``, in their order, holding ``columns`` alone
    (every column when None): the other columns' pages are neither read nor decoded.

    A file is opened once for each run of consecutive groups in it (a rank's groups come
    file by file). Memory-mapped, the OS pages in the bytes of the columns read and
    leaves the rest of the file on disk; the tables' buffers are the decoded values."""
    for file, run in itertools.groupby(groups, key=lambda g: g.file):
        with _open(file, memory_map, filesystem) as parquet:
            _project(parquet.schema_arrow, columns)
            for group in run:
                yield parquet.read_row_group(group.index, columns=columns)


def take(source: RowGroups | Iterable[str | Path], rows: np.ndarray, columns: Sequence[str] | None = None, *,
         memory_map: bool = True, filesystem: pyarrow.fs.FileSystem | None = None) -> pa.Table:
    """Global ``rows`` in their order (repeats allowed), reading each row group that
    holds one of them once and no other.

    The groups needed are held in memory together, so a sampler that draws each batch
    from a few groups (shuffle the groups, then rows within them) reads far less than
    one that scatters a batch over the whole dataset."""
    import pyarrow as pa

    groups = source if isinstance(source, RowGroups) else RowGroups.of(source, filesystem=filesystem)
    wanted = np.asarray(rows)
    if wanted.ndim != 1 or not (wanted.dtype.kind in "iu" or wanted.size == 0):
        raise ValueError(f"rows must be a 1-D array of integers, not {wanted.dtype} of shape {wanted.shape}")
    wanted = wanted.astype(np.int64)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= groups.num_rows):
        raise IndexError(f"rows {wanted.min()}..{wanted.max()} are outside 0..{groups.num_rows - 1}")
    if not wanted.size:
        return _project(groups.schema, columns).empty_table()
    starts = np.array([g.start for g in groups.groups], dtype=np.int64)
    owner = np.searchsorted(starts, wanted, side="right") - 1
    needed = np.unique(owner)
    tables = list(read_rows([groups.groups[i] for i in needed], columns, memory_map=memory_map,
                            filesystem=filesystem))
    # Where each needed group begins in the concatenation of the tables just read.
    offsets = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
    positions = offsets[np.searchsorted(needed, owner)] + (wanted - starts[owner])
    return pa.concat_tables(tables).take(pa.array(positions))


def _footer(file: str, filesystem: pyarrow.fs.FileSystem | None) -> pq.FileMetaData:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(file, filesystem=filesystem)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UsageError(f"cannot read {file!r} as Parquet: {exc}", key="data.path") from None


def _open(file: str, memory_map: bool, filesystem: pyarrow.fs.FileSystem | None) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file, memory_map=memory_map, filesystem=filesystem)


def _project(schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    """``schema`` cut to ``columns``. Checked here because pyarrow answers a column it
    does not have with an empty table, which would pass for a row group of no rows."""
    import pyarrow as pa

    if columns is None:
        return schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"columns {missing} are not in {schema.names}")
    return pa.schema([schema.field(c) for c in columns])
