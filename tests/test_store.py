"""The Store family: `ImageStore.decode`, `store.subset` and `store.to` give the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from imgclf.data.pipeline import ImageStore, Preprocessing, Store, SubsetStore
from imgclf.data.sources import load_dataset

PREP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("memory_budget", [2**30, 0], ids=["in-memory", "streamed"])
def test_a_subset_gives_its_parents_images_renumbered(tmp_path: Path, memory_budget: int) -> None:
    images = load_dataset(str(make_image_folder(tmp_path / "data", per_class=4)), val_fraction=0.25, seed=0).train
    store = ImageStore.decode(images, PREP, memory_budget=memory_budget, workers=1)
    positions = np.array([5, 0, 7, 2])
    subset = store.subset(positions)
    assert isinstance(subset, SubsetStore) and isinstance(subset, Store)
    assert len(subset) == 4 and subset.images.paths == [images.paths[p] for p in positions]
    assert torch.equal(subset.labels, store.labels[torch.from_numpy(positions)])
    _, expected = store.batch(positions)
    got = [(indices, batch) for indices, batch in subset.batches(np.array([3, 1, 0, 2]), 3)]
    assert [list(indices) for indices, _ in got] == [[3, 1, 0], [2]]
    assert torch.equal(torch.cat([batch for _, batch in got]), expected[[3, 1, 0, 2]])
    indices, batch = subset.batch(np.array([2]))
    assert list(indices) == [2] and torch.equal(batch, expected[2:3])
    assert subset.failed is store.failed  # a streamed parent's failures show in its views


def test_on_a_cpu_to_is_the_store_itself(tmp_path: Path) -> None:
    images = load_dataset(str(make_image_folder(tmp_path / "data", per_class=3)), val_fraction=0.25, seed=0).train
    store = ImageStore.decode(images, PREP, memory_budget=2**30, workers=1)
    assert store.to(torch.device("cpu")) is store
    assert store.to(torch.device("cpu"), resident=True) is store


def test_stores_decode_into_channels_last_batches_in_memory_and_streamed(tmp_path: Path) -> None:
    from imgclf.data.decode import open_image

    def reference(path: str) -> torch.Tensor:  # shorter side to 32 px (bicubic), centre square
        img = open_image(path)
        width, height = img.size
        new_w, new_h = max(32, round(width * 32 / min(img.size))), max(32, round(height * 32 / min(img.size)))
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        top, left = (new_h - 32) // 2, (new_w - 32) // 2
        return torch.from_numpy(np.asarray(img)[top : top + 32, left : left + 32].copy()).permute(2, 0, 1)

    rng = np.random.default_rng(0)
    for c in range(2):  # wide, tall and already square at the input size (no resize, no crop)
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i, size in enumerate([(40, 28), (28, 40), (32, 32), (64, 48), (50, 50), (33, 90)]):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / f"c{c}" / f"{i}.jpg")
    images = load_dataset(str(tmp_path / "data"), val_fraction=0.2, seed=0).train
    expected = torch.stack([reference(p) for p in images.paths])
    in_memory = ImageStore.decode(images, PREP, memory_budget=2**30, workers=2)
    streamed = ImageStore.decode(images, PREP, memory_budget=0, workers=2)
    assert in_memory.in_memory and not streamed.in_memory
    order = np.array([3, 0, 7, 1, 5])
    for store in (in_memory, streamed):
        indices, batch = store.batch(order)
        assert indices.tolist() == order.tolist() and batch.dtype == torch.uint8
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch, expected[order])
        pairs = list(store.batches(np.arange(len(store)), 4))
        assert torch.equal(torch.cat([b for _, b in pairs]), expected)
    # A file that turns bad after the scan: a streamed batch leaves it out and records why.
    Path(images.paths[1]).write_bytes(b"not a jpeg")
    indices, batch = streamed.batch(order)
    assert indices.tolist() == [3, 0, 7, 5] and torch.equal(batch, expected[[3, 0, 7, 5]])
    assert [path for path, _ in streamed.failed] == [images.paths[1]]
