"""Multi-label end to end on tiny generated images: probe, thresholds, bundle, evaluate, predict,
fine-tuning, serve and ONNX export; and the metrics and thresholds against scikit-learn."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_COLOURS, TINY_BACKBONE
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, hamming_loss

import imgclf
from imgclf.bundle import BundleInfo
from imgclf.cli import main
from imgclf.evaluation.multilabel import choose_thresholds, multilabel_metrics, sigmoid
from imgclf.training.multilabel import fit_multilabel_probe, mean_average_precision

NAMES = ["red", "green", "blue"]


def make_multilabel_csv(root: Path, *, images: int = 96, seed: int = 0, size: int = 32) -> Path:
    """Images with a vertical band of each present label's colour on a dark ground; about 1 in 8 has none."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        present = [j for j in range(len(NAMES)) if rng.random() < 0.45]
        array = rng.normal(30, 12, (size, size, 3))
        width = size // len(NAMES)
        for j in present:
            array[:, j * width:(j + 1) * width] = np.array(CLASS_COLOURS[j]) + rng.normal(0, 20, (size, width, 3))
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", ";".join(NAMES[j] for j in present), "test" if i >= images * 3 // 4 else "train"))
    path = root / "labels.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def multilabel_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_multilabel_csv(tmp_path_factory.mktemp("ml") / "data")


