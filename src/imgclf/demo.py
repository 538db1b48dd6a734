"""`imgclf demo`: an offline end-to-end run on real images that ship with scikit-learn.

scikit-learn's digits (1,797 scanned handwritten digits, 8 x 8 px, 17 grey levels) are written out
as PNG files in a folder per class, exactly as a user's data would look, with 20% of every class
held out in a `test/` folder. Then the same code path as `imgclf train DATA` runs on the folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.sources import stratified_split
from imgclf.progress import log


def write_digits(folder: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write sklearn's digits as `folder/{train,test}/<digit>/<n>.png`; returns `folder`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            target = folder / split / str(labels[i])
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(target / f"{i:04d}.png")
    return folder


def run_demo(out: str | Path = "imgclf-demo", *, recipe: str = "finetune", epochs: int = 2) -> dict[str, Any]:
    """Write the digits, train, evaluate on the held-out images and predict a few of them."""
    from imgclf.api import collect_images, evaluate
    from imgclf.workflow import train

    started = time.perf_counter()
    out = Path(out)
    data = out / "digits"
    if not (data / "train").is_dir():
        write_digits(data)
    log(f"demo data: scikit-learn digits written as PNG folders in {data}")
    model = train(
        data=str(data),
        out=str(out / "model"),
        recipe=recipe,
        epochs=epochs,
        flip=False,  # a mirrored digit is not the same digit
        augment="light",
    )
    # write=False: the bundle's report already holds the confusion matrix; a second copy is clutter.
    metrics = evaluate(out / "model", str(data), write=False)
    samples = collect_images([data / "test"])[::45][:8]
    predictions = model.predict([str(p) for p in samples], top_k=3)
    return {
        "data": str(data),
        "bundle": str(out / "model"),
        "metrics": metrics,
        "predictions": predictions,
        "seconds": time.perf_counter() - started,
    }
