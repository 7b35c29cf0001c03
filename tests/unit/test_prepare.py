"""`dlaunch data prepare`: image folders, CSV and npz into Parquet shards with a
manifest, written atomically, read back by the Parquet loader, checked by `verify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from launcher.data.datasets import load_split
from launcher.data.facts import describe
from launcher.data.prepare import prepare, read_manifest, verify
from launcher.errors import UsageError
from launcher.recipe import DataConfig


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """cat/ with 3 images, dog/ with 4 (one in a sub-folder, one .jpg), all different."""
    root = tmp_path / "pets"
    names = ["cat/a.png", "cat/b.png", "cat/c.png", "dog/a.png", "dog/b.jpg", "dog/c.png", "dog/deep/d.png"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4 + i, 4), (30 * i, 0, 0)).save(root / name)
    return root


def _csv(tmp_path, text: str, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def numeric_csv(tmp_path) -> Path:
    """20 rows: features a (float), b (int), an integer label in 0..2."""
    lines = ["a,b,label"] + [f"{i * 0.25},{i % 7},{i % 3}" for i in range(20)]
    return _csv(tmp_path, "\n".join(lines) + "\n")


def _table(out: Path):
    return pq.read_table(out)  # a directory: every part, in file order


def _loaded(out: Path, **config) -> tuple[np.ndarray, np.ndarray]:
    """Every row the Parquet loader reads from ``out`` (train and validation), sorted:
    (features flattened, labels)."""
    cfg = DataConfig(source="parquet", path=str(out), normalize=False, **config)
    split = load_split(cfg, describe(cfg))
    x = torch.cat([split.train.tensors[0], split.val.tensors[0]]).flatten(1).numpy()
    y = torch.cat([split.train.tensors[1], split.val.tensors[1]]).numpy()
    return _sorted(x, y)


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort([*x.T[::-1], y])  # by label, then by each feature
    return x[order], y[order]


def test_image_rows_are_the_files_bytes_with_label_and_relative_path(image_folder, tmp_path):
    manifest = prepare(str(image_folder), str(tmp_path / "out"))
    table = _table(tmp_path / "out")
    assert table.schema.names == ["image", "label", "path"]
    assert table.column("path").to_pylist() == ["cat/a.png", "cat/b.png", "cat/c.png", "dog/a.png",
                                                "dog/b.jpg", "dog/c.png", "dog/deep/d.png"]
    assert table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1, 1]
    for image, path in zip(table.column("image").to_pylist(), table.column("path").to_pylist()):
        assert image == (image_folder / path).read_bytes()  # undecoded: the file itself
    assert manifest.source_kind == "images"
    assert manifest.class_names == ("cat", "dog") and manifest.class_counts == {0: 3, 1: 4}
    assert [(c.name, c.type) for c in manifest.columns] == [("image", "binary"), ("label", "int64"),
                                                            ("path", "string")]


def test_csv_shards_have_the_asked_sizes_and_round_trip_through_the_parquet_loader(numeric_csv, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(str(numeric_csv), str(out), rows_per_shard=7, row_group_rows=3)
    assert [(s.file, s.rows, s.row_groups) for s in manifest.shards] == [
        ("part-00000.parquet", 7, 3), ("part-00001.parquet", 7, 3), ("part-00002.parquet", 6, 2)]
    assert [pq.read_metadata(out / s.file).row_group(0).num_rows for s in manifest.shards] == [3, 3, 3]
    assert manifest.rows == 20 and manifest.class_counts == {0: 7, 1: 7, 2: 6}
    assert [(c.name, c.type) for c in manifest.columns] == [("a", "double"), ("b", "int64"), ("label", "int64")]
    i = np.arange(20)
    source = _sorted(np.column_stack([i * 0.25, i % 7]).astype(np.float32), i % 3)
    loaded = _loaded(out)
    np.testing.assert_array_equal(loaded[0], source[0])
    np.testing.assert_array_equal(loaded[1], source[1])


def test_string_labels_become_indices_of_the_sorted_class_names(tmp_path):
    path = _csv(tmp_path, "x,species\n1,virginica\n2,setosa\n3,versicolor\n4,setosa\n")
    manifest = prepare(str(path), str(tmp_path / "out"), label_column="species")
    table = _table(tmp_path / "out")
    assert table.column_names == ["x", "label"]
    assert table.column("label").to_pylist() == [2, 0, 1, 0]
    assert manifest.class_names == ("setosa", "versicolor", "virginica")
    assert manifest.class_counts == {0: 2, 1: 1, 2: 1} and manifest.label_source == "species"
    _, labels = _loaded(tmp_path / "out", val_fraction=0.25)
    assert sorted(labels.tolist()) == [0, 0, 1, 2]


def test_npz_rows_are_flattened_and_their_shape_recorded_for_the_recipe(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 1, 2, 3)), rng.integers(0, 4, size=30)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    manifest = prepare(str(tmp_path / "data.npz"), str(tmp_path / "out"), rows_per_shard=8)
    assert manifest.shape == (1, 2, 3)
    assert [c.name for c in manifest.columns] == [f"x{i}" for i in range(6)] + ["label"]
    assert {c.type for c in manifest.columns} == {"float", "int64"}
    cfg = DataConfig(source="parquet", path=str(tmp_path / "out"), shape=list(manifest.shape))
    assert describe(cfg).input_shape == (1, 2, 3)
    loaded = _loaded(tmp_path / "out", shape=list(manifest.shape))
    source = _sorted(x.reshape(30, -1).astype(np.float32), y)
    np.testing.assert_array_equal(loaded[0], source[0])
    np.testing.assert_array_equal(loaded[1], source[1])


def test_no_seed_keeps_source_order_and_a_seed_shuffles_the_same_way_each_time(image_folder, tmp_path):
    prepare(str(image_folder), str(tmp_path / "kept"))
    for name in ("a", "b"):
        manifest = prepare(str(image_folder), str(tmp_path / name), seed=3, rows_per_shard=2)
        assert manifest.seed == 3
    kept, a, b = (_table(tmp_path / n).column("path").to_pylist() for n in ("kept", "a", "b"))
    assert kept == sorted(kept) and a == b and a != kept and sorted(a) == kept
    labels = _table(tmp_path / "a").column("label").to_pylist()
    assert labels != sorted(labels)  # classes mixed, not one class after the other


def test_an_existing_out_is_kept_unless_overwrite_and_then_replaced(numeric_csv, tmp_path):
    out = tmp_path / "out"
    prepare(str(numeric_csv), str(out))
    with pytest.raises(UsageError, match="exists") as err:
        prepare(str(numeric_csv), str(out), rows_per_shard=5)
    assert err.value.key == "out" and len(read_manifest(str(out)).shards) == 1
    prepare(str(numeric_csv), str(out), rows_per_shard=5, overwrite=True)
    assert len(read_manifest(str(out)).shards) == 4 and verify(str(out)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rows.csv"]  # nothing left aside


def test_overwrite_replaces_only_a_prepared_dataset_not_holding_the_source(image_folder, tmp_path):
    (tmp_path / "home").mkdir()
    with pytest.raises(UsageError, match="not a prepared dataset"):
        prepare(str(image_folder), str(tmp_path / "home"), overwrite=True)
    prepare(str(image_folder), str(tmp_path / "out"))
    inner = tmp_path / "out" / "pets"
    image_folder.rename(inner)
    with pytest.raises(UsageError, match="inside"):
        prepare(str(inner), str(tmp_path / "out"), overwrite=True)
    assert inner.is_dir()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_midway_leaves_no_half_written_out_and_no_temporary_dir(image_folder, tmp_path, monkeypatch,
                                                                          overwrite):
    parent = tmp_path / "datasets"
    out = parent / "pets"
    if overwrite:
        before = prepare(str(image_folder), str(out), row_group_rows=2)
    read_bytes, reads = Path.read_bytes, []

    def failing_read(path: Path) -> bytes:
        reads.append(path)
        if len(reads) == 5:  # two shards already written
            raise OSError("disk went away")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        prepare(str(image_folder), str(out), rows_per_shard=2, overwrite=overwrite)
    monkeypatch.undo()
    if overwrite:
        assert [p.name for p in parent.iterdir()] == ["pets"]
        assert read_manifest(str(out)) == before and verify(str(out)) == []
    else:
        assert not parent.exists() or list(parent.iterdir()) == []


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


BAD_SOURCES = {
    "missing label column": (lambda d: _csv(d, "a,b\n1,2\n"), "label_column", r"'label' not in \['a', 'b'\]"),
    "fractional labels": (lambda d: _csv(d, "a,label\n1,0.5\n"), "label_column", "holds double"),
    "missing labels": (lambda d: _csv(d, "a,label\n1,\n2,1\n"), "label_column", "1 missing values"),
    "negative labels": (lambda d: _csv(d, "a,label\n1,-1\n"), "label_column", "negative"),
    "a second label": (lambda d: _csv(d, "label,y\n1,0\n"), "label_column", "besides the label column 'y'"),
    "header only": (lambda d: _csv(d, "a,label\n"), "source", "holds no rows"),
    "empty folder": (lambda d: (d / "empty").mkdir() or d / "empty", "source", "0 class folder"),
    "class without images": (lambda d: [(d / "f" / c).mkdir(parents=True) for c in "ab"] and d / "f", "source",
                             "holds no .jpg"),
    "npz without y": (lambda d: _write_npz(d / "x.npz", x=np.zeros((3, 2))), "source", r"holds arrays \['x'\]"),
    "npz lengths differ": (lambda d: _write_npz(d / "x.npz", x=np.zeros((3, 2)), y=np.zeros(2, int)), "source",
                           "N rows each"),
    "npz text features": (lambda d: _write_npz(d / "x.npz", x=np.array([["a"]]), y=np.zeros(1, int)), "source",
                          "must hold numbers"),
    "npz float labels": (lambda d: _write_npz(d / "x.npz", x=np.zeros((1, 2)), y=np.ones(1)), "label_column",
                         "'y' holds double"),
    "npz of objects": (lambda d: _write_npz(d / "x.npz", x=np.array([{}]), y=np.zeros(1, int)), "source",
                       "cannot read .* as .npz"),
    "unknown file type": (lambda d: _csv(d, "a\n", name="rows.txt"), "source", "of no type prepare reads"),
    "missing source": (lambda d: d / "nowhere.csv", "source", "does not exist"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_bad_input_is_a_one_line_usage_error_and_writes_nothing(tmp_path, case):
    make, key, message = BAD_SOURCES[case]
    source = make(tmp_path)
    with pytest.raises(UsageError, match=message) as err:
        prepare(str(source), str(tmp_path / "out"), label_column="y" if case == "a second label" else "label")
    assert err.value.key == key and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("key", ["rows_per_shard", "row_group_rows"])
def test_shard_sizes_must_be_positive(numeric_csv, tmp_path, key):
    with pytest.raises(UsageError, match="1 or more") as err:
        prepare(str(numeric_csv), str(tmp_path / "out"), **{key: 0})
    assert err.value.key == key


def _flip_a_byte(out: Path) -> None:
    path = out / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "_manifest.json").read_text())
    change(manifest)
    (out / "_manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "a changed byte": (_flip_a_byte, "part-00001.parquet: its sha256 is not the manifest's"),
    "a truncated shard": (lambda out: (out / "part-00000.parquet").write_bytes(b"PAR1"),
                          "part-00000.parquet: 4 bytes, the manifest says"),
    "a missing shard": (lambda out: (out / "part-00002.parquet").unlink(), "part-00002.parquet: missing"),
    "a stray file": (lambda out: (out / "old.parquet").write_bytes(b""), "old.parquet: not in the manifest"),
    "rows miscounted": (lambda out: _edit_manifest(out, lambda m: m["shards"][0].update(rows=99)),
                        "part-00000.parquet: 7 rows in 3 row groups, the manifest says 99 in 3"),
    "a wrong total": (lambda out: _edit_manifest(out, lambda m: m.update(rows=21)),
                      "the shards list 20 rows, the manifest's total is 21"),
    "no manifest": (lambda out: (out / "_manifest.json").unlink(), "_manifest.json: cannot read it"),
    "another format": (lambda out: _edit_manifest(out, lambda m: m.update(version=2)), "not a dlaunch-shards"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_verify_passes_a_fresh_dataset_and_names_what_was_damaged(numeric_csv, tmp_path, case):
    out = tmp_path / "out"
    prepare(str(numeric_csv), str(out), rows_per_shard=7, row_group_rows=3)
    assert verify(str(out)) == []
    damage, problem = DAMAGE[case]
    damage(out)
    problems = verify(str(out))
    assert any(problem in p for p in problems), problems
