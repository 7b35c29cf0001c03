"""Row-group streaming: which rank reads which rows, and the proof that a rank reads
nothing else.

Two measurements stand behind "reads only its own rows and the columns it names":

- bytes: a pyarrow filesystem (``_Recording``) that serves the local files and records
  the (offset, length) of every read pyarrow makes. The reads that do not end at the
  end of the file are the data reads (the footer is read from the end); each must lie
  inside a column chunk (the byte range the footer gives one column of one row group)
  of the rank's own row groups and requested columns, and together they must add up to
  exactly those chunks' bytes: each read once, no other byte touched.
- decoding, on the default memory-mapped path: the bytes of every other rank's row
  groups, and of the unrequested column of the rank's own, are overwritten with zeros,
  which no Parquet reader can decode (the test checks that it indeed cannot); the rank
  still reads its rows correctly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from launcher.data.parquet_shards import RowGroup, RowGroups, read_rows, rows, take
from launcher.errors import UsageError

FOOTER_READ = 64 * 1024
"""What pyarrow reads from a file's end to find its footer."""


def _write(path: Path, sizes: list[int], start: int, blob: int) -> int:
    """A file with row groups of ``sizes`` rows: ``id`` the global row number, ``value``
    id / 2, ``blob`` ``blob`` random bytes a row. Returns the next file's first id."""
    schema = pa.schema([("id", pa.int64()), ("value", pa.float64()), ("blob", pa.binary())])
    rng = np.random.default_rng(start)
    with pq.ParquetWriter(path, schema) as writer:
        for size in sizes:
            ids = np.arange(start, start + size)
            blobs = [rng.bytes(blob) for _ in range(size)]
            writer.write_table(pa.table([ids, ids / 2, blobs], schema=schema), row_group_size=max(size, 1))
            start += size
    return start


def _files(folder: Path, layout: list[list[int]], blob: int = 8) -> list[str]:
    """One file per entry of ``layout``, each entry the row counts of its row groups."""
    paths, start = [], 0
    for number, sizes in enumerate(layout):
        paths.append(str(folder / f"{number}.parquet"))
        start = _write(Path(paths[-1]), sizes, start, blob)
    return paths


def _ids(tables) -> list[int]:
    return [i for t in tables for i in t.column("id").to_pylist()]


class _RecordingFile(io.RawIOBase):
    def __init__(self, path: str, reads: list[tuple[str, int, int, bool]]) -> None:
        self.file = open(path, "rb")  # closed by close()
        self.path, self.reads = path, reads
        self.size = Path(path).stat().st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        offset = self.file.tell()
        n = self.file.readinto(buffer)
        self.reads.append((self.path, offset, n, offset + n == self.size))
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


class _Recording(pafs.FileSystemHandler):
    """The local filesystem, recording each read: (path, offset, length, ends at EOF)."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.reads: list[tuple[str, int, int, bool]] = []

    def get_type_name(self) -> str:
        return "recording"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def open_input_file(self, path: str):
        return pa.PythonFile(_RecordingFile(path, self.reads), mode="r")

    def _unused(self, *args):
        raise NotImplementedError

    get_file_info_selector = create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _unused
    delete_file = move = copy_file = open_input_stream = open_output_stream = open_append_stream = _unused

    def data_reads(self) -> list[tuple[str, int, int]]:
        return [(path, offset, n) for path, offset, n, at_end in self.reads if not at_end]


def _chunks(groups: list[RowGroup], columns: list[str]) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each column chunk of ``columns`` in ``groups``."""
    chunks = []
    for group in groups:
        meta = pq.read_metadata(group.file).row_group(group.index)
        for j in range(meta.num_columns):
            column = meta.column(j)
            if column.path_in_schema in columns:
                start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
                chunks.append((group.file, start, column.total_compressed_size))
    return chunks


def _assert_read_exactly(recording: _Recording, chunks: list[tuple[str, int, int]]) -> None:
    """Every data read lies in one of ``chunks`` (pyarrow may merge neighbouring chunks
    into one read) and the reads add up to the chunks' bytes: each read once."""
    reads = recording.data_reads()
    for path, offset, n in reads:
        inside = any(path == f and s <= offset and offset + n <= s + length
                     for f, s, length in _merged(chunks))
        assert inside, f"read of {n} bytes at {offset} of {path} is outside the row groups and columns asked for"
    assert sum(n for *_, n in reads) == sum(length for *_, length in chunks)


