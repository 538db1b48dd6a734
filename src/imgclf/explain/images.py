"""Explain a bundle's predictions on images: the maps, the overlays and the PNG files.

`explain` returns one `Explanation` per image (the image as the model saw it, the heatmap, the
overlay, the predicted class and the class explained); `write_explanations` is the command line's
`imgclf explain`: every image is decoded and checked before anything is computed or written, and
each PNG is written atomically, so a bad input leaves no file behind.
"""

from __future__ import annotations

import difflib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from imgclf.bundle import Model
from imgclf.data.decode import UnreadableImageError, open_image, to_rgb
from imgclf.data.pipeline import image_to_tensor
from imgclf.data.sources import collect_images
from imgclf.errors import DataError
from imgclf.explain.cam import METHOD_TITLES, Explainer, check_method, check_runtime
from imgclf.explain.layers import ExplainError
from imgclf.files import atomic_write_bytes
from imgclf.progress import log, progress

FIGURE_SIDE = 256  # px: each panel of a PNG; a 32 px input is enlarged to it so people can see it
OVERLAY_WEIGHT = 0.5  # share of the image in the overlay; the rest is the JET-coloured heatmap
BATCH_SIZE = 8  # images per forward + backward pass (activations and gradients of the whole batch are held)


@dataclass
class Explanation:
    """Where the model looked for one image, for one class.

    `image` is the model's input as uint8 S x S x 3 (resized and cropped like at prediction), `heatmap`
    the map as float32 S x S in 0..1, `overlay` the heatmap blended over the image (uint8 S x S x 3).

    Example:
        >>> e = explain(model, ["cat.jpg"])[0]  # doctest: +SKIP
        >>> e.predicted, round(e.probability, 2), e.heatmap.shape  # doctest: +SKIP
        ('cat', 0.97, (224, 224))
    """

    source: str
    predicted: str
    probability: float  # of the predicted (most probable) class, as `predict` reports it
    target: str  # the class the map explains
    target_probability: float
    method: str
    layer: str
    image: np.ndarray
    heatmap: np.ndarray
    overlay: np.ndarray

    def caption(self) -> str:
        title = METHOD_TITLES[self.method]
        about = "class-agnostic" if self.method == "eigencam" else f"for {self.target} ({self.target_probability:.3f})"
        return f"predicted {self.predicted} ({self.probability:.3f}) · {title} {about}"

    def figure(self, *, side: int = FIGURE_SIDE) -> Image.Image:
        """The image and its overlay side by side, `side` px each, over a caption line."""
        panels = [_enlarge(self.image, side), _enlarge(self.overlay, side)]
        font = _font(max(11, side // 18))
        caption_height = int(getattr(font, "size", 12)) + 10
        canvas = Image.new("RGB", (2 * side, side + caption_height), "white")
        for i, panel in enumerate(panels):
            canvas.paste(panel, (i * side, 0))
        ImageDraw.Draw(canvas).text((6, side + 4), self.caption(), fill="black", font=font)
        return canvas

    def to_png(self, *, side: int = FIGURE_SIDE) -> bytes:
        buffer = io.BytesIO()
        self.figure(side=side).save(buffer, format="PNG")
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready."""
        return {"source": self.source, "predicted": self.predicted, "probability": self.probability,
                "target": self.target, "target_probability": self.target_probability, "method": self.method,
                "layer": self.layer}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _enlarge(array: np.ndarray, side: int) -> Image.Image:
    image = Image.fromarray(array)
    resample = Image.Resampling.NEAREST if side >= 2 * image.width else Image.Resampling.BILINEAR
    return image.resize((side, side), resample)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = OVERLAY_WEIGHT) -> np.ndarray:
    """Blend a 0..1 heatmap (JET colours: red is where the model looked) over a uint8 RGB image.

    Example:
        >>> overlay_heatmap(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.float32)).shape
        (4, 4, 3)
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return np.asarray(show_cam_on_image(image.astype(np.float32) / 255.0, heatmap, use_rgb=True,
                                        image_weight=image_weight), dtype=np.uint8)


def class_index(model: Model, name: str) -> int:
    """The index of class `name`, or an error listing the classes (closest first).

    Example:
        >>> class_index(model, "dog")  # doctest: +SKIP
        1
    """
    if name in model.classes:
        return model.classes.index(name)
    close = difflib.get_close_matches(name, model.classes, n=3, cutoff=0.5)
    shown = ", ".join(model.classes[:20]) + (" ..." if len(model.classes) > 20 else "")
    raise ExplainError(f"unknown class {name!r}: the model's classes are {shown}",
                       expected="one of the bundle's class names, spelled exactly",
                       fix=f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                       else "leave --class out to explain the predicted class")


def decode_all(model: Model, images: Sequence[str | Path | Image.Image]) -> tuple[list[str], torch.Tensor]:
    """(sources, uint8 N x 3 x S x S) of every image, or one error that names every unreadable file.

    Raises:
        DataError: at least one image does not decode (nothing else is done).
    """
    prep = model.preprocessing
    sources: list[str] = []
    tensors: list[torch.Tensor] = []
    failed: list[str] = []
    for i, item in enumerate(images):
        try:
            if isinstance(item, Image.Image):
                image, source = to_rgb(item), f"<image {i}>"
            else:
                image, source = open_image(Path(item), draft_size=prep.image_size), str(item)
        except UnreadableImageError as exc:
            failed.append(f"{exc.name}: {exc.reason}")
            continue
        sources.append(source)
        tensors.append(image_to_tensor(image, prep.image_size, prep.interpolation))
    if failed:
        raise DataError(f"{len(failed)} image(s) cannot be decoded, so nothing was explained: "
                        + "; ".join(failed[:10]),
                        expected="JPEG, PNG, BMP, GIF, WebP or TIFF files that open",
                        fix="remove or replace those files and run again")
    if not tensors:
        raise DataError("no images to explain", expected="at least one image file or PIL image")
    return sources, torch.stack(tensors)


def explain(
    model: Model,
    images: Sequence[str | Path | Image.Image] | str | Path | Image.Image,
    *,
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    runtime: str = "auto",
    batch_size: int = BATCH_SIZE,
) -> list[Explanation]:
    """Heatmaps of where `model` looks in each image, for its predicted class or `class_name`.

    Runs the bundle's PyTorch network on the CPU (Grad-CAM needs gradients, which the ONNX and
    OpenVINO runtimes do not have). Every image is decoded first: one unreadable image is an error
    before any work is done.

    Args:
        model: a loaded bundle.
        images: image files or PIL images.
        method: gradcam, gradcam++ or eigencam (class-agnostic).
        class_name: the class to explain in every image; None explains each image's prediction.
        layer: the target layer (dotted path in the backbone); None takes the registry's.
        runtime: auto or torch; onnx and openvino cannot backpropagate and are refused.
        batch_size: images per forward and backward pass.

    Raises:
        ExplainError: unknown method, class, layer or a runtime without gradients.
        DataError: an image does not decode.

    Example:
        >>> explanations = explain(imgclf.load("runs/pets"), ["cat.jpg"], method="gradcam")  # doctest: +SKIP
        >>> explanations[0].overlay.shape  # doctest: +SKIP
        (224, 224, 3)
    """
    check_runtime(runtime)
    check_method(method)
    target = None if class_name is None else class_index(model, class_name)
    if not isinstance(images, (list, tuple)):
        images = [images]  # type: ignore[list-item]
    sources, batch = decode_all(model, images)  # type: ignore[arg-type]
    explainer = Explainer(model, method=method, layer=layer)
    return explain_batch(explainer, batch, sources, targets=None if target is None else [target] * len(sources),
                         batch_size=batch_size)


def explain_batch(
    explainer: Explainer, batch: torch.Tensor, sources: list[str], *, targets: list[int] | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[Explanation]:
    """Explanations of a uint8 N x 3 x S x S batch (already decoded), `batch_size` images per pass.

    `targets`: the class index to explain per image; None explains each prediction.

    Example:
        >>> explain_batch(Explainer(model), store.batch(np.arange(4))[1], ["a", "b", "c", "d"])  # doctest: +SKIP
    """
    model = explainer.model
    results: list[Explanation] = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start : start + batch_size]
        wanted = None if targets is None else targets[start : start + batch_size]
        maps, logits = explainer(chunk, wanted)
        probs = model.to_probabilities(torch.from_numpy(logits)).numpy()  # as predict: temperature, or sigmoids
        for j in range(len(chunk)):
            predicted = int(probs[j].argmax())
            explained = predicted if wanted is None else int(wanted[j])
            image = chunk[j].permute(1, 2, 0).contiguous().numpy()
            results.append(Explanation(
                source=sources[start + j], predicted=model.classes[predicted], probability=float(probs[j, predicted]),
                target=model.classes[explained], target_probability=float(probs[j, explained]),
                method=explainer.method, layer=explainer.target.name, image=image, heatmap=maps[j],
                overlay=overlay_heatmap(image, maps[j]),
            ))
    return results


def output_names(sources: Sequence[str], suffix: str) -> list[str]:
    """A distinct file name per source: `<stem><suffix>`, numbered when stems repeat.

    Example:
        >>> output_names(["a/cat.jpg", "b/cat.jpg", "dog.png"], ".gradcam.png")
        ['cat.gradcam.png', 'cat-2.gradcam.png', 'dog.gradcam.png']
    """
    seen: dict[str, int] = {}
    names = []
    for source in sources:
        stem = Path(source).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}{'' if seen[stem] == 1 else f'-{seen[stem]}'}{suffix}")
    return names


