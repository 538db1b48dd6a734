"""LP-FT keeps what the probe found: fine-tuning starts at the probe's logits, and the bundle is the
best of the probe's head and every fine-tuned epoch on val.

Precision-sensitive checks run in both precisions, forced, whatever the CPU has (bf16 autocast is
emulated where the CPU lacks it; OpenVINO's bf16 hint then falls back to fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder

# Largest |logit difference| allowed between the training network at step 0 and the probe's head on
# the frozen runtime's features, relative to the largest |logit|. fp32: float rounding (measured 0 on
# torch, 1.0e-6 on OpenVINO). bf16 keeps 8 bits of mantissa: measured 0.37% (torch) and 0.79%
# (OpenVINO) of the largest logit on an AMD EPYC with AVX512-BF16 (2026-12-01). A dropout left on in
# training mode, other preprocessing or another layout give differences of the size of the logits.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def runtimes() -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["torch"]
    return ["torch", "openvino"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("runtime", runtimes())
def test_training_network_starts_at_the_probes_logits(tmp_path: Path, runtime: str, precision: str) -> None:
    from imgclf.data.pipeline import ImageStore, Preprocessing, normalize
    from imgclf.data.sources import load_dataset
    from imgclf.models.backbones import create_backbone
    from imgclf.models.classifier import ImageClassifier
    from imgclf.runtime import FrozenForward, autocast, compute_dtype, run_frozen
    from imgclf.training.probe import fit_probe

    torch.manual_seed(0)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=40)
    dataset = load_dataset(str(data), val_fraction=0.25, seed=0)
    prep = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    train = ImageStore.decode(dataset.train, prep, memory_budget=2**30)
    val = ImageStore.decode(dataset.val, prep, memory_budget=2**30)
    backbone = create_backbone(TINY_BACKBONE, random_init=True).model
    device = torch.device("cpu")
    forward = FrozenForward(backbone, image_size=32, device=device, precision=precision, runtime=runtime)
    train_x, train_y, _ = run_frozen(forward, train, batch_size=8, desc="train")
    val_x, val_y, _ = run_frozen(forward, val, batch_size=8, desc="val")
    head = fit_probe(train_x, train_y, val_x, val_y, 3, [1e-2, 1e-1], label_smoothing=0.1).head

    # The network as train_one_epoch sees it: train mode, BatchNorm frozen, channels_last, autocast.
    model = ImageClassifier(backbone, head).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.set_backbone_trainable(True, freeze_bn=True)
    _, batch = train.batch(np.arange(len(train)))
    with torch.no_grad(), autocast(device, compute_dtype(device, precision)):
        training_logits = model(normalize(batch, prep)).float()
    with torch.no_grad():
        probe_logits = head(train_x)
    scale = float(probe_logits.abs().max())
    difference = float((training_logits - probe_logits).abs().max())
    assert difference <= RELATIVE_TOLERANCE[precision] * scale, (difference, scale)
    # The same predictions, except where the probe itself is undecided within the tolerance.
    top2 = probe_logits.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * RELATIVE_TOLERANCE[precision] * scale
    assert torch.equal(training_logits.argmax(1)[decided], probe_logits.argmax(1)[decided])


def test_ruinous_fine_tuning_leaves_the_probe_head_in_the_bundle(tmp_path: Path) -> None:
    import imgclf

    data = make_image_folder(tmp_path / "data", classes=3, per_class=16, size=40)
    out = tmp_path / "run"
    # lr 3 per AdamW step moves every weight by ~3: the fine-tuned network is wrecked at once.
    model = imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True,
                         recipe="finetune", image_size=32, batch_size=8, epochs=2, lr=3.0, precision="fp32",
                         test_time_size_search=False)
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2]
    probe, *epochs = history
    assert all(r["val_accuracy"] < probe["val_accuracy"] for r in epochs), history  # it really was ruined
    assert probe["selected"] and not any(r["selected"] for r in epochs)
    meta = json.loads((out / "imgclf.json").read_text())
    assert meta["selection"]["chosen"] == "probe" and meta["selection"]["epoch"] == 0
    assert [c["epoch"] for c in meta["selection"]["candidates"]] == [0, 1, 2]
    assert meta["metrics"]["val"]["accuracy"] == pytest.approx(probe["val_accuracy"], abs=1e-6)
    assert model.meta["metrics"]["val"]["accuracy"] >= max(r["val_accuracy"] for r in epochs)
    assert "kept the probe's head" in (out / "train.log").read_text()


def test_early_stopping_counts_from_the_best_fine_tuned_epoch_not_from_the_probe(tmp_path: Path) -> None:
    from stand_ins import tiny_fit_inputs

    from imgclf.config import TrainConfig
    from imgclf.training.finetune import fit, improves_on_val

    model, train, val = tiny_fit_inputs(make_image_folder(tmp_path / "data", per_class=12))
    cfg = TrainConfig(data="d", out="o", batch_size=4, augment="none", patience=1, lr=1e-3)
    # A probe no epoch can beat: under the old rule its score stopped the run after epoch 1.
    result = fit(model, train, val, cfg, epochs=6, device=torch.device("cpu"), dtype=torch.float32,
                 baseline={"val_accuracy": 1.01, "val_loss": 0.0})
    tuned = result.history[1:]
    assert len(tuned) >= 2, result.history
    assert result.best_epoch == 0  # the probe is still the one kept
    # Every epoch but the last improved on the fine-tuned ones before it (val accuracy or loss); the last
    # (with patience 1) did not, unless the run used all 6 epochs.
    for record in tuned[:-1]:
        assert improves_on_val(result.history, record["epoch"]), result.history
    if len(tuned) < 6:
        assert result.stopped_early
        assert not improves_on_val(result.history, tuned[-1]["epoch"]), result.history


@pytest.mark.parametrize("keep", [False, True])
def test_checkpoints_are_deleted_after_a_good_run_unless_kept(tmp_path: Path, keep: bool) -> None:
    import imgclf
    from imgclf.training import checkpoint as ckpt

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                 image_size=32, batch_size=8, epochs=1, keep_checkpoints=keep, test_time_size_search=False)
    assert (out / ckpt.CHECKPOINTS / ckpt.FINISHED_FILE).is_file()
    assert bool(ckpt.checkpoint_folders(out)) is keep
    assert not [p for p in (out / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(ckpt.TRASH_PREFIX)]
    # One confusion image, the report's (val's numbers are in imgclf.json).
    assert [p.relative_to(out).as_posix() for p in out.rglob("*confusion*.png")] == ["report/confusion_matrix.png"]
    # The folder can be trained into again without --resume.
    imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                 image_size=32, batch_size=8, epochs=1, test_time_size_search=False)


def test_compare_ranks_backbones_by_probe_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgclf.cli import main
    from imgclf.models import backbones

    def create(name: str, **options: object) -> backbones.Backbone:  # the tiny test models have no weights
        torch.manual_seed(0)  # the same random weights every time, so the feature cache can hit
        return backbones.create_backbone(name, random_init=True)

    monkeypatch.setattr("imgclf.training.compare.create_backbone", create)
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))  # no features from other tests
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=32)
    args = ["compare", str(data), "--backbones", f"{TINY_BACKBONE},test_resnet", "--image-size", "32", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["backbones"]
    assert [r["backbone"] for r in rows] in ([TINY_BACKBONE, "test_resnet"], ["test_resnet", TINY_BACKBONE])
    assert rows[0]["val_accuracy"] >= rows[1]["val_accuracy"]
    assert all(r["image_size"] == 32 and r["parameters"] > 0 and r["images_per_second"] for r in rows)
    # Again: every feature comes from the cache, so no forward pass runs and no speed is measured.
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)["backbones"]
    assert [r["val_accuracy"] for r in again] == [r["val_accuracy"] for r in rows]
    assert all(r["images_per_second"] is None for r in again)


@pytest.mark.parametrize("options, expected", [
    ({}, 160),  # test_efficientnet's own 160 px, above CPU fine-tuning's 128
    ({"image_size": 128}, None),  # a size the user fixed
    ({"full_size_probe": False}, None),
    ({"recipe": "probe"}, None),  # the probe recipe is the probe at full size
    ({"epochs": 0}, None),
])
def test_a_full_size_probe_competes_when_fine_tuning_runs_below_the_probes_size(
        tmp_path: Path, options: dict, expected: int | None) -> None:
    import time

    from imgclf.config import TrainConfig
    from imgclf.data.sources import load_dataset
    from imgclf.training.run import _plan

    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=200)
    dataset = load_dataset(str(data), val_fraction=0.25, seed=0)
    cfg = TrainConfig(**{"data": str(data), "out": "o", "backbone": TINY_BACKBONE, "random_init": True, "epochs": 1,
                         "precision": "fp32", **options})
    assert _plan(cfg, dataset, torch.device("cpu"), time.perf_counter()).full_size_probe == expected


def ruined_run_with_a_full_size_probe(tmp_path: Path) -> tuple[Path, dict]:
    """lr 3 wrecks fine-tuning at 128 px; a probe at 160 px competes (200 px images)."""
    import imgclf

    data = make_image_folder(tmp_path / "data", classes=3, per_class=16, size=200)
    out = tmp_path / "run"
    imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                 batch_size=8, epochs=1, lr=3.0, precision="fp32", test_time_size_search=False)
    return out, json.loads((out / "imgclf.json").read_text())


def test_the_full_size_probe_is_scored_recorded_and_kept_only_above_the_rest(tmp_path: Path) -> None:
    out, meta = ruined_run_with_a_full_size_probe(tmp_path)
    probe = meta["full_size_probe"]
    assert probe["image_size"] == 160 and probe["label_smoothing"] == 0.0  # fitted as the probe recipe fits
    candidates = meta["selection"]["candidates"]
    assert [c["epoch"] for c in candidates] == [0, 1, None] and candidates[-1]["model"] == "probe at 160 px"
    assert candidates[-1]["val_accuracy"] == probe["selection"]["val_accuracy"]
    best_fine_tuned = max(c["val_accuracy"] for c in candidates[:-1])
    assert probe["selected"] is (probe["selection"]["val_accuracy"] > best_fine_tuned)  # ties: fine-tuned side
    # Whatever won, the bundle is the best candidate on val (fp32: the final scores match the candidates').
    assert meta["metrics"]["val"]["accuracy"] == pytest.approx(max(c["val_accuracy"] for c in candidates), abs=1e-6)
    assert meta["preprocessing"]["image_size"] == (160 if probe["selected"] else 128)
    assert "full-size probe: val accuracy" in (out / "train.log").read_text()
    assert "probe at 160 px" in (out / "report" / "report.html").read_text()


def test_a_winning_full_size_probe_is_what_the_bundle_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgclf
    from imgclf.training import run

    real = run._full_size_probe_wins

    def wins_over_anything(candidate, best_val, eval_size, score):  # type: ignore[no-untyped-def]
        return real(candidate, -1.0, None, score)  # the real record and log, against a bar it clears

    monkeypatch.setattr(run, "_full_size_probe_wins", wins_over_anything)
    out, meta = ruined_run_with_a_full_size_probe(tmp_path)
    history = json.loads((out / "history.json").read_text())
    assert not any(r["selected"] for r in history)
    assert meta["selection"]["chosen"] == "probe at 160 px" and meta["selection"]["epoch"] is None
    assert meta["full_size_probe"]["selected"] and meta["preprocessing"]["image_size"] == 160
    # The bundle holds the pretrained backbone with the 160 px head, not the wrecked network: scoring
    # it again on val gives the probe's val accuracy.
    val_accuracy = meta["full_size_probe"]["selection"]["val_accuracy"]
    assert meta["metrics"]["val"]["accuracy"] == pytest.approx(val_accuracy, abs=1e-6)
    from imgclf.data.sources import load_dataset
    from imgclf.models.backbones import create_backbone

    model = imgclf.load(str(out))
    assert model.preprocessing.image_size == 160
    # Its backbone is the one training started from, bit for bit (train seeds torch with 0 and draws
    # nothing before building it), though an epoch at lr 3 changed the network it fine-tuned.
    assert [r["epoch"] for r in history] == [0, 1]
    torch.manual_seed(0)
    initial = create_backbone(TINY_BACKBONE, random_init=True).model.state_dict()
    kept = model.module.backbone.state_dict()
    assert initial.keys() == kept.keys() and all(torch.equal(kept[k], v) for k, v in initial.items())
    val = load_dataset(str(tmp_path / "data"), val_fraction=0.1, seed=0).val  # the run's split (its defaults)
    predicted = [model.classes.index(p.label) for p in model.predict(list(val.paths), runtime="torch")]
    assert np.mean(np.array(predicted) == val.labels) == pytest.approx(val_accuracy, abs=1e-6)
    report = (out / "report" / "report.html").read_text()
    assert "probe at 160 px</td>" in report


def test_early_stopping_waits_while_the_val_loss_still_falls() -> None:
    from imgclf.training.finetune import improves_on_val

    # 2,000 CIFAR-10 images, 15-min budget (2026-12-01): flat val accuracy on 200 images, falling loss.
    history = [{"epoch": 0, "val_accuracy": 0.770, "val_loss": 0.80},
               {"epoch": 1, "val_accuracy": 0.780, "val_loss": 0.773},
               {"epoch": 2, "val_accuracy": 0.775, "val_loss": 0.699},
               {"epoch": 3, "val_accuracy": 0.775, "val_loss": 0.632},
               {"epoch": 4, "val_accuracy": 0.775, "val_loss": 0.671},
               {"epoch": 5, "val_accuracy": 0.790, "val_loss": 0.690}]
    assert [improves_on_val(history, e) for e in range(1, 6)] == [True, True, True, False, True]
    # The probe's head (epoch 0) is no mark: its lower loss or higher accuracy does not count against epoch 1.
    assert improves_on_val([{"epoch": 0, "val_accuracy": 0.99, "val_loss": 0.01}, history[1]], 1)
