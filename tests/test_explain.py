"""Grad-CAM explanations: sanity checks that can fail, the target layers, the CLI and its bad input.

The sanity checks run on data where the right answer is known: a coloured square at a random place
on textured grey noise, the class being the square's colour. A model trained on it by `imgclf train`
must point inside the square (the pointing game), and its maps must change when the head's weights
are randomised (Adebayo et al. 2018, "Sanity checks for saliency maps"); EigenCAM, which never looks
at the head, is the control that shows the second check can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CLASS_COLOURS, TINY_BACKBONE, make_image
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.explain import Explainer, ExplainError, explain, find_target_layer
from imgclf.explain.layers import module_at, registry_layer
from imgclf.models.backbones import list_backbones

SIZE = 64  # px: images and model input
SIDE = 20  # px: the square's side (10% of the image's area)
SQUARE_COLOURS = {"blue": (40, 60, 235), "green": (30, 200, 40), "red": (230, 30, 30)}
# The tiny test network's last stage is a 2 x 2 grid at 64 px, too coarse to point inside a 20 px
# square; its stride-8 stage (8 x 8) is not. Everything else (input normalisation, class targets,
# hooks, resizing, orientation) is the path every explanation takes. Measured on 45 test images:
# stride 8 pointed inside the square in 45, stride 16 in 26, stride 32 in 14 (2026-12-01).
SANITY_LAYER = "blocks.2"
POINTING_TARGET = 0.9


def square_image(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Textured grey noise (blurry blobs + pixel noise, no colour cue) with a `colour` square; its (x, y)."""
    blobs = rng.random((SIZE // 8, SIZE // 8))
    low = np.asarray(Image.fromarray((blobs * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    grey = 0.6 * low + 0.4 * rng.uniform(0, 255, (SIZE, SIZE))
    array = np.repeat(grey[:, :, None], 3, axis=2) + rng.normal(0, 12, (SIZE, SIZE, 3))
    x, y = (int(v) for v in rng.integers(0, SIZE - SIDE + 1, 2))
    array[y : y + SIDE, x : x + SIDE] = np.array(colour) + rng.normal(0, 12, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), (x, y)


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Square images in train/ and test/ folders, and a model trained on them by `imgclf train`."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    corners: dict[str, tuple[int, int]] = {}
    for split, count in (("train", 40), ("test", 15)):
        for name, colour in SQUARE_COLOURS.items():
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                image, corner = square_image(colour, rng)
                path = root / "data" / split / name / f"{i:03d}.png"
                image.save(path)
                corners[str(path)] = corner
    out = root / "model"
    assert main(["train", str(root / "data"), "--out", str(out), "--backbone", TINY_BACKBONE, "--random-init",
                 "--recipe", "finetune", "--epochs", "4", "--lr", "3e-3", "--image-size", str(SIZE),
                 "--batch-size", "16", "--no-test-time-size-search", "--deterministic"]) == 0
    test = sorted(p for p in corners if "/test/" in p)
    return {"model": imgclf.load(out), "bundle": out, "test": test, "corners": corners}


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(row, column) of the map's maximum: the centre of the pixels within 1% of it.

    An upsampled grid has plateaus; numpy's argmax would pick a plateau's first pixel, its corner.
    """
    rows, cols = np.nonzero(heatmap >= heatmap.max() - 0.01)
    return float(rows.mean()), float(cols.mean())


def pointing_rate(explanations: list[Any], corners: dict[str, tuple[int, int]]) -> float:
    hits = 0
    for e in explanations:
        x, y = corners[e.source]
        row, col = peak(e.heatmap)
        hits += x <= col < x + SIDE and y <= row < y + SIDE
    return hits / len(explanations)


def true_targets(model: imgclf.Model, sources: list[str]) -> list[int]:
    return [model.classes.index(Path(s).parent.name) for s in sources]


def test_pointing_game_inside_the_square(squares: dict[str, Any]) -> None:
    """Grad-CAM's maximum lies inside the square. (Grad-CAM++ at this intermediate layer spreads its
    weight over the square's surroundings and pointed inside in 40% of the images: it is not held to this.)"""
    model, method = squares["model"], "gradcam"
    explanations = explain(model, squares["test"], method=method, layer=SANITY_LAYER)
    accuracy = np.mean([e.predicted == Path(e.source).parent.name for e in explanations])
    assert accuracy >= 0.9, f"the model did not learn the squares (test accuracy {accuracy:.2f})"
    rate = pointing_rate(explanations, squares["corners"])
    chance = SIDE**2 / SIZE**2
    assert rate >= POINTING_TARGET, f"{method}: maximum inside the square in {rate:.0%} (chance {chance:.0%})"
    print(f"pointing game: {rate:.0%} inside the square (chance {chance:.0%})")


def _map_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps (N x S x S each); 0 for a constant map."""
    a = first.reshape(len(first), -1) - first.reshape(len(first), -1).mean(axis=1, keepdims=True)
    b = second.reshape(len(second), -1) - second.reshape(len(second), -1).mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-12), 0.0)


def _maps(model: imgclf.Model, sources: list[str], method: str) -> np.ndarray:
    from imgclf.explain.images import decode_all

    _, batch = decode_all(model, sources)
    maps, _ = Explainer(model, method=method, layer=SANITY_LAYER)(batch, true_targets(model, sources))
    return maps


def test_randomized_head_changes_the_maps(squares: dict[str, Any]) -> None:
    """Adebayo et al. 2018: a map that survives randomising the weights it explains explains nothing."""
    model = squares["model"]
    sources = squares["test"]
    randomized = imgclf.load(squares["bundle"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in randomized.module.head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    for method, changes in (("gradcam", True), ("eigencam", False)):
        correlation = _map_correlation(_maps(model, sources, method), _maps(randomized, sources, method))
        if changes:
            assert np.median(correlation) < 0.5, f"{method} maps barely changed: median r {np.median(correlation):.2f}"
        else:  # EigenCAM ignores the head: the check must see no change, or it could not tell
            assert np.allclose(correlation, 1.0, atol=1e-4), correlation


def test_every_curated_backbone_names_a_layer_that_gives_a_map() -> None:
    """The contract over the registry: each curated layer exists and its output is a feature map.

    Built on the meta device, so no weights are allocated and the forward pass costs no arithmetic.
    """
    for entry in list_backbones():
        shape = _layer_output_shape(entry.name, entry.timm_name)
        assert len(shape) == 4 and min(shape[-2:]) >= 7, (entry.name, shape)


def _layer_output_shape(name: str, timm_name: str) -> tuple[int, ...]:
    import timm

    from imgclf.bundle import BackboneInfo

    with torch.device("meta"):
        backbone = timm.create_model(timm_name.split(".")[0], pretrained=False, num_classes=0)
        target = find_target_layer(backbone, BackboneInfo(name=name, timm_name=timm_name))
        assert target.curated and target.name == registry_layer(backbone, BackboneInfo(name=name, timm_name=timm_name))
        seen: list[torch.Tensor] = []
        hook = target.module.register_forward_hook(lambda _m, _i, out: seen.append(target.reshape(out)))
        size = int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        backbone(torch.zeros(1, 3, size, size))
        hook.remove()
    return tuple(seen[0].shape)


def test_same_class_as_a_curated_backbone_uses_its_layer() -> None:
    import timm

    from imgclf.bundle import BackboneInfo

    efficientnet = timm.create_model(TINY_BACKBONE, num_classes=0)
    assert registry_layer(efficientnet, BackboneInfo(name=TINY_BACKBONE, timm_name=TINY_BACKBONE)) == "bn2"
    vit = timm.create_model("test_vit", num_classes=0)
    assert registry_layer(vit, BackboneInfo(name="test_vit", timm_name="test_vit")) == "blocks.-1.norm1"
    assert isinstance(module_at(vit, "blocks.-1.norm1"), torch.nn.LayerNorm)


def _bundle_with_backbone(tiny_bundle: Path, tmp_path: Path, timm_name: str, image_size: int) -> imgclf.Model:
    """The tiny bundle's classes and head shape on another (random) timm backbone, saved and loaded."""
    import timm

    from imgclf.models.classifier import ImageClassifier

    model = imgclf.load(tiny_bundle)
    backbone = timm.create_model(timm_name, num_classes=0)
    head = torch.nn.Linear(backbone.num_features, len(model.classes))
    meta = {**model.meta, "backbone": {"name": timm_name, "timm_name": timm_name,
                                      "num_features": backbone.num_features},
            "head": {"kind": "linear", "in_features": backbone.num_features, "num_classes": len(model.classes)}}
    prep = model.preprocessing.from_dict({**model.preprocessing.to_dict(), "image_size": image_size})
    imgclf.Model(ImageClassifier(backbone, head), model.classes, prep, meta).save(tmp_path / timm_name)
    return imgclf.load(tmp_path / timm_name)


def test_vit_tokens_become_a_grid(tiny_bundle: Path, tmp_path: Path) -> None:
    model = _bundle_with_backbone(tiny_bundle, tmp_path, "test_vit", 160)  # timm's test ViT takes 160 px
    image = tmp_path / "x.png"
    make_image(CLASS_COLOURS[0], np.random.default_rng(0), size=160).save(image)
    (result,) = explain(model, [image])
    assert result.layer == "blocks.-1.norm1" and result.heatmap.shape == (160, 160)
    assert result.heatmap.max() == pytest.approx(1.0) and result.heatmap.std() > 0.01  # a real map, not a constant


def test_other_architectures_need_layer(tiny_bundle: Path, tmp_path: Path) -> None:
    model = _bundle_with_backbone(tiny_bundle, tmp_path, "test_byobnet", 64)
    image = tmp_path / "x.png"
    make_image(CLASS_COLOURS[0], np.random.default_rng(0), size=64).save(image)
    with pytest.raises(ExplainError, match="--layer") as caught:
        explain(model, [image])
    assert "ByobNet" in str(caught.value) and "last feature stage" in str(caught.value)
    last = model.module.backbone.feature_info[-1]["module"]
    (result,) = explain(model, [image], layer=last)  # the suggested layer works
    assert result.layer == last and result.overlay.shape == (64, 64, 3)


def test_api_returns_arrays_and_overlays(tiny_bundle: Path, tmp_path: Path) -> None:
    model = imgclf.load(tiny_bundle)
    files = []
    for c in range(3):
        files.append(tmp_path / f"{c}.png")
        make_image(CLASS_COLOURS[c], np.random.default_rng(c), size=48).save(files[-1])
    explanations = imgclf.explain_images(model, files, method="gradcam++")
    predicted = [p.label for p in model.predict([str(f) for f in files], runtime="torch")]
    assert [e.predicted for e in explanations] == predicted
    size = model.preprocessing.image_size
    for e, p in zip(explanations, model.predict([str(f) for f in files], runtime="torch"), strict=True):
        assert e.image.shape == e.overlay.shape == (size, size, 3) and e.image.dtype == e.overlay.dtype == np.uint8
        assert e.heatmap.shape == (size, size) and 0 <= e.heatmap.min() and e.heatmap.max() <= 1
        # The same temperature as predict; predict may run in bf16 on CPUs that have it natively (~1e-3 apart).
        assert e.probability == pytest.approx(p.probability, abs=1e-2)
    chosen = imgclf.explain_images(tiny_bundle, files[:1], class_name="class_2")[0]
    assert chosen.target == "class_2" and chosen.predicted == predicted[0]


# --------------------------------------------------------------------------------------------
# The command line and its bad input


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for c in range(3):
        paths.append(folder / f"img{c}.png")
        make_image(CLASS_COLOURS[c], np.random.default_rng(10 + c), size=48).save(paths[-1])
    return paths


def test_cli_writes_one_png_per_image(tiny_bundle: Path, images: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "why"
    assert main(["explain", str(tiny_bundle), str(images[0].parent), "--out", str(out)]) == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"img{c}.gradcam.png" for c in range(3)]
    printed = capsys.readouterr().out
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width == 2 * 256 and png.height > 256  # image | overlay, caption
        assert str(path) in printed
    assert main(["explain", str(tiny_bundle), str(images[1]), "--out", str(out), "--class", "class_0",
                 "--method", "eigencam"]) == 0
    assert (out / "img1.eigencam.class_0.png").is_file()
    assert "map for class_0" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--class", "class_9"], "unknown class 'class_9'"),
    (["--runtime", "openvino"], "cannot backpropagate"),
    (["--runtime", "onnx"], "cannot backpropagate"),
    (["--layer", "blocks.99"], "has no module '99'"),
])
def test_cli_bad_input_writes_nothing(tiny_bundle: Path, images: list[Path], tmp_path: Path, extra: list[str],
                                      message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "why"
    assert main(["explain", str(tiny_bundle), *map(str, images), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_cli_undecodable_image_writes_nothing(tiny_bundle: Path, images: list[Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    broken = images[0].parent / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:60])  # a truncated file with an image extension
    out = tmp_path / "why"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert main(["explain", str(tiny_bundle), str(images[0].parent), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "nothing was explained" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_refuses_an_exported_model(tiny_bundle: Path, images: list[Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"not really onnx")
    assert main(["explain", str(exported), str(images[0]), "--out", str(tmp_path / "why")]) == 2
    err = capsys.readouterr().err
    assert "ONNX export" in err and "cannot backpropagate" in err and not (tmp_path / "why").exists()


def test_a_failing_write_leaves_no_partial_file(tiny_bundle: Path, images: list[Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from imgclf.explain import images as module

    def broken_png(self: Any, **_: Any) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(module.Explanation, "to_png", broken_png)
    out = tmp_path / "why"
    with pytest.raises(OSError, match="disk full"):
        module.write_explanations(imgclf.load(tiny_bundle), [images[0]], out)
    assert list(out.iterdir()) == []


def test_tiny_grid_is_reported(tiny_bundle: Path, images: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny bundle's 32 px input is a 1 x 1 grid at its last stage: the map cannot show where."""
    explain(imgclf.load(tiny_bundle), [images[0]])
    assert "1x1 grid at 32 px" in capsys.readouterr().err
