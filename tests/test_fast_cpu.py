"""The feature cache (miss, hit, partial hit, keys, corrupt files) and the time budget (plan and guard)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from PIL import Image
from torch import nn

from imgclf.data.pipeline import ImageStore, Preprocessing, normalize
from imgclf.data.sources import load_dataset
from imgclf.errors import ConfigError
from imgclf.training.budget import (
    MIN_GOOD_EPOCHS,
    PLAN_FRACTION,
    Rates,
    Workload,
    candidate_sizes,
    epoch_seconds,
    finetune_seconds,
    interpolate,
    plan_budget,
    probe_seconds,
)
from imgclf.training.feature_cache import (
    FeatureCache,
    LazyForward,
    cached_features,
    content_keys,
    model_key,
)
from imgclf.training.finetune import REPLAN_AT_STEP, WarmupCosine, replanned_epochs

PREP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class CountingForward:
    """A stand-in backbone: mean colour per channel, scaled; counts the images it sees."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.images += len(batch)
        return batch.float().mean(dim=(2, 3)) * 2.0


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


def test_the_scan_cache_reads_only_new_or_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from imgclf.data import check

    data = make_image_folder(tmp_path / "data", per_class=4)
    (tmp_path / "data" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dataset = load_dataset(str(data), val_fraction=0.25, seed=0)
    scanned: list[str] = []
    real_scan = check.scan_file

    def counting_scan(entry: check.Entry) -> check.FileResult:
        scanned.append(entry.path)
        return real_scan(entry)

    monkeypatch.setattr(check, "scan_file", counting_scan)
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMGCLF_CACHE", str(cache))
    first, skipped = check.preflight(dataset, max_bad_fraction=0.5)
    total = len(scanned)
    assert total == 13 and [s["path"].endswith("broken.jpg") for s in skipped] == [True]
    scanned.clear()
    second, skipped_again = check.preflight(dataset, max_bad_fraction=0.5)
    # Only the unusable file is read again (a failure is never cached: it may be a permissions problem).
    assert [Path(p).name for p in scanned] == ["broken.jpg"] and skipped_again == skipped
    assert second.train.paths == first.train.paths
    assert np.array_equal(second.train.digests, first.train.digests)
    # The digests are the files' SHA-256 prefixes, and the feature cache's content keys.
    import hashlib

    path = first.train.paths[0]
    assert bytes(first.train.digests[0]) == hashlib.sha256(Path(path).read_bytes()).digest()[:16]
    no_digests = dataclasses.replace(first.train, digests=None)
    assert np.array_equal(content_keys(no_digests), content_keys(first.train))
    # A rewritten file (new bytes, new mtime) is scanned again; the others are not.
    changed = first.val.paths[0]
    Image.new("RGB", (40, 40), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(1, 1))
    scanned.clear()
    third, _ = check.preflight(dataset, max_bad_fraction=0.5)
    assert sorted(Path(p).name for p in scanned) == sorted(["broken.jpg", Path(changed).name])
    assert not np.array_equal(third.val.digests[0], first.val.digests[0])
    # A damaged table is reported and rebuilt, never trusted.
    for table in (cache / "scans").glob("*.npz"):
        table.write_bytes(b"garbage")
    scanned.clear()
    check.preflight(dataset, max_bad_fraction=0.5)
    assert len(scanned) == total


# Largest |difference| allowed between two runs of one network, relative to the largest |output|, per
# precision of the runtime. fp32: float rounding (measured < 1e-6). bf16 keeps 8 bits of mantissa
# (relative step 2^-8 = 0.4%) and OpenVINO runs it only where the CPU has it (elsewhere the hint falls
# back to fp32): measured up to 1.2% of the largest output on an AMD EPYC with AVX512-BF16 (2026-11-30).
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def close(a: torch.Tensor, b: torch.Tensor, precision: str) -> bool:
    """`a` and `b` agree within `precision`'s tolerance, relative to the larger output."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= RELATIVE_TOLERANCE[precision] * scale


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_uint8_batches_match_normalised_float_calls(tmp_path: Path, precision: str) -> None:
    pytest.importorskip("openvino")
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward, stream_outputs

    torch.manual_seed(0)
    net = create_backbone(TINY_BACKBONE, random_init=True).model
    forward = FrozenForward(net, image_size=32, runtime="openvino", precision=precision)
    images = torch.randint(0, 256, (21, 3, 32, 32), dtype=torch.uint8)
    # ImageStore's channels_last batches go in as they are, contiguous ones are laid out first.
    batches = [(np.arange(i, min(i + 8, 21)), images[i : i + 8].contiguous(memory_format=torch.channels_last)
                if i % 16 else images[i : i + 8]) for i in range(0, 21, 8)]
    assert not batches[0][1].is_contiguous(memory_format=torch.channels_last)
    assert batches[1][1].is_contiguous(memory_format=torch.channels_last)
    streamed = list(forward.stream(iter(batches), PREP))
    assert [b[0].tolist() for b in streamed] == [b[0].tolist() for b in batches]  # in order
    expected = forward(normalize(images, PREP))
    assert close(torch.cat([b[1] for b in streamed]), expected, precision)
    with torch.no_grad():
        reference = net(normalize(images, PREP))
    assert close(expected, reference, precision)
    # A plain callable (no `stream`) is fed normalised batches one by one.
    counting = CountingForward()
    plain = torch.cat([out for _, out in stream_outputs(counting, iter(batches), PREP)])
    assert counting.images == 21 and torch.allclose(plain, CountingForward()(normalize(images, PREP)))


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


# --------------------------------------------------------------------------------------------
# Time budget: the plan, from injected rates (nothing is timed)

RATES = Rates(
    train={96: 80.0, 128: 45.0, 160: 29.0},
    frozen={96: 400.0, 128: 230.0, 160: 150.0},
    decode=2000.0,
    convert_seconds=5.0,
)
CIFAR_LIKE = Workload(train=45000, val=5000, test=10000, head_fit=10000)


def _plan(minutes: float, **kwargs: object):  # type: ignore[no-untyped-def]
    options = dict(seconds_left=60 * minutes, work=CIFAR_LIKE, rates=RATES, sizes=(96, 128, 160), max_epochs=20)
    options.update(kwargs)
    return plan_budget(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("minutes", [5, 15, 45, 90, 600])
def test_a_plan_never_exceeds_the_budget(minutes: float) -> None:
    plan = _plan(minutes)
    assert plan.seconds <= PLAN_FRACTION * 60 * minutes
    assert 0 < plan.closing_seconds < plan.seconds


def test_bigger_budgets_buy_larger_inputs_then_more_epochs() -> None:
    probe, short, medium, huge = _plan(7), _plan(15), _plan(45), _plan(600)
    assert probe.recipe == "probe" and probe.image_size == 128  # under half an epoch fits: the largest probe
    assert short.recipe == "finetune" and short.image_size == 96 and short.epochs < MIN_GOOD_EPOCHS
    assert medium.image_size == 96 and medium.epochs >= MIN_GOOD_EPOCHS
    assert huge.image_size == 160 and huge.epochs == 20  # capped by max_epochs
    for minutes, plan in ((45, medium), (600, huge)):
        # No larger input would have left MIN_GOOD_EPOCHS inside the budget.
        for size in (s for s in (96, 128, 160) if s > plan.image_size):
            assert finetune_seconds(size, MIN_GOOD_EPOCHS, CIFAR_LIKE, RATES) > PLAN_FRACTION * 60 * minutes


def test_epochs_that_fit_are_rounded_and_the_guard_cuts_the_last_one() -> None:
    fixed = finetune_seconds(96, 0, CIFAR_LIKE, RATES)
    epoch = epoch_seconds(96, CIFAR_LIKE, RATES)
    for fit, planned in ((1.4, 1), (1.6, 2), (0.6, 1), (2.5, 3)):
        minutes = (fixed + fit * epoch) / PLAN_FRACTION / 60
        plan = _plan(minutes, sizes=(96,))
        assert (plan.recipe, plan.epochs) == ("finetune", planned), fit
        assert plan.seconds <= PLAN_FRACTION * 60 * minutes + 1e-6  # rounded up: ends at the deadline
    assert _plan((fixed + 0.4 * epoch) / PLAN_FRACTION / 60, sizes=(96,)).recipe == "probe"


def test_epochs_and_recipe_limits_are_respected() -> None:
    assert _plan(600, max_epochs=2).epochs == 2
    probe = _plan(600, allow_finetune=False)
    assert probe.recipe == "probe" and probe.image_size == 160


def test_a_budget_too_small_for_anything_stops_before_work() -> None:
    with pytest.raises(ConfigError, match="even a linear probe"):
        _plan(1)


def test_sizes_between_measured_ones_are_interpolated_in_pixels() -> None:
    rates = interpolate({96: 100.0, 224: 20.0}, candidate_sizes(224))
    assert list(rates) == [96, 128, 160, 192, 224]
    assert rates[96] == 100.0 and rates[224] == 20.0
    assert all(a > b for a, b in zip(list(rates.values()), list(rates.values())[1:], strict=False))
    assert candidate_sizes(64) == [64] and candidate_sizes(160) == [96, 128, 160]


# --------------------------------------------------------------------------------------------
# Time budget: the guard, with a fake clock


class FakeClock:
    """Time moves by `tick` seconds at every reading."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_lr_decays_by_time_when_steps_lag_behind() -> None:
    clock = FakeClock(tick=0.0)
    factor = WarmupCosine(1000, 1, time_window=(0.0, 100.0), clock=clock)
    assert factor(10) == pytest.approx(1.0, abs=1e-3)  # early in steps and in time
    clock.now = 50.0
    assert factor(10) == pytest.approx(0.5)  # half the time gone: half-way down the cosine
    clock.now = 120.0
    assert factor(10) == pytest.approx(0.0)  # past the deadline


def test_fit_stops_mid_epoch_at_a_hard_deadline_and_keeps_the_best_weights(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig
    from imgclf.models.backbones import create_backbone
    from imgclf.models.classifier import ImageClassifier
    from imgclf.training.finetune import fit

    torch.manual_seed(0)
    root = make_image_folder(tmp_path / "data", per_class=12)
    dataset = load_dataset(str(root), val_fraction=0.25, seed=0)
    train = ImageStore.decode(dataset.train, PREP, memory_budget=2**30, workers=1)
    val = ImageStore.decode(dataset.val, PREP, memory_budget=2**30, workers=1)
    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    model = ImageClassifier(backbone.model, nn.Linear(backbone.num_features, 3))
    cfg = TrainConfig(data="d", out="o", batch_size=4, time_budget_minutes=1.0, augment="none", patience=5)
    clock = FakeClock(tick=0.25)
    best: dict[str, torch.Tensor] = {}

    class KeepBest:
        def on_epoch_end(self, record: dict[str, object], model: ImageClassifier) -> None:
            if record["epoch"] == 1:
                clock.now = 998.0  # a slow machine: 2 s (8 clock readings, ~2 steps) left for epoch 2
            score = (record["val_accuracy"], -record["val_loss"])  # fit's rule: accuracy, then loss
            if not best or score > tuple(best["score"].tolist()):
                best.clear()
                best.update({k: v.clone() for k, v in model.state_dict().items()})
                best["score"] = torch.tensor(score, dtype=torch.float64)

    # 27 images / 4 per batch = 7 steps per epoch; epoch 1 takes ~30 fake seconds, far from 1000.
    result = fit(model, train, val, cfg, epochs=10, device=torch.device("cpu"), dtype=torch.float32,
                 deadline=1000.0, clock=clock, callbacks=[KeepBest()])
    last = result.history[-1]
    assert result.stopped_early and len(result.history) == 2
    assert last["stopped_mid_epoch"] and 0 < last["images"] < len(train)
    assert "val_accuracy" in last  # the partial epoch was scored too
    assert all(not h["stopped_mid_epoch"] for h in result.history[:-1])
    state = model.state_dict()
    assert all(torch.equal(state[k], best[k]) for k in state)  # the best epoch's weights are loaded


def test_replanned_epochs_follow_the_measured_speed() -> None:
    options = dict(steps_per_epoch=100, steps_done=30, val_images=640, batch_size=64, max_epochs=20)
    # 1 s a step: this epoch needs 70 + 7.5 s, every further one 107.5 s.
    assert replanned_epochs(seconds_per_step=1.0, seconds_left=77.5 + 3 * 107.5, **options) == 4  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=2.0, seconds_left=77.5 + 3 * 107.5, **options) == 2  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=1.0, seconds_left=10.0, **options) == 1  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=0.001, seconds_left=1e6, **options) == 20  # type: ignore[arg-type]


