"""The report's figures as PNG files (matplotlib, headless) and its image thumbnails."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image

THUMBNAIL_SIDE = 112  # px; CIFAR's 32 px images are enlarged to this so people can see them


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss, accuracy and learning rate per fine-tuning epoch, train and validation, as one PNG."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    panels = (("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"))
    for ax, (name, train_key, val_key) in zip(axes[:2], panels, strict=True):
        ax.plot(epochs, [r.get(train_key) for r in history], "o-", label="train (augmented)")
        ax.plot(epochs, [r.get(val_key) for r in history], "s-", label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [r.get("lr") for r in history], "o-", color="tab:green")
    axes[2].set_title("head learning rate at epoch start")
    axes[2].set_xlabel("epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.set_xticks(epochs)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    path: str | Path,
    *,
    ece_before: float,
    ece_after: float,
    temperature: float,
) -> Path:
    """Reliability diagrams before and after temperature scaling, side by side, as one PNG.

    Bars are the accuracy of each confidence bin; the diagonal is perfect calibration; the red
    part is the gap. Bin counts are shown as a faint histogram.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100, sharey=True)
    total = max(1, sum(r["count"] for r in before))
    titles = (f"before: ECE {ece_before:.4f}", f"after T = {temperature:.3g}: ECE {ece_after:.4f}")
    for ax, rows, title in zip(axes, (before, after), titles, strict=True):
        width = rows[0]["upper"] - rows[0]["lower"]
        centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
        accuracy = [r["accuracy"] or 0.0 for r in rows]
        confidence = [r["confidence"] if r["count"] else c for r, c in zip(rows, centres, strict=True)]
        ax.bar(centres, [r["count"] / total for r in rows], width=width, color="lightgrey", label="share of images")
        ax.bar(centres, accuracy, width=width * 0.9, color="tab:blue", edgecolor="black", label="accuracy")
        gaps = [c - a if r["count"] else 0.0 for r, c, a in zip(rows, confidence, accuracy, strict=True)]
        ax.bar(centres, gaps, bottom=accuracy, width=width * 0.9, color="tab:red", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """Fit `image` into a `side` x `side` box, enlarging small images (nearest, so pixels stay sharp)."""
    image = image.convert("RGB")
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def data_uri(image: Image.Image, *, fmt: str = "JPEG") -> str:
    """Encode a PIL image as a `data:` URI for embedding in HTML (JPEG quality 88, or PNG)."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=88)
    else:
        image.save(buffer, format="PNG")
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def file_data_uri(path: str | Path) -> str:
    """A PNG file as a `data:` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
