"""`imgclf check`, the training pre-flight built on it, and `--balance`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from messy_data import CLASSES, EMPTY_CLASS, bad_paths, jpeg_bytes, png_bytes, smooth_picture, write_messy_folder
from PIL import Image

from imgclf.cli import main
from imgclf.config import resolve_config
from imgclf.data.check import check, near_duplicate_groups
from imgclf.data.scan import Entry, scan_file
from imgclf.errors import ConfigError
from imgclf.training.balance import balanced_class_weights
from imgclf.training.probe import fit_logistic


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("messy")
    return root, write_messy_folder(root)


def test_check_reports_every_kind(messy) -> None:  # type: ignore[no-untyped-def]
    root, kinds = messy
    report = check(str(root)).to_dict()
    unusable = {u["path"]: u["reason"] for u in report["unusable"]}
    assert set(unusable) == bad_paths(kinds)
    for kind in kinds:
        if kind.outcome == "unusable":
            assert kind.reason in unusable[str(kind.path)], kind.name
    # Hidden files and folder links are left out and said to be, never reported as unusable.
    ignored = report["ignored"]
    for kind in (k for k in kinds if k.outcome == "ignored"):
        hits = [i for i in ignored if str(kind.path).startswith(i["path"].rstrip(os.sep))]
        assert hits and kind.reason in hits[0]["reason"], kind.name
    assert not any("/." in p for p in unusable)
    # Counts: every good image and every usable unusual one, per split and class.
    usable = [k for k in kinds if k.outcome == "usable"]
    for split, per_class in (("train", 80), ("test", 8)):
        for name in CLASSES:
            extra = sum(1 for k in usable if k.split == split and k.label == name)
            assert report["counts"][split][name] == per_class + extra, (split, name)
    assert report["empty_classes"] == [EMPTY_CLASS]
    assert report["empty_class_folders"] == [{"split": "train", "class": EMPTY_CLASS}]
    assert report["animated"] == [str(root / "train" / "dog" / "animated.gif")]
    assert report["exif_rotated"] == 1
    assert report["image_sizes"]["width"]["max"] == 4000
    # Leakage: the copied image (exact) and the re-encoded, resized one (near), train vs test.
    exact = [{f["path"] for f in g["files"]} for g in report["exact_duplicates"] if g["leakage"]]
    assert exact == [{str(root / "train/cat/000.png"), str(root / "test/cat/copy_of_train_000.png")}]
    near = [{f["path"] for f in g["files"]} for g in report["near_duplicates"] if g["leakage"]]
    assert near == [{str(root / "train/bird/smooth.png"), str(root / "test/bird/smooth_small.jpg")}]
    assert report["leakage"] == {"exact_groups": 1, "near_groups": 1}


def test_check_cli_names_every_bad_file_with_its_reason(messy, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root, kinds = messy
    assert main(["check", str(root), "--json"]) == 1  # problems found
    report = json.loads(capsys.readouterr().out)
    assert {u["path"] for u in report["unusable"]} == bad_paths(kinds)
    assert main(["check", str(root)]) == 1
    text = capsys.readouterr().out
    for kind in (k for k in kinds if k.outcome == "unusable"):
        line = next(line for line in text.splitlines() if line.strip().startswith(str(kind.path) + ":"))
        assert kind.reason in line, line
    assert "[LEAKAGE]" in text and "problems: 13 unusable file(s)" in text


def test_clean_folder_has_no_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "clean", classes=3, per_class=6)
    assert main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "18 image file(s), 18 usable" in out
    assert check(str(root)).to_dict()["counts"] == {"all": {"class_0": 6, "class_1": 6, "class_2": 6}}


def test_small_classes_and_imbalance(tmp_path: Path) -> None:
    root = tmp_path / "skewed"
    make_image_folder(root, classes=2, per_class=1, seed=1)  # class_0, class_1: one image each
    make_image_folder(tmp_path / "big", classes=1, per_class=9, seed=2)
    (tmp_path / "big" / "class_0").rename(root / "many")
    report = check(str(root)).to_dict()
    assert report["single_image_classes"] == ["class_0", "class_1"]
    assert report["imbalance"]["ratio"] == 9.0 and report["imbalance"]["imbalanced"]
    assert report["imbalance"]["largest"] == {"class": "many", "images": 9}


def test_csv_manifest_with_splits_reports_leakage(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "img", classes=2, per_class=3)
    rows = ["path,label,split"]
    rows += [f"img/class_{c}/{i:03d}.png,c{c},train" for c in range(2) for i in range(3)]
    rows.append("img/class_0/000.png,c1,test")  # same file, other split and label
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = check(str(tmp_path / "labels.csv")).to_dict()
    assert report["source"] == "csv manifest" and report["counts"]["test"] == {"c0": 0, "c1": 1}
    (group,) = report["exact_duplicates"]
    assert group["leakage"] and group["labels_differ"]
    assert report["classes_missing_from_train"] == []
    rows.append("img/class_1/001.png,c2,test")  # a class that train does not have
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = check(str(tmp_path / "labels.csv")).to_dict()
    assert report["classes_missing_from_train"] == ["c2"]
    assert "classes in val/test without training images" in report["problems"]


def test_near_duplicates_match_edits_not_lookalikes(tmp_path: Path) -> None:
    picture = smooth_picture(120)
    rng = np.random.default_rng(0)
    variants = {
        "original.png": png_bytes(picture),
        "recompressed.jpg": jpeg_bytes(picture, quality=50),
        "smaller.png": png_bytes(picture.resize((64, 64), Image.Resampling.BILINEAR)),
        "other.png": png_bytes(Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8))),
        "red.png": png_bytes(Image.new("RGB", (50, 50), (250, 0, 0))),
        "blue.png": png_bytes(Image.new("RGB", (50, 50), (0, 0, 250))),  # same (empty) dHash as red
    }
    results = []
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        results.append(scan_file(Entry(str(tmp_path / name), "all", "x")))
    groups = [{Path(results[i].entry.path).name for i in g} for g in near_duplicate_groups(results)]
    assert groups == [{"original.png", "recompressed.jpg", "smaller.png"}]


def test_non_utf8_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "d", classes=2, per_class=2)
    try:
        name = os.fsdecode(b"odd \xff name.png")
        (tmp_path / "d" / "class_0" / name).write_bytes(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    assert main(["check", str(tmp_path / "d")]) == 1
    assert "odd \\udcff name.png: not an image" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "d"), "--json"]) == 1
    (bad,) = json.loads(capsys.readouterr().out)["unusable"]
    assert bad["path"].endswith(name)


# --------------------------------------------------------------------------------------------
# Training on messy data


def _train_args(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    config.write_text("probe_l2: [0.01]\n", encoding="utf-8")  # one head fit: this test is about data
    return ["train", str(data), "--out", str(out), "--config", str(config), "--backbone", TINY_BACKBONE,
            "--random-init", "--recipe", "probe", "--image-size", "32", "--batch-size", "64", *extra]


@pytest.fixture
def no_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    # Converting the tiny model to OpenVINO takes longer than running it; these tests are about data.
    monkeypatch.setattr("imgclf.runtime.frozen.openvino_available", lambda: False)


def test_train_skips_exactly_the_bad_files(messy, tmp_path: Path, no_openvino: None,  # type: ignore[no-untyped-def]
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, kinds = messy
    out = tmp_path / "model"
    assert main(_train_args(root, out, tmp_path / "c.yaml")) == 0
    err = capsys.readouterr().err
    bad = bad_paths(kinds)
    assert f"skipping {len(bad)} of " in err and str(out / "skipped_files.txt") in err
    listed = (out / "skipped_files.txt").read_text(encoding="utf-8").splitlines()
    assert {line.split("\t")[0] for line in listed} == bad and len(listed) == len(bad)
    meta = json.loads((out / "imgclf.json").read_text(encoding="utf-8"))
    assert {s["path"] for s in meta["skipped_files"]} == bad
    report = json.loads((out / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert {s["path"] for s in report["skipped_files"]} == bad  # the report counts them too
    counts = meta["data"]["counts"]
    assert EMPTY_CLASS not in meta["data"]["classes"]
    assert sum(sum(c.values()) for c in counts.values()) == len([k for k in kinds if k.outcome == "usable"]) + 264


def test_train_stops_when_too_many_files_are_bad(messy, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, kinds = messy
    args = _train_args(root, tmp_path / "model", tmp_path / "c.yaml", "--max-bad-fraction", "0.01")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{len(bad_paths(kinds))} of " in err and "cannot be read" in err and "max_bad_fraction" in err
    # Nothing was trained: no bundle (train.log and config.yaml may explain the stop).
    assert not (tmp_path / "model" / "imgclf.json").exists()
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_max_bad_fraction_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        resolve_config(data="d", out="o", max_bad_fraction=1.5)


# --------------------------------------------------------------------------------------------
# --balance


def test_balanced_class_weights() -> None:
    weights = balanced_class_weights(torch.tensor([0] * 8 + [1] * 2), 3)
    assert torch.allclose(weights, torch.tensor([10 / 16, 10 / 4, 0.0]))
    assert float((weights[torch.tensor([0] * 8 + [1] * 2)]).mean()) == pytest.approx(1.0)


def test_weighted_probe_recovers_the_minority_class() -> None:
    # Two overlapping Gaussian classes, 19:1. Unweighted, the boundary hugs the minority class.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(950, 2, generator=gen), torch.randn(50, 2, generator=gen) + 1.5])
    y = torch.cat([torch.zeros(950), torch.ones(50)]).long()

    def minority_recall(head: torch.nn.Linear) -> float:
        with torch.no_grad():
            return float((head(x[y == 1]).argmax(1) == 1).float().mean())

    plain = fit_logistic(x, y, 2, l2=1e-4)
    balanced = fit_logistic(x, y, 2, l2=1e-4, class_weight=balanced_class_weights(y, 2))
    assert minority_recall(plain) < 0.4 < 0.7 < minority_recall(balanced)


def test_train_balance_flag_finetunes_with_weighted_loss(tmp_path: Path, no_openvino: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class=4, size=32)
    make_image_folder(tmp_path / "more", classes=1, per_class=16, size=32, seed=3)
    for f in (tmp_path / "more" / "class_0").iterdir():
        f.rename(root / "class_0" / f"more_{f.name}")
    seen: list[torch.Tensor | None] = []
    original = torch.nn.CrossEntropyLoss.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("weight"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "__init__", spy)
    args = _train_args(root, tmp_path / "m", tmp_path / "c.yaml", "--balance", "--epochs", "1")
    args[args.index("probe")] = "finetune"
    assert main(args) == 0
    (weight,) = [w for w in seen if w is not None]
    assert weight[1] > 2 * weight[0]  # class_1 (4 images) weighs more than class_0 (20)
    assert json.loads((tmp_path / "m" / "imgclf.json").read_text(encoding="utf-8"))["config"]["balance"] is True
