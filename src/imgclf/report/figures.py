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

    Blue bars are the accuracy of each confidence bin, dots its mean confidence, the hatched part
    the gap between them; the diagonal is perfect calibration. Each bin is labelled with its count.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100, sharey=True)
    titles = (f"before: ECE {ece_before:.4f}", f"after T = {temperature:.3g}: ECE {ece_after:.4f}")
    for ax, rows, title in zip(axes, (before, after), titles, strict=True):
        filled = [r for r in rows if r["count"]]
        width = rows[0]["upper"] - rows[0]["lower"]
        centres = [(r["lower"] + r["upper"]) / 2 for r in filled]
        accuracy = [r["accuracy"] for r in filled]
        confidence = [r["confidence"] for r in filled]
        ax.bar(centres, accuracy, width=width * 0.9, color="tab:blue", edgecolor="black", label="accuracy")
        ax.bar(centres, [abs(c - a) for c, a in zip(confidence, accuracy, strict=True)],
               bottom=[min(c, a) for c, a in zip(confidence, accuracy, strict=True)], width=width * 0.9,
               fill=False, hatch="///", edgecolor="tab:red", label="gap")
        ax.plot(centres, confidence, "o", color="black", markersize=3, label="mean confidence")
        for x, r in zip(centres, filled, strict=True):
            ax.text(x, 1.01, str(r["count"]), ha="center", va="bottom", fontsize=7, color="dimgray")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence (top probability); images per bin on top")
        ax.set_title(title, pad=14)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # leave the bottom 5% for the legend
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