def write_explanations(
    model: Model,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    runtime: str = "auto",
) -> list[tuple[Explanation, Path]]:
    """`imgclf explain`: one PNG per image in `out` (image | overlay, with the prediction as caption).

    Files and folders in `paths` are expanded like `predict`'s. Everything is checked (class, layer,
    runtime, every image decoding) before the first file is written, and each file is written
    atomically, so a bad input leaves `out` as it was.

    Example:
        >>> write_explanations(imgclf.load("runs/pets"), ["new/"], "why/")[0][1]  # doctest: +SKIP
        PosixPath('why/cat.gradcam.png')
    """
    check_runtime(runtime)
    check_method(method)
    target = None if class_name is None else class_index(model, class_name)
    files = collect_images(list(paths))
    sources, batch = decode_all(model, files)
    explainer = Explainer(model, method=method, layer=layer)
    log(f"explaining {len(sources)} image(s) with {explainer.title} on layer {explainer.target.name!r} "
        f"(PyTorch, {model.preprocessing.image_size} px)")
    suffix = f".{method.replace('+', 'p')}" + (f".{_safe(class_name)}" if class_name else "") + ".png"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = output_names(sources, suffix)
    written = []
    with progress(total=len(sources), desc="explain") as bar:
        for start in range(0, len(sources), BATCH_SIZE):
            part = sources[start : start + BATCH_SIZE]
            explanations = explain_batch(explainer, batch[start : start + BATCH_SIZE], part,
                                         targets=None if target is None else [target] * len(part))
            for explanation, name in zip(explanations, names[start : start + BATCH_SIZE], strict=True):
                written.append((explanation, atomic_write_bytes(folder / name, explanation.to_png())))
            bar.update(len(part))
    return written


def _safe(text: str) -> str:
    """A class name as a file-name part: letters, digits, '-' and '_' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60] or "class"
