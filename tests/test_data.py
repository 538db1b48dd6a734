from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

from imgclf.data.sources import load_dataset, load_eval_split, stratified_split
from imgclf.errors import BundleError, DataError


def test_class_folder_gets_a_stratified_seeded_val_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=3, per_class=20)
    a = load_dataset(str(root), val_fraction=0.25, seed=1)
    b = load_dataset(str(root), val_fraction=0.25, seed=1)
    c = load_dataset(str(root), val_fraction=0.25, seed=2)
    assert a.classes == ["class_0", "class_1", "class_2"]
    assert a.val_from_train
    assert np.bincount(a.val.labels).tolist() == [5, 5, 5]
    assert a.val.paths == b.val.paths
    assert a.val.paths != c.val.paths
    assert not set(a.val.paths) & set(a.train.paths)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 2)
    keep, held = stratified_split(labels, 0.3, seed=0)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(len(labels)))
    assert set(labels[held]) == {0, 1, 2} and set(labels[keep]) == {0, 1, 2}
    assert (labels[held] == 0).sum() == 15


def test_split_folders_fix_the_class_map_from_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", classes=3, per_class=6)
    make_image_folder(tmp_path / "d" / "val", classes=3, per_class=2, seed=1)
    make_image_folder(tmp_path / "d" / "test", classes=2, per_class=2, seed=2)
    ds = load_dataset(str(tmp_path / "d"))
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert not ds.val_from_train and len(ds.val) == 6
    assert ds.test is not None and sorted(set(ds.test.labels.tolist())) == [0, 1]


def test_val_class_unknown_to_train_is_an_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", classes=2, per_class=4)
    make_image_folder(tmp_path / "d" / "val", classes=3, per_class=2)
    with pytest.raises(DataError, match="class_2"):
        load_dataset(str(tmp_path / "d"))


def test_csv_manifest_with_split_column(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=6)
    lines = ["path,label,split"]
    for i, f in enumerate(sorted(root.rglob("*.png"))):
        lines.append(f"imgs/{f.parent.name}/{f.name},{f.parent.name},{'test' if i % 6 == 0 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(tmp_path / "m.csv"))
    assert ds.classes == ["class_0", "class_1"]
    assert ds.test is not None and len(ds.test) == 2
    assert len(ds.train) + len(ds.val) == 10


def test_csv_bad_rows_are_reported_with_line_numbers(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    (tmp_path / "m.csv").write_text(
        "path,label\nimgs/class_0/000.png,a\nmissing.png,a\nimgs/class_1/000.png,\nonlyonefield\n"
    )
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "m.csv"))
    message = str(info.value)
    assert "3 bad row(s)" in message
    assert "line 3: file 'missing.png' not found" in message
    assert "line 4: empty label" in message
    assert "line 5: 1 field(s)" in message


def test_empty_folder_says_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"found 0 folder\(s\), 1 file\(s\)"):
        load_dataset(str(tmp_path / "d"))


def test_single_class_is_an_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", classes=1, per_class=3)
    with pytest.raises(DataError, match="only one class"):
        load_dataset(str(tmp_path / "d"))


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class=4)
    (root / "empty_class").mkdir()
    (root / ".hidden").mkdir()
    ds = load_dataset(str(root))
    assert ds.classes == ["class_0", "class_1"]
    assert any("empty_class" in w for w in ds.warnings)


def test_eval_split_rejects_classes_the_model_lacks(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2)
    images, split = load_eval_split(str(root), ["class_0", "class_1", "class_2", "extra"])
    assert split == "all images" and len(images) == 6
    with pytest.raises(BundleError, match="class_2"):
        load_eval_split(str(root), ["class_0", "class_1"])