def _merged(chunks: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``chunks`` with touching ones joined."""
    merged: list[tuple[str, int, int]] = []
    for path, start, length in sorted(chunks):
        if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == start:
            merged[-1] = (path, merged[-1][1], merged[-1][2] + length)
        else:
            merged.append((path, start, length))
    return merged


def _zero(chunks: list[tuple[str, int, int]]) -> None:
    for path, start, length in chunks:
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(bytes(length))


def test_rows_are_numbered_across_files_and_row_groups_in_order_skipping_empty_ones(tmp_path):
    files = _files(tmp_path, [[4, 4, 2], [], [0], [3, 0, 5]])
    groups = RowGroups.of(files)
    assert groups.groups == (RowGroup(files[0], 0, 0, 4), RowGroup(files[0], 1, 4, 4), RowGroup(files[0], 2, 8, 2),
                             RowGroup(files[3], 0, 10, 3), RowGroup(files[3], 2, 13, 5))
    assert groups.num_rows == 18
    assert groups.schema.names == ["id", "value", "blob"]


def test_row_groups_come_from_the_footers_alone(tmp_path):
    files = _files(tmp_path, [[100] * 6, [100] * 6], blob=2048)  # 1.2 MB each
    recording = _Recording()
    groups = RowGroups.of(files, filesystem=pafs.PyFileSystem(recording))
    assert len(groups.groups) == 12
    assert recording.reads and recording.data_reads() == []  # every read ends at the file's end: the footer
    for file in files:
        read = sum(n for path, _, n, _ in recording.reads if path == file)
        assert read <= FOOTER_READ < Path(file).stat().st_size // 16


def test_files_of_different_schemas_or_not_parquet_are_refused(tmp_path):
    files = _files(tmp_path, [[3]])
    pq.write_table(pa.table({"id": [1.5]}), tmp_path / "other.parquet")
    (tmp_path / "text.parquet").write_text("id\n1\n")
    with pytest.raises(UsageError, match="share one schema"):
        RowGroups.of([files[0], tmp_path / "other.parquet"])
    with pytest.raises(UsageError, match="cannot read .* as Parquet"):
        RowGroups.of([tmp_path / "text.parquet"])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_row_goes_to_exactly_one_rank(tmp_path, world_size):
    groups = RowGroups.of(_files(tmp_path, [[5, 5, 1], [0], [7, 2], [], [5, 5, 5, 3]]))
    dealt = [rows(groups.for_rank(rank, world_size)) for rank in range(world_size)]
    assert sorted(np.concatenate(dealt).tolist()) == list(range(groups.num_rows))
    read = [_ids(read_rows(groups.for_rank(rank, world_size), ["id"])) for rank in range(world_size)]
    assert read == [d.tolist() for d in dealt]


def test_equal_row_groups_are_dealt_strided():
    groups = RowGroups(tuple(RowGroup("f", i, 10 * i, 10) for i in range(10)), pa.schema([]))
    for rank in range(3):
        assert [g.index for g in groups.for_rank(rank, 3)] == [i for i in range(10) if i % 3 == rank]


def test_unequal_row_groups_leave_ranks_at_most_one_group_apart():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=40)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    groups = RowGroups(tuple(RowGroup("f", i, int(s), int(n)) for i, (s, n) in enumerate(zip(starts, sizes))),
                       pa.schema([]))
    for world_size in (2, 3, 4, 7):
        loads = [len(rows(groups.for_rank(rank, world_size))) for rank in range(world_size)]
        assert max(loads) - min(loads) <= sizes.max()
        strided = [int(sizes[rank::world_size].sum()) for rank in range(world_size)]
        assert max(loads) - min(loads) <= max(strided) - min(strided)


def test_more_ranks_than_row_groups_leave_some_ranks_nothing(tmp_path):
    groups = RowGroups.of(_files(tmp_path, [[3, 3]]))
    assert [len(groups.for_rank(rank, 4)) for rank in range(4)] == [1, 1, 0, 0]
    assert list(read_rows(groups.for_rank(3, 4), ["id"])) == []
    with pytest.raises(ValueError, match="rank 4"):
        groups.for_rank(4, 4)


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_reads_the_bytes_of_its_own_row_groups_and_columns_alone(tmp_path, world_size):
    groups = RowGroups.of(_files(tmp_path, [[100] * 5, [100] * 4], blob=1024))
    for rank in range(world_size):
        mine = groups.for_rank(rank, world_size)
        recording = _Recording()
        tables = list(read_rows(mine, ["id", "value"], filesystem=pafs.PyFileSystem(recording)))
        assert _ids(tables) == rows(mine).tolist()
        assert [t.column_names for t in tables] == [["id", "value"]] * len(mine)
        _assert_read_exactly(recording, _chunks(mine, ["id", "value"]))


def test_without_projection_the_byte_measurement_fails(tmp_path):
    """The measurement above can fail: reading every column touches the blob chunks."""
    groups = RowGroups.of(_files(tmp_path, [[100] * 2], blob=1024))
    recording = _Recording()
    list(read_rows(groups.groups, None, filesystem=pafs.PyFileSystem(recording)))
    with pytest.raises(AssertionError, match="outside"):
        _assert_read_exactly(recording, _chunks(list(groups.groups), ["id", "value"]))


def test_a_memory_mapped_rank_decodes_nothing_of_other_ranks_or_unnamed_columns(tmp_path):
    groups = RowGroups.of(_files(tmp_path, [[50] * 4, [30, 20]], blob=256))
    mine = groups.for_rank(1, 3)
    others = [g for g in groups.groups if g not in mine]
    _zero(_chunks(others, ["id", "value", "blob"]) + _chunks(mine, ["blob"]))
    tables = list(read_rows(mine, ["id", "value"]))  # memory_map=True, the default
    assert _ids(tables) == rows(mine).tolist()
    assert [v for t in tables for v in t.column("value").to_pylist()] == (rows(mine) / 2).tolist()
    # The zeros are undecodable: reading either would have failed.
    with pytest.raises(OSError):
        list(read_rows(others[:1], ["id"]))
    with pytest.raises(OSError):
        list(read_rows(mine[:1], ["blob"]))


def test_take_returns_rows_in_the_order_asked_across_files_and_row_groups(tmp_path):
    files = _files(tmp_path, [[4, 0, 4], [], [3, 5]])
    wanted = np.array([15, 0, 3, 4, 7, 8, 10, 11, 3, 14])  # crosses every boundary; 3 twice
    table = take(files, wanted, ["value", "id"])
    assert table.column_names == ["value", "id"]
    assert table.column("id").to_pylist() == wanted.tolist()
    assert table.column("value").to_pylist() == (wanted / 2).tolist()


def test_take_reads_each_needed_row_group_once_and_no_other(tmp_path):
    groups = RowGroups.of(_files(tmp_path, [[100] * 4, [100] * 3], blob=1024))
    wanted = np.array([650, 5, 610, 99, 5, 300, 699])  # groups 6, 0, 3 (0 and 6 three times)
    recording = _Recording()
    table = take(groups, wanted, ["id"], filesystem=pafs.PyFileSystem(recording))
    assert table.column("id").to_pylist() == wanted.tolist()
    needed = [groups.groups[i] for i in (0, 3, 6)]
    _assert_read_exactly(recording, _chunks(needed, ["id"]))


def test_take_of_no_rows_and_bad_rows_or_columns(tmp_path):
    files = _files(tmp_path, [[3, 3]])
    empty = take(files, np.array([], dtype=np.int64), ["id"])
    assert empty.num_rows == 0 and empty.schema == pa.schema([("id", pa.int64())])
    with pytest.raises(IndexError, match="outside 0..5"):
        take(files, np.array([6]), ["id"])
    with pytest.raises(ValueError, match="integers"):
        take(files, np.array([0.5]), ["id"])
    with pytest.raises(ValueError, match=r"\['nope'\] are not in"):
        take(files, np.array([1]), ["nope"])