@pytest.mark.parametrize("max_epochs, trained", [(3, 3), (None, 1)])
def test_a_budget_run_re_plans_its_epochs_on_the_first_steps(tmp_path: Path, max_epochs: int | None,
                                                             trained: int) -> None:
    from imgclf.config import TrainConfig
    from imgclf.models.backbones import create_backbone
    from imgclf.models.classifier import ImageClassifier
    from imgclf.training.finetune import fit

    torch.manual_seed(0)
    dataset = load_dataset(str(make_image_folder(tmp_path / "data", per_class=16)), val_fraction=0.25, seed=0)
    train = ImageStore.decode(dataset.train, PREP, memory_budget=2**30, workers=1)
    val = ImageStore.decode(dataset.val, PREP, memory_budget=2**30, workers=1)
    assert len(train) > REPLAN_AT_STEP  # batch size 1: the re-plan happens inside epoch 1
    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    model = ImageClassifier(backbone.model, nn.Linear(backbone.num_features, 3))
    cfg = TrainConfig(data="d", out="o", batch_size=1, time_budget_minutes=1.0, augment="none", patience=5)
    # Planned for 1 epoch, but the clock says steps are fast and the deadline is far away: the
    # re-plan gives the cap. Without a cap (not a budget run's fit) the plan stands.
    result = fit(model, train, val, cfg, epochs=1, device=torch.device("cpu"), dtype=torch.float32,
                 deadline=1e9, clock=FakeClock(tick=0.001), max_epochs=max_epochs)
    assert len(result.history) == trained
    if trained > 1:
        assert result.history[1]["lr"] > 0  # epoch 2 started with a live learning rate, not a spent schedule


