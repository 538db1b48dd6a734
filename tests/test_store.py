"""The Store family: `ImageStore.decode`, `store.subset` and `store.to` give the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

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
