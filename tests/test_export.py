"""Exports match the eager model, carry their own description, and fail loudly when they do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

import imgclf
from imgclf import export as export_module
from imgclf.cli import main
from imgclf.data.decode import open_image
from imgclf.data.pipeline import Preprocessing, image_to_tensor, normalize
from imgclf.export import ExportError, export_model


@pytest.fixture(scope="module")
def parity_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A different seed from the training images: held-out pictures of the same classes.
    return make_image_folder(tmp_path_factory.mktemp("parity") / "imgs", per_class=4, seed=11)


@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("torchscript", ".pt"), ("openvino", ".xml")])
def test_export_parity_within_1e_3(tiny_bundle: Path, parity_images: Path, tmp_path: Path, fmt: str,
                                   suffix: str) -> None:
    result = export_model(tiny_bundle, format=fmt, out=tmp_path / f"model{suffix}", images=[parity_images])
    assert result.path.is_file() and result.path.stat().st_size > 0
    assert result.parity.images == 12 and result.parity.image_source == "files"
    assert result.parity.max_abs_diff <= 1e-3 and result.parity.passed
    assert result.parity.top1_agreement == 1.0
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["format"] == fmt and sidecar["classes"] == ["class_0", "class_1", "class_2"]
    assert sidecar["parity"]["max_abs_diff"] == result.parity.max_abs_diff
    assert sidecar["preprocessing"]["image_size"] == 32
    if fmt == "openvino":
        assert (tmp_path / "model.bin").is_file()


def test_onnx_export_runs_without_imgclf_model_code(tiny_bundle: Path, parity_images: Path, tmp_path: Path) -> None:
    """Use only the .onnx file and its sidecar (preprocessing, classes) and get imgclf's labels."""
    import onnxruntime as ort

    result = export_model(tiny_bundle, format="onnx", out=tmp_path / "m.onnx", images=[parity_images])
    sidecar = json.loads(result.sidecar.read_text())
    prep = Preprocessing.from_dict(sidecar["preprocessing"])
    files = sorted(parity_images.rglob("*.png"))
    pixels = torch.stack([image_to_tensor(open_image(f), prep.image_size, prep.interpolation) for f in files])
    batch = normalize(pixels, prep).contiguous().numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    logits = session.run([sidecar["output"]["name"]], {sidecar["input"]["name"]: batch})[0]
    labels = [sidecar["classes"][i] for i in logits.argmax(1)]
    expected = [p.label for p in imgclf.load(tiny_bundle).predict([str(f) for f in files], runtime="torch")]
    assert labels == expected
    assert labels == [f.parent.name for f in files]  # and the tiny model is right on these


def test_failed_parity_deletes_the_export(tiny_bundle: Path, parity_images: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_loader = export_module.load_exported

    def skewed_loader(path: Path, fmt: str):
        run = real_loader(path, fmt)
        return lambda x: run(x) + np.array([0.0, 0.5, 0.0], dtype=np.float32)  # a broken export

    monkeypatch.setattr(export_module, "load_exported", skewed_loader)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ExportError, match="differs from the eager model") as info:
        export_model(tiny_bundle, format="onnx", out=out, images=[parity_images])
    assert "expected: at most 1e-03" in str(info.value)
    assert not out.exists() and not out.with_name("broken.onnx.json").exists()


def test_generated_images_when_no_real_ones(tiny_bundle: Path, tmp_path: Path) -> None:
    # The training folder of the session bundle exists, so point the bundle somewhere empty first.
    model = imgclf.load(tiny_bundle)
    model.meta["data"] = {"source": str(tmp_path / "gone")}
    result = export_model(model, format="torchscript", out=tmp_path / "m.pt")
    assert result.parity.image_source == "generated" and result.parity.images == 16
    assert result.parity.passed


def test_bad_requests_are_imgclf_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(tiny_bundle, format="tflite")
    with pytest.raises(ExportError, match="does not end in .onnx"):
        export_model(tiny_bundle, format="onnx", out=tmp_path / "model.pt")
    with pytest.raises(ExportError, match="none of the parity images"):
        (tmp_path / "bad.png").write_bytes(b"not a png")
        export_model(tiny_bundle, format="onnx", out=tmp_path / "m.onnx", images=[tmp_path / "bad.png"])


def test_cli_export_and_predict_with_onnx_runtime(tiny_bundle: Path, parity_images: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    assert main(["export", str(tiny_bundle), "--format", "onnx", "--out", str(out),
                 "--images", str(parity_images)]) == 0
    printed = capsys.readouterr().out
    assert "parity on 12 images (files)" in printed and str(out) in printed
    assert main(["predict", str(tiny_bundle), str(parity_images), "--runtime", "onnx", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == [Path(r["source"]).parent.name for r in rows]
    assert main(["export", str(tiny_bundle), "--format", "onnx", "--out", str(tmp_path / "x.onnx"),
                 "--tolerance", "0"]) == 2