@pytest.mark.slow  # a real run under a 1-minute budget
def test_train_with_a_time_budget_records_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import imgclf

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", per_class=10)
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), backbone=TINY_BACKBONE, random_init=True,
                         image_size=32, batch_size=8, time_budget_minutes=1.0)
    err = capsys.readouterr().err
    assert "time budget 1 min" in err
    config = json.loads((tmp_path / "m" / "imgclf.json").read_text())["config"]
    assert config["recipe"] == "finetune" and config["image_size"] == 32 and config["epochs"] >= MIN_GOOD_EPOCHS
    assert model.meta["wall_seconds"] <= 60 * 1.1


def test_a_short_budget_probes_a_stratified_subset_and_cached_features_are_free() -> None:
    usable = PLAN_FRACTION * 90
    assert all(probe_seconds(s, CIFAR_LIKE, RATES) > usable for s in (96, 128, 160))
    plan = _plan(1.5)  # no probe on all 45,000 train images fits
    assert plan.recipe == "probe" and plan.train_images is not None and 50 <= plan.train_images < 45000
    assert plan.seconds <= usable + 1e-6
    bigger = dataclasses.replace(CIFAR_LIKE, train=plan.train_images + 500)
    assert probe_seconds(plan.image_size, bigger, RATES) > usable  # the most that fit
    # Features already in the cache cost nothing but the fit: the whole set fits at 160 px.
    warm = _plan(1.5, work=dataclasses.replace(CIFAR_LIKE, cached={160: (1.0, 1.0)}))
    assert (warm.recipe, warm.image_size, warm.train_images) == ("probe", 160, None)


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


def test_a_kept_openvino_conversion_is_read_back_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ov = pytest.importorskip("openvino")
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    net = create_backbone(TINY_BACKBONE, random_init=True).model
    batch = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), PREP)
    FrozenForward(net, image_size=32, runtime="openvino")  # not kept: nothing written
    assert not (tmp_path / "cache" / "openvino").exists()
    first = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    kept = list((tmp_path / "cache" / "openvino").glob("*.xml"))
    assert len(kept) == 1 and kept[0].with_suffix(".bin").is_file()
    real_convert = ov.convert_model

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    again = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    assert torch.allclose(again, first, atol=1e-6)
    # Other weights are another network.
    other = create_backbone(TINY_BACKBONE, random_init=True).model
    with pytest.raises(AssertionError, match="converted again"):
        FrozenForward(other, image_size=32, runtime="openvino", keep_converted=True)
    # A damaged file is reported and replaced.
    monkeypatch.setattr(ov, "convert_model", real_convert)
    kept[0].write_text("<not a network")
    repaired = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    assert "ignoring the unreadable converted network" in capsys.readouterr().err
    assert torch.allclose(repaired, first, atol=1e-6)
    assert list((tmp_path / "cache" / "openvino").glob("*.xml")) == kept  # rewritten in place
