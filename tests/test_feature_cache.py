"""The feature cache: miss, hit, partial hit, keys, corrupt files, the cached probe head and cached shares."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from PIL import Image
from stand_ins import PREP, CountingForward
from torch import nn

from imgclf.data.pipeline import ImageStore, Preprocessing, normalize
from imgclf.data.sources import load_dataset
from imgclf.training.feature_cache import (
    FeatureCache,
    LazyForward,
    cached_features,
    content_keys,
    model_key,
)


def _store(root: Path) -> ImageStore:
    dataset = load_dataset(str(root), val_fraction=0.2, seed=0)
    return ImageStore.decode(dataset.train, PREP, memory_budget=2**30, workers=1)


# --------------------------------------------------------------------------------------------
# Feature cache


def test_second_run_reads_features_without_running_the_backbone(tmp_path: Path) -> None:
    store = _store(make_image_folder(tmp_path / "data", per_class=10))
    cache = FeatureCache(tmp_path / "cache")
    counting = CountingForward()
    first = LazyForward(lambda: counting)
    x1, y1, _ = cached_features(first, store, cache=cache, batch_size=8, desc="features")
    assert counting.images == len(store) and first.built
    again = CountingForward()
    second = LazyForward(lambda: again)
    x2, y2, _ = cached_features(second, store, cache=cache, batch_size=8, desc="features")
    assert not second.built and again.images == 0  # never even built (no OpenVINO conversion)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.allclose(x1, CountingForward()(normalize(store.batch(np.arange(len(store)))[1], PREP)))


def test_a_partly_new_dataset_computes_only_the_new_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=2, per_class=10)
    cache = FeatureCache(tmp_path / "cache")
    cached_features(CountingForward(), _store(root), cache=cache, batch_size=8, desc="f")
    make_image_folder(root, classes=3, per_class=10, seed=0)  # same 20 files again, plus a new class
    store = _store(root)
    counting = CountingForward()
    x, y, _ = cached_features(counting, store, cache=cache, batch_size=8, desc="f")
    new = int((store.labels == 2).sum())
    assert counting.images == new and 0 < new < len(store)
    # Cached and computed rows come back in store order, matching a run without the cache.
    plain, plain_y, _ = cached_features(CountingForward(), store, cache=None, batch_size=8, desc="f")
    assert torch.allclose(x, plain) and torch.equal(y, plain_y)


def test_model_key_follows_weights_and_preprocessing() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 3)
    key = model_key(backbone_name="net", module=net, prep=PREP, dtype=torch.float32)
    assert key == model_key(backbone_name="net", module=net, prep=PREP, dtype=torch.float32)
    variants = [
        Preprocessing(image_size=48, mean=PREP.mean, std=PREP.std),
        Preprocessing(image_size=32, mean=(0.4, 0.5, 0.5), std=PREP.std),
        Preprocessing(image_size=32, mean=PREP.mean, std=(0.2, 0.25, 0.25)),
        Preprocessing(image_size=32, mean=PREP.mean, std=PREP.std, interpolation="bilinear"),
    ]
    keys = {model_key(backbone_name="net", module=net, prep=p, dtype=torch.float32) for p in variants}
    keys.add(model_key(backbone_name="net", module=net, prep=PREP, dtype=torch.bfloat16))
    keys.add(model_key(backbone_name="other", module=net, prep=PREP, dtype=torch.float32))
    with torch.no_grad():
        net.weight[0, 0, 0, 0] += 1e-3  # one weight of a fine-tuned copy
    keys.add(model_key(backbone_name="net", module=net, prep=PREP, dtype=torch.float32))
    assert key not in keys and len(keys) == 7


def test_content_key_changes_with_the_image_bytes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    dataset = load_dataset(str(root), val_fraction=0.3, seed=0)
    before = content_keys(dataset.train)
    assert len({bytes(k) for k in before}) == len(before)  # different images, different keys
    path = Path(dataset.train.paths[0])
    array = np.asarray(Image.open(path)).copy()
    array[0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(array).save(path)
    after = content_keys(dataset.train)
    assert bytes(after[0]) != bytes(before[0]) and np.array_equal(after[1:], before[1:])


def test_a_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(make_image_folder(tmp_path / "data", per_class=6))
    cache = FeatureCache(tmp_path / "cache")
    expected, _, _ = cached_features(CountingForward(), store, cache=cache, batch_size=8, desc="f")
    (shard,) = list((tmp_path / "cache").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash mid-write on another system
    counting = CountingForward()
    x, _, _ = cached_features(counting, store, cache=cache, batch_size=8, desc="f")
    assert "ignoring unreadable feature cache file" in capsys.readouterr().err
    assert counting.images == len(store) and torch.allclose(x, expected)
    again = CountingForward()
    cached_features(again, store, cache=cache, batch_size=8, desc="f")
    assert again.images == 0  # rebuilt


@pytest.mark.slow  # two real training runs (~20 s on 2 busy cores)
def test_train_probe_twice_serves_the_second_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import imgclf

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", per_class=8)
    args = dict(data=str(data), backbone=TINY_BACKBONE, random_init=True, recipe="probe", image_size=32,
                batch_size=16)
    first = imgclf.train(out=str(tmp_path / "a"), **args)
    err = capsys.readouterr().err
    assert "frozen forward runs on" in err and "0 from the feature cache" in err
    assert "0 file(s) unchanged since their last scan" in err

    def no_prediction_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report ran the network again")

    # The report takes train's val/test logits: it must not predict again.
    monkeypatch.setattr("imgclf.report.build.collect_predictions", no_prediction_pass)
    second = imgclf.train(out=str(tmp_path / "b"), **args)
    err = capsys.readouterr().err
    assert "frozen forward runs on" not in err and ", 0 computed" in err
    files = sum(1 for p in data.rglob("*.png"))
    assert f"{files} file(s) unchanged since their last scan, 0 scanned" in err  # nothing decoded
    assert "the head fitted on these same features before, from the cache" in err
    assert "report failed" not in err
    assert second.meta["metrics"]["val"]["accuracy"] == first.meta["metrics"]["val"]["accuracy"]
    assert torch.equal(second.module.head.weight, first.module.head.weight)
    report = json.loads((tmp_path / "b" / "report" / "metrics.json").read_text())
    assert report["metrics"]["accuracy"] == second.meta["metrics"]["test" if "test" in second.meta["metrics"]
                                                                  else "val"]["accuracy"]


def test_a_cached_probe_head_is_reused_only_for_the_same_inputs(tmp_path: Path) -> None:
    from imgclf.training.feature_cache import cached_probe
    from imgclf.training.probe import fit_probe

    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    fits: list[int] = []

    def fit(l2: list[float]):  # type: ignore[no-untyped-def]
        fits.append(1)
        return fit_probe(x[:40], y[:40], x[40:], y[40:], 3, l2)

    cache = FeatureCache(tmp_path / "key")
    first, hit = cached_probe(lambda: fit([0.1, 1.0]), cache, inputs=[x, y], settings={"l2": [0.1, 1.0]})
    assert not hit and len(fits) == 1
    again, hit = cached_probe(lambda: fit([0.1, 1.0]), cache, inputs=[x, y], settings={"l2": [0.1, 1.0]})
    assert hit and len(fits) == 1
    assert torch.equal(again.head.weight, first.head.weight) and again.l2 == first.l2
    assert again.scores == first.scores
    _, hit = cached_probe(lambda: fit([0.01]), cache, inputs=[x, y], settings={"l2": [0.01]})
    assert not hit and len(fits) == 2  # other settings
    _, hit = cached_probe(lambda: fit([0.1, 1.0]), cache, inputs=[x + 1, y], settings={"l2": [0.1, 1.0]})
    assert not hit and len(fits) == 3  # other features


def test_cached_shares_count_the_features_already_stored(tmp_path: Path) -> None:
    from imgclf.models.backbones import create_backbone
    from imgclf.training.feature_cache import cache_for, cached_shares

    data = make_image_folder(tmp_path / "data", per_class=6)
    dataset = load_dataset(str(data), val_fraction=0.25, seed=0)
    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    prep_32 = dataclasses.replace(PREP, image_size=32)
    prep_40 = dataclasses.replace(PREP, image_size=40)
    root = tmp_path / "features"
    assert cached_shares(backbone, {32: prep_32}, dataset, dtype=torch.float32, root=root) == {32: (0.0, 0.0)}
    cache = cache_for(backbone_name=backbone.entry.timm_name, module=backbone.model, prep=prep_32,
                      dtype=torch.float32, root=root)
    half = ImageStore.decode(dataset.train.subset(np.arange(len(dataset.train) // 2)), prep_32, memory_budget=2**30)
    cached_features(CountingForward(), half, cache=cache, batch_size=4, desc="f")
    cached_features(CountingForward(), ImageStore.decode(dataset.val, prep_32, memory_budget=2**30), cache=cache,
                    batch_size=4, desc="f")
    shares = cached_shares(backbone, {32: prep_32, 40: prep_40}, dataset, dtype=torch.float32, root=root)
    assert shares == {32: (0.5, 1.0), 40: (0.0, 0.0)}