@pytest.fixture(scope="module")
def multilabel_bundle(multilabel_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml_bundle") / "model"
    imgclf.train(data=str(multilabel_csv), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="probe",
                 image_size=32, batch_size=16, feature_cache=False)
    return out


def test_thresholds_on_a_known_case() -> None:
    # Label 0: positives score 0.9 and 0.6, negatives 0.4, 0.2 and 0.1: F1 = 1 for any cut in (0.4, 0.6].
    # Label 1: positives 0.8, 0.7 and 0.3, negatives 0.5 and 0.1: cutting at 0.7 gives F1 0.8 (2 of 3
    # found, no false positive), at 0.3 F1 6/7 (all 3 found, 1 false positive), the best.
    probs = np.array([[0.9, 0.8], [0.6, 0.7], [0.4, 0.5], [0.1, 0.3], [0.2, 0.1]])
    targets = np.array([[1, 1], [1, 1], [0, 0], [0, 1], [0, 0]])
    thresholds = choose_thresholds(probs, targets)
    assert thresholds[0] == pytest.approx(0.5)  # halfway between the lowest positive and the highest negative
    assert thresholds[1] == pytest.approx(0.2)  # between 0.3 (kept) and 0.1 (the next score below)
    predicted = probs >= np.array(thresholds)
    assert f1_score(targets[:, 0], predicted[:, 0]) == 1.0
    assert f1_score(targets[:, 1], predicted[:, 1]) == pytest.approx(6 / 7)
    # A label without a positive keeps 0.5.
    assert choose_thresholds(np.array([[0.9], [0.2]]), np.array([[0], [0]])) == [0.5]


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 5)) < 0.3).astype(np.int64)
    targets[:, 4] = 0  # a label without positives: AP undefined, left out of mAP
    probs = np.clip(targets * 0.4 + rng.random((200, 5)) * 0.6, 0, 1)
    cuts = [0.3, 0.4, 0.5, 0.6, 0.5]
    m = multilabel_metrics(probs, targets, list("abcde"), cuts)
    pred = (probs >= np.array(cuts)).astype(np.int64)
    assert m["mAP"] == pytest.approx(average_precision_score(targets[:, :4], probs[:, :4], average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(targets, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, pred, average="macro", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(float((pred == targets).all(1).mean()))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(targets, pred))
    assert m["per_label"]["b"]["ap"] == pytest.approx(average_precision_score(targets[:, 1], probs[:, 1]))
    assert m["per_label"]["e"]["ap"] is None and m["per_label"]["a"]["support"] == int(targets[:, 0].sum())
    assert mean_average_precision(probs, targets) == pytest.approx(m["mAP"])


def test_multi_output_probe_separates_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = (torch.rand(300, 4, generator=gen) < 0.3).float()
    signal = targets * 2 + 0.5 * torch.randn(300, 4, generator=gen)  # one informative feature per label
    features = torch.cat([signal, torch.randn(300, 6, generator=gen)], 1)
    result = fit_multilabel_probe(features[:200], targets[:200], features[200:], targets[200:], [1e-2, 1e-1, 1.0])
    assert result.val_accuracy > 0.95  # val mAP
    logits = result.head(features[200:]).detach()
    assert mean_average_precision(logits, targets[200:]) == pytest.approx(result.val_accuracy)


def test_trained_bundle_round_trip(multilabel_bundle: Path) -> None:
    model = imgclf.load(multilabel_bundle)
    info = model.info
    assert model.multilabel and info.task == "multi-label" and model.classes == sorted(NAMES)
    assert info.thresholds is not None and len(info.thresholds) == 3 and all(0 < t < 1 for t in info.thresholds)
    assert set(info.metrics) == {"val", "test"} and info.metrics["test"]["mAP"] > 0.8
    # What was saved is what loads: the same probabilities from the reloaded module.
    batch = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    again = imgclf.load(multilabel_bundle)
    assert torch.allclose(model.probabilities(batch, runtime="torch"), again.probabilities(batch, runtime="torch"))
    # Old bundles (no task field) are single-label.
    old = BundleInfo.from_dict({"classes": ["a", "b"], "backbone": {"timm_name": "resnet18"},
                                "head": {"kind": "linear", "in_features": 512, "num_classes": 2},
                                "preprocessing": {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}})
    assert old.task == "single-label" and old.thresholds is None


def test_predictions_list_every_label_over_its_threshold(multilabel_bundle: Path, multilabel_csv: Path) -> None:
    model = imgclf.load(multilabel_bundle)
    rows = list(csv.DictReader(multilabel_csv.open()))[-12:]
    files = [str(multilabel_csv.parent / r["path"]) for r in rows]
    predictions = model.predict(files, runtime="torch")
    probs = np.array([[dict(p.top_k)[c] for c in model.classes] for p in predictions])
    assert not np.allclose(probs.sum(1), 1.0)  # independent sigmoids
    cuts = model.thresholds()
    for p, row in zip(predictions, probs, strict=True):
        expected = {c for c, v, t in zip(model.classes, row, cuts, strict=True) if v >= t}
        assert p.labels is not None and {name for name, _ in p.labels} == expected
        assert [v for _, v in p.labels] == sorted((v for _, v in p.labels), reverse=True)
    right = sum({n for n, _ in p.labels or []} == set(filter(None, r["labels"].split(";")))
                for p, r in zip(predictions, rows, strict=True))
    assert right >= 9  # the label sets of held-out images, mostly exactly right
    everything = model.predict(files[:2], threshold=0.0, runtime="torch")
    assert all(len(p.labels or []) == 3 for p in everything)  # --threshold overrides the stored ones


def test_cli_predict_json_and_csv(multilabel_bundle: Path, multilabel_csv: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(multilabel_csv.parent / "000.png"), str(multilabel_csv.parent / "001.png")]
    assert main(["predict", str(multilabel_bundle), *files, "--format", "json", "--runtime", "torch"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all("labels" in r and "top_k" in r for r in rows)
    assert main(["predict", str(multilabel_bundle), *files, "--format", "csv", "--threshold", "0",
                 "--runtime", "torch"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 2  # one row per image
    assert all(sorted(r["labels"].split(";")) == sorted(NAMES) for r in table)
    assert all(len(r["probabilities"].split(";")) == 3 for r in table)
    with pytest.raises(SystemExit):  # argparse: a threshold is a probability
        main(["predict", str(multilabel_bundle), files[0], "--threshold", "1.5"])


def test_evaluate_json_carries_the_metrics(multilabel_bundle: Path, multilabel_csv: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(multilabel_bundle), str(multilabel_csv), "--json", "--runtime", "torch"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "per_label", "thresholds"):
        assert key in metrics
    assert metrics["split"] == "test rows" and metrics["num_images"] == 24
    assert metrics["mAP"] == pytest.approx(imgclf.load(multilabel_bundle).info.metrics["test"]["mAP"], abs=1e-4)
    row = metrics["per_label"]["red"]
    assert set(row) == {"precision", "recall", "f1", "ap", "support", "threshold"}
    assert main(["evaluate", str(multilabel_bundle), str(multilabel_csv), "--threshold", "0.5"]) == 0
    assert "thresholds from --threshold" in capsys.readouterr().out


def test_single_label_data_is_refused_by_a_multilabel_model(multilabel_bundle: Path, image_folder: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(multilabel_bundle), str(image_folder)]) == 2
    assert "the model is multi-label" in capsys.readouterr().err


def test_finetune_trains_a_sigmoid_head(multilabel_csv: Path, tmp_path: Path) -> None:
    model = imgclf.train(data=str(multilabel_csv), out=str(tmp_path / "ft"), backbone=TINY_BACKBONE,
                         random_init=True, epochs=1, image_size=32, batch_size=16, feature_cache=False,
                         test_time_size_search=False, precision="fp32")
    history = model.info.history
    assert [r["epoch"] for r in history] == [0, 1]
    assert all("val_map" in r for r in history)  # selected on val mAP
    assert model.info.selection is not None and "mAP" in model.info.selection["rule"]
    assert np.isfinite(history[1]["train_loss"]) and history[1]["train_loss"] > 0
    assert model.multilabel and model.info.metrics["test"]["mAP"] > 0.5


def test_serve_answers_several_labels(multilabel_bundle: Path, multilabel_csv: Path) -> None:
    from fastapi.testclient import TestClient

    from imgclf.serve import ServeSettings, create_app

    app = create_app(imgclf.load(multilabel_bundle), settings=ServeSettings(runtime="torch", threshold=0.0))
    with TestClient(app) as client:
        while client.get("/ready").status_code != 200:
            pass
        body = (multilabel_csv.parent / "000.png").read_bytes()
        answer = client.post("/predict", content=body, headers={"content-type": "image/png"}).json()
        prediction = answer["predictions"][0]
        assert {x["label"] for x in prediction["labels"]} == set(NAMES)  # threshold 0: every label
        metadata = client.get("/metadata").json()
        assert metadata["task"] == "multi-label" and set(metadata["thresholds"]) == set(NAMES)


def test_onnx_export_parity_and_thresholds(multilabel_bundle: Path, multilabel_csv: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from imgclf.data.decode import open_image
    from imgclf.data.pipeline import Preprocessing, image_to_tensor, normalize
    from imgclf.export import export_model

    result = export_model(multilabel_bundle, format="onnx", out=tmp_path / "m.onnx", images=[multilabel_csv.parent])
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-3
    sidecar = json.loads(result.sidecar.read_text())
    model = imgclf.load(multilabel_bundle)
    assert sidecar["task"] == "multi-label" and sidecar["thresholds"] == pytest.approx(model.thresholds().tolist())
    # The export and its sidecar alone give the bundle's label sets.
    files = sorted(multilabel_csv.parent.glob("*.png"))[:10]
    prep = Preprocessing.from_dict(sidecar["preprocessing"])
    pixels = torch.stack([image_to_tensor(open_image(f), prep.image_size, prep.interpolation) for f in files])
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    logits = session.run([sidecar["output"]["name"]], {sidecar["input"]["name"]: normalize(pixels, prep).numpy()})[0]
    over = sigmoid(logits) >= np.array(sidecar["thresholds"])
    exported = [{sidecar["classes"][j] for j in np.flatnonzero(row)} for row in over]
    eager = [{n for n, _ in p.labels or []} for p in model.predict([str(f) for f in files], runtime="torch")]
    assert exported == eager


def test_report_sections(multilabel_bundle: Path) -> None:
    """Training wrote the multi-label report: its numbers agree with the bundle's, every section is there."""
    folder = multilabel_bundle / "report"
    report = json.loads((folder / "metrics.json").read_text())
    model = imgclf.load(multilabel_bundle)
    assert report["task"] == "multi-label" and report["split"] == "test"
    assert report["metrics"]["mAP"] == pytest.approx(model.info.metrics["test"]["mAP"])
    aps = [report["metrics"]["per_label"][n]["ap"] for n in report["worst_labels"]]
    assert aps == sorted(aps)  # worst first
    assert set(report["galleries"]) == set(NAMES)
    for name, kinds in report["galleries"].items():
        cut = model.thresholds()[model.classes.index(name)]
        for item in kinds["false_positives"]:  # predicted (over the label's threshold) without the label
            assert item["probability"] >= cut and name not in item["labels"] and name in item["predicted"]
        for item in kinds["false_negatives"]:
            assert item["probability"] < cut and name in item["labels"] and name not in item["predicted"]
        probs = [i["probability"] for i in kinds["false_positives"]]
        assert probs == sorted(probs, reverse=True)  # most confident first
    co = report["error_co_occurrence"]
    assert sum(co["false_positives"].values()) >= sum(p["images"] for p in co["pairs"][:1])
    for name, cal in report["calibration"]["per_label"].items():
        assert sum(b["count"] for b in cal["bins"]) == report["metrics"]["num_images"], name
        assert 0.0 <= cal["ece"] <= 1.0
    page = (folder / "report.html").read_text()
    for title in ("Per label, worst average precision first", "Co-occurrence of errors", "false positives",
                  "calibration"):
        assert title in page
    assert {"pr_curves.png", "reliability.png", "error_co_occurrence.png"} <= {p.name for p in folder.iterdir()}
