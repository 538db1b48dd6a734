"""int8 exports: the accuracy gate refuses what it must, a passing export is used by predict and
evaluate, and its JSON records the figures (issue 20).

Every test works on a copy of the session's tiny bundle (exports write into the bundle folder).
The tiny backbone's validation split has 6 images, so one changed label is 16.7 points: the gate is
exercised with outliers that wreck int8 and with a limit no model can meet, not with fine margins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

import imgclf
from imgclf.cli import main
from imgclf.errors import BundleError
from imgclf.export import export_int8
from imgclf.quantize import GateError
from imgclf.runtime.int8 import bundle_weights_sha256, int8_flags, int8_model_path


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle (its training data stays where it is, shared)."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "model", ignore=shutil.ignore_patterns("int8")))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Another seed than the training images: new pictures of the same classes.
    return make_image_folder(tmp_path_factory.mktemp("held_out") / "imgs", per_class=4, seed=11)


def _with_outliers(bundle: Path) -> Path:
    """Make 8 of the 256 pooled features sit near +1000, with head weights of 0 on them.

    The fp32 logits do not change (the head ignores those features), but one int8 scale must now
    cover 0..1000, so the useful features (about 0..5) all round to the same one or two steps:
    the classic way int8 breaks a model.
    """
    model = imgclf.load(bundle)
    with torch.no_grad():
        model.module.backbone.bn2.bias[:8] += 1000.0
        model.module.head.weight[:, :8] = 0.0
    model.save(bundle)
    return bundle


def test_openvino_int8_passes_the_gate_records_it_and_round_trips_through_predict(
        bundle: Path, held_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = export_int8(bundle, format="openvino")
    assert result.in_bundle and result.path == int8_model_path(bundle, "openvino")
    assert result.path.is_file() and result.path.with_suffix(".bin").is_file()

    record = json.loads(result.sidecar.read_text())
    gate = record["int8"]["gate"]
    assert gate["passed"] is True and gate["max_drop_points"] == 1.0
    assert gate["validation_images"] == 6  # the 10% of 48 images training held out
    assert gate["drop_points"] == pytest.approx(100 * (gate["reference_accuracy"] - gate["int8_accuracy"]))
    assert gate["reference_accuracy"] == 1.0 and gate["int8_accuracy"] == 1.0
    assert record["int8"]["calibration"]["images"] == 42  # every training image (fewer than 300)
    assert record["int8"]["bundle_weights_sha256"] == bundle_weights_sha256(bundle)
    assert 0 < record["int8"]["file_bytes"]["int8"] < record["int8"]["file_bytes"]["fp32"]
    assert record["int8"]["speed"]["int8_images_per_second"] > 0
    assert record["classes"] == ["class_0", "class_1", "class_2"] and record["files"] == ["model.xml", "model.bin"]

    files = sorted(str(f) for f in held_out.rglob("*.png"))
    assert main(["predict", str(bundle), str(held_out), "--runtime", "openvino-int8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    eager = imgclf.load(bundle).predict(files, runtime="torch")
    assert [r["source"] for r in rows] == files
    assert [r["label"] for r in rows] == [p.label for p in eager] == [Path(f).parent.name for f in files]
    gap = max(abs(r["probability"] - p.probability) for r, p in zip(rows, eager, strict=True))  # type: ignore[operator]
    assert gap < 0.1  # int8 moves probabilities a little, not the labels

    # Re-trained weights make the int8 model stale: it is refused, with the command to run.
    model = imgclf.load(bundle)
    with torch.no_grad():
        model.module.head.bias += 0.01
    model.save(bundle)
    with pytest.raises(BundleError, match="made from other weights") as info:
        imgclf.load(bundle).predict(files[:1], runtime="openvino-int8")
    assert f"imgclf export {bundle} --format openvino --int8" in str(info.value)


def test_onnx_int8_through_evaluate(bundle: Path, held_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = export_int8(bundle, format="onnx", calibration=str(held_out))
    record = json.loads(result.sidecar.read_text())
    assert record["int8"]["calibration"] == {"source": str(held_out), "images": 12}
    assert record["int8"]["method"].startswith("ONNX Runtime static quantization")
    assert main(["evaluate", str(bundle), str(held_out), "--runtime", "onnx-int8", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_images"] == 12 and metrics["accuracy"] == 1.0


def test_gate_refuses_a_forced_limit_with_both_figures_and_writes_nothing(
        bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No model can lose less than -1 points when both score 100%: a refusal by construction.
    assert main(["export", str(bundle), "--format", "onnx", "--int8", "--max-drop", "-1"]) == 2
    err = capsys.readouterr().err
    assert "int8 refused" in err and "from 100.00%" in err and "to 100.00%" in err
    assert "a drop of at most -1 points" in err and "--accuracy-aware" in err
    assert not (bundle / "int8").exists()  # nothing written, not even the folder


def test_gate_refuses_outlier_activations_and_accuracy_aware_recovers(bundle: Path) -> None:
    _with_outliers(bundle)
    with pytest.raises(GateError) as info:
        export_int8(bundle, format="openvino")
    report = info.value.report
    assert report.reference_accuracy == 1.0 and report.int8_accuracy < 0.7 and not report.passed
    assert f"a drop of {report.drop_points:.2f} points" in str(info.value)
    assert not (bundle / "int8").exists()
    with pytest.raises(BundleError, match="no openvino int8 model"):
        imgclf.load(bundle).forward_function("openvino-int8")

    # NNCF's accuracy control keeps the outlier layers in floating point, and the gate then passes.
    result = export_int8(bundle, format="openvino", accuracy_aware=True)
    gate = result.quantized.gate
    assert gate.passed and gate.method.startswith("NNCF accuracy-aware") and gate.int8_accuracy == 1.0
    forward = imgclf.load(bundle).forward_function("openvino-int8")
    assert forward.runtime == "openvino-int8"


def test_int8_runtimes_without_an_export_name_the_command(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(bundle), "--runtime", "onnx-int8"]) == 2  # before any server starts
    assert f"imgclf export {bundle} --format onnx --int8" in capsys.readouterr().err
    assert main(["export", str(bundle), "--format", "torchscript", "--int8"]) == 2
    assert "openvino or onnx" in capsys.readouterr().err


def test_int8_flags_from_cpuinfo() -> None:
    text = "processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni amx_int8\n\nprocessor : 1\nflags : fpu\n"
    assert int8_flags(text) == {"AVX512-VNNI": True, "AVX-VNNI": False, "AMX-INT8": True}
    assert int8_flags("no flags here") == {}
    assert np.all([isinstance(v, bool) for v in int8_flags("flags : avx_vnni").values()])
