"""Multi-label data: the `path,labels` CSV, its errors, the iterative split and `check`'s statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.check import check
from imgclf.data.multilabel import iterative_split, label_statistics, parse_labels_cell
from imgclf.data.sources import load_dataset, load_eval_split, stratified_split
from imgclf.errors import BundleError, DataError


def write_csv(root: Path, rows: list[str], header: str = "path,labels", images: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(root / f"{i}.png")
    path = root / "data.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_labels_column_makes_a_label_matrix(tmp_path: Path) -> None:
    rows = [f"{i}.png,{labels}" for i, labels in enumerate(
        ["cat;dog", "cat", "", "dog ; cat", "bird", "cat", "dog", "bird;dog", "", "cat", "dog", "bird"])]
    dataset = load_dataset(str(write_csv(tmp_path, rows)), val_fraction=0.25, seed=0)
    assert dataset.multilabel and dataset.classes == ["bird", "cat", "dog"]
    assert dataset.train.labels.shape[1] == 3 and dataset.train.labels.dtype == np.float32
    assert len(dataset.train) + len(dataset.val) == 12
    by_path = dict(zip(dataset.train.paths + dataset.val.paths,
                       np.concatenate([dataset.train.labels, dataset.val.labels]).tolist(), strict=True))
    assert by_path[str((tmp_path / "3.png").resolve())] == [0.0, 1.0, 1.0]  # "dog ; cat": spaces and order
    assert by_path[str((tmp_path / "2.png").resolve())] == [0.0, 0.0, 0.0]  # empty: none of these
    assert dataset.summary()["task"] == "multi-label"


@pytest.mark.parametrize("cell, hint", [('"cat,dog"', "use ';'"), ("cat|dog", "use ';'"), ("cat;;dog", "empty label")])
def test_bad_separators_are_named_with_the_fix(tmp_path: Path, cell: str, hint: str) -> None:
    path = write_csv(tmp_path, ["0.png,cat", f"1.png,{cell}", "2.png,dog"])
    with pytest.raises(DataError, match=r"line 3") as caught:
        load_dataset(str(path))
    assert hint in str(caught.value)


def test_unquoted_commas_split_the_row_and_say_so(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["0.png,cat", "1.png,cat,dog", "2.png,dog"])
    with pytest.raises(DataError, match=r"line 3: 3 field\(s\), expected 2 \(separate labels with ';'"):
        load_dataset(str(path))


def test_unknown_labels_in_val_and_in_evaluation(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["0.png,cat,train", "1.png,dog,train", "2.png,cat;dgo,val", "3.png,dog,test"],
                     header="path,labels,split")
    with pytest.raises(DataError, match="val rows .* labels that the training rows never use: dgo"):
        load_dataset(str(path))
    with pytest.raises(BundleError, match="not trained on: dgo"):
        load_eval_split(str(write_csv(tmp_path / "e", ["0.png,cat;dgo"])), ["cat", "dog"], multilabel=True)


def test_task_mismatch_and_ambiguous_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["0.png,cat", "1.png,dog"])
    with pytest.raises(BundleError, match="single-label but"):
        load_eval_split(str(path), ["cat", "dog"])
    images, _ = load_eval_split(str(path), ["cat", "dog", "fox"], multilabel=True)
    assert images.labels.tolist() == [[1, 0, 0], [0, 1, 0]]
    with pytest.raises(DataError, match="both a 'label' and a 'labels' column"):
        load_dataset(str(write_csv(tmp_path / "b", ["0.png,cat,cat"], header="path,label,labels")))


def test_parse_cell() -> None:
    assert parse_labels_cell("b;a;b") == (["a", "b"], None)
    assert parse_labels_cell("  ") == ([], None)
    assert "use ';'" in str(parse_labels_cell("a,b")[1])


def test_iterative_split_keeps_every_label_share_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    matrix = (rng.random((600, 8)) < np.linspace(0.02, 0.5, 8)).astype(np.float32)
    keep, held = iterative_split(matrix, 0.2, seed=3)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == 600
    assert abs(len(held) - 120) <= 6  # iterstrat trades exact sizes for label balance
    share = matrix[held].sum(0) / matrix.sum(0)
    assert np.all(np.abs(share - 0.2) < 0.05), share  # even the 2% label keeps about its share
    empty = matrix.sum(1) == 0
    assert abs(empty[held].sum() / empty.sum() - 0.2) < 0.05  # "none of these" rows are stratified too
    again = iterative_split(matrix, 0.2, seed=3)
    assert np.array_equal(again[1], held)
    # The single-label entry point dispatches on the matrix.
    assert np.array_equal(stratified_split(matrix, 0.2, 3)[1], held)
    # A random split of the same size misses the rare label's share by far more, often.
    random_share = matrix[rng.permutation(600)[:120]].sum(0) / matrix.sum(0)
    assert np.abs(share - 0.2).max() <= np.abs(random_share - 0.2).max()


def test_label_statistics() -> None:
    stats = label_statistics([["a", "b"], ["a"], [], ["b", "c"], []])
    assert stats["counts"] == {"a": 2, "b": 2, "c": 1}
    assert stats["no_label"] == 2
    assert stats["co_occurrence"]["a"]["b"] == 1 and stats["co_occurrence"]["a"]["c"] == 0
    assert stats["labels_per_image"]["histogram"] == {"0": 2, "1": 1, "2": 2}


def test_check_reports_counts_co_occurrence_and_unlabelled(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["0.png,cat;dog", "1.png,cat", "2.png,", "3.png,dog;cat"], images=4)
    report = check(str(path))
    data = report.to_dict()
    assert data["class_totals"] == {"cat": 3, "dog": 2}
    assert data["multilabel"]["no_label"] == 1
    assert data["multilabel"]["co_occurrence"]["cat"]["dog"] == 2
    text = report.format()
    assert "1 with no label" in text and "cat+dog 2" in text
