"""The article recipe (formerly `seed`): its network, parameter counts, scheduler, split and a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from torch import nn

from imgclf.cli import main
from imgclf.config import TrainConfig, resolve_config
from imgclf.data.pipeline import ImageStore
from imgclf.data.sources import load_dataset
from imgclf.errors import BackboneError
from imgclf.models.article import create_conv_base
from imgclf.models.classifier import ImageClassifier
from imgclf.summary import summarize_recipe
from imgclf.training.article import PlateauScheduler, SeedAugmentation, build_seed_head

# The article's model.summary() (VGG19 at 32 px, include_top=False, then the dense head).
ARTICLE_COUNTS = [
    ("vgg19", 20_024_384),
    ("flatten", 0),
    ("dense", 525_312),
    ("dense_1", 524_800),
    ("dense_2", 131_328),
    ("dropout", 0),
    ("dense_3", 32_896),
    ("dense_4", 1_290),
]


def test_summary_matches_the_article_row_by_row() -> None:
    summary = summarize_recipe("article", backbone="vgg19", num_classes=10, image_size=32)
    assert [(r.name, r.params) for r in summary.rows] == ARTICLE_COUNTS
    assert summary.total_params == 21_240_010
    assert summary.trainable_params == 21_240_010 and summary.non_trainable_params == 0
    shapes = [r.output_shape for r in summary.rows]
    assert shapes[:2] == [(None, 512, 1, 1), (None, 512)]
    assert shapes[-1] == (None, 10)
    kinds = [r.kind for r in summary.rows]
    assert kinds[2:] == ["Dense, relu", "Dense, relu", "Dense, relu", "Dropout 0.3", "Dense, relu", "Dense, softmax"]


def test_head_layout_is_the_articles() -> None:
    head = build_seed_head(512, 10)
    layers = [(type(m).__name__, getattr(m, "out_features", getattr(m, "p", None))) for m in head]
    assert layers == [
        ("Linear", 1024), ("ReLU", None), ("Linear", 512), ("ReLU", None), ("Linear", 256), ("ReLU", None),
        ("Dropout", 0.3), ("Linear", 128), ("ReLU", None), ("Linear", 10),
    ]
    # Keras' Dense initialisation: zero biases.
    assert all(not m.bias.detach().any() for m in head if isinstance(m, nn.Linear))


def test_conv_base_has_no_pre_logits_and_flattens() -> None:
    base = create_conv_base("vgg19", image_size=64, random_init=True)
    names = {n.split(".")[0] for n, _ in base.model.named_parameters()}
    assert names == {"features"}
    assert base.num_features == 512 * 2 * 2  # 64 px -> 2 x 2 x 512, flattened
    assert base.model(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
    assert base.weights_source == "random init"


def test_conv_base_offline_without_weights_is_a_clear_error() -> None:
    with pytest.raises(BackboneError, match="--random-init"):
        create_conv_base("vgg19", image_size=32)


def test_conv_base_loads_a_weights_file_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    donor = create_conv_base("vgg19", image_size=32, random_init=True).model
    state = {k: v.clone() for k, v in donor.state_dict().items()}
    state["pre_logits.fc1.weight"] = torch.zeros(2, 2)  # a full timm checkpoint has more: ignored
    save_file(state, str(tmp_path / "vgg19.safetensors"))
    loaded = create_conv_base("vgg19", image_size=32, weights=tmp_path / "vgg19.safetensors")
    assert loaded.weights_source.startswith("file ")
    assert torch.equal(loaded.model.features[0].weight, donor.features[0].weight)


def test_non_vgg_backbone_is_refused() -> None:
    with pytest.raises(BackboneError, match="VGG"):
        create_conv_base("test_efficientnet", image_size=32, random_init=True)


def test_plateau_divides_lr_by_100_after_3_flat_epochs_and_stops_at_min_lr() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    plateau = PlateauScheduler(optimizer, factor=0.01, patience=3, min_lr=1e-5)
    lr = lambda: optimizer.param_groups[0]["lr"]  # noqa: E731
    assert not plateau.step(0.50)  # first epoch: an improvement
    assert not plateau.step(0.50) and not plateau.step(0.49)  # 2 flat epochs: unchanged
    assert lr() == pytest.approx(0.01)
    assert plateau.step(0.50)  # the 3rd epoch without improvement
    assert lr() == pytest.approx(1e-4)
    assert not plateau.step(0.60)  # an improvement resets the count
    for _ in range(2):
        plateau.step(0.60)
    assert lr() == pytest.approx(1e-4)
    assert plateau.step(0.60)
    assert lr() == pytest.approx(1e-5)  # 1e-6 would be below min_lr
    for _ in range(9):
        plateau.step(0.1)
    assert lr() == pytest.approx(1e-5)


def test_plateau_counts_tiny_gains_as_no_improvement() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = PlateauScheduler(optimizer, factor=0.5, patience=2, min_lr=0.0)
    for value in (0.5, 0.50005, 0.5001):  # below Keras' min_delta of 1e-4
        plateau.step(value)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_article_split_is_70_30_stratified_and_seeded(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=20, size=8)
    cfg = resolve_config(data=str(data), out="o", recipe="article")
    assert cfg.val_fraction == 0.3 and cfg.backbone == "vgg19"
    first = load_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=0)
    assert first.val.class_counts(3) == [6, 6, 6] and first.train.class_counts(3) == [14, 14, 14]
    again = load_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=0)
    other = load_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=1)
    assert again.val.paths == first.val.paths
    assert other.val.paths != first.val.paths
    assert not set(first.val.paths) & set(first.train.paths)


def test_recipe_defaults_yield_to_flags() -> None:
    cfg = resolve_config({"lr": 0.05}, data="d", out="o", recipe="article", val_fraction=0.2)
    assert (cfg.lr, cfg.val_fraction) == (0.05, 0.2)
    assert resolve_config(data="d", out="o").val_fraction == 0.1  # other recipes unchanged


def test_the_old_name_seed_is_accepted_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = resolve_config(data="d", out="o", recipe="seed")
    assert (cfg.recipe, cfg.backbone, cfg.val_fraction) == ("article", "vgg19", 0.3)  # the article's defaults
    assert "the recipe 'seed' is now called 'article'" in capsys.readouterr().err
    assert TrainConfig(data="d", out="o", recipe="seed").recipe == "article"  # type: ignore[arg-type]
    assert resolve_config({"recipe": "seed"}, data="d", out="o").recipe == "article"  # from a YAML file too


def test_a_bundle_written_with_the_old_recipe_name_loads(tmp_path: Path) -> None:
    import shutil

    import imgclf
    from imgclf.summary import summarize_bundle

    bundle = shutil.copytree(Path(__file__).parent / "fixtures" / "bundle-82c994e", tmp_path / "old")
    meta = json.loads((bundle / "imgclf.json").read_text(encoding="utf-8"))
    meta["recipe"] = meta["config"]["recipe"] = "seed"
    (bundle / "imgclf.json").write_text(json.dumps(meta), encoding="utf-8")
    model = imgclf.load(bundle)
    assert model.predict([str(bundle / "images" / "class_1_0.png")])[0].label == "class_1"
    assert "recipe article" in summarize_bundle(bundle).title


def test_augmentation_is_mild_and_seeded() -> None:
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    augment = SeedAugmentation(flip=False)
    a = augment(batch, torch.Generator().manual_seed(1))
    b = augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.shape == batch.shape
    # +-2 degrees and +-10% zoom move pixels a little: the centre stays close to the original.
    centre = (a - batch.float())[:, :, 12:20, 12:20].abs().mean()
    assert 0 < centre < (batch.float() - batch.float().mean()).abs().mean()
    flipped = SeedAugmentation(rotation_degrees=0, zoom=0)(batch, torch.Generator().manual_seed(3))
    mirrored = [torch.allclose(f, x.float().flip(2), atol=1e-3) for f, x in zip(flipped, batch, strict=True)]
    unchanged = [torch.allclose(f, x.float(), atol=1e-3) for f, x in zip(flipped, batch, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True)) and any(mirrored) and any(unchanged)


# VGG19 at 32 px trains at a few images/s on a busy 2-core CPU, so the default run uses VGG11
# (same code path, ~2.5x less compute); the VGG19 run is marked slow.
@pytest.mark.parametrize(
    ("backbone", "epochs"), [("vgg11", 1), pytest.param("vgg19", 2, marks=pytest.mark.slow)]
)
def test_article_recipe_end_to_end(
    backbone: str, epochs: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import imgclf
    from imgclf.bundle import Model

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=32)
    out = tmp_path / "model"
    code = main(["train", str(data), "--out", str(out), "--recipe", "article", "--backbone", backbone,
                 "--random-init", "--epochs", str(epochs), "--batch-size", "16"])
    assert code == 0
    model = Model.load(out)
    assert model.meta["backbone"]["kind"] == "conv_base"
    assert model.meta["backbone"]["weights_source"] == "random init"
    assert model.meta["config"]["random_init"] is True
    assert model.meta["head"]["kind"] == "mlp" and len(model.meta["head"]["layers"]) == 5
    assert model.preprocessing.image_size == 32  # native size, not upscaled
    assert len(model.meta["history"]) == epochs and model.meta["history"][0]["lr"] == pytest.approx(0.01)
    assert (out / "report" / "confusion_matrix.png").is_file()
    predictions = imgclf.load(out).predict([str(p) for p in sorted((data / "class_0").iterdir())[:2]], top_k=3)
    assert all(abs(sum(prob for _, prob in p.top_k) - 1.0) < 1e-4 for p in predictions)
    capsys.readouterr()
    assert main(["summary", str(out)]) == 0
    printed = capsys.readouterr().out
    head = 525_312 + 524_800 + 131_328 + 32_896 + 128 * 3 + 3
    base = sum(p.numel() for p in model.module.backbone.parameters())
    if backbone == "vgg19":
        assert base == 20_024_384
    assert f"Total params: {base + head:,}" in printed


def test_summary_of_a_probe_bundle_counts_the_backbone_as_frozen(
    tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["summary", str(tiny_bundle)]) == 0
    printed = capsys.readouterr().out
    assert "dense (Dense, softmax)" in printed
    total = int(printed.split("Total params: ")[1].split()[0].replace(",", ""))
    trainable = int(printed.split("Trainable params: ")[1].split()[0].replace(",", ""))
    assert 0 < trainable < total  # only the linear head trains in the probe recipe


def test_summary_without_bundle_or_classes_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--recipe", "article"]) == 2
    assert "--num-classes" in capsys.readouterr().err


def _tiny_article_run(tmp_path: Path) -> tuple[ImageClassifier, ImageStore, ImageStore]:
    """The article's network on a random-init VGG11 at 32 px, with decoded train and val stores of 2 classes."""
    from imgclf.data.pipeline import Preprocessing
    from imgclf.training.article import build_seed_model

    dataset = load_dataset(str(make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)),
                           val_fraction=0.25, seed=0)
    prep = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    train, val = (ImageStore.decode(s, prep, memory_budget=2**26, workers=1) for s in (dataset.train, dataset.val))
    base = create_conv_base("vgg11", image_size=32, random_init=True)
    return build_seed_model(base.model, base.num_features, 2), train, val


def test_under_a_time_budget_the_article_epoch_stops_at_the_deadline(tmp_path: Path) -> None:
    import time

    from imgclf.config import TrainConfig
    from imgclf.training.article import fit_article

    model, train, val = _tiny_article_run(tmp_path)
    cfg = TrainConfig(data="d", out="o", recipe="article", batch_size=4, time_budget_minutes=1.0)
    # The deadline has passed: a budget run stops before its next step, even in the first epoch,
    # and the (empty) partial epoch is still scored on val.
    history = fit_article(model, train, val, cfg, epochs=5, device=torch.device("cpu"), dtype=torch.float32,
                          deadline=time.perf_counter()).history
    assert len(history) == 1 and history[0]["stopped_mid_epoch"] and history[0]["images"] == 0
    assert "val_accuracy" in history[0]
    # Without a budget the same deadline still lets the first epoch run whole (the epoch guard).
    cfg = TrainConfig(data="d", out="o", recipe="article", batch_size=4, max_minutes=1.0)
    history = fit_article(model, train, val, cfg, epochs=5, device=torch.device("cpu"), dtype=torch.float32,
                          deadline=time.perf_counter()).history
    assert len(history) == 1 and not history[0]["stopped_mid_epoch"] and history[0]["images"] == len(train)


def test_the_article_trains_in_the_shared_loop_keeping_its_last_epoch_and_plateau(tmp_path: Path) -> None:
    """ArticleStrategy in finetune.FitLoop: SGD at cfg.lr, the plateau scheduler stepped on val
    accuracy (lr_reduced in every record), no epoch 0 and no early stopping, and the weights of the
    last epoch kept even when an earlier one scored better (Keras' model.fit)."""
    import copy

    from imgclf.training.article import ArticleStrategy, fit_article

    model, train, val = _tiny_article_run(tmp_path)

    class Snapshots:
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_epoch_end(self, record: dict[str, object], model: nn.Module) -> None:
            self.states.append(copy.deepcopy(model.state_dict()))

    snapshots = Snapshots()
    # lr 0.05 on VGG11 without BatchNorm: val accuracy moves epoch to epoch, so "last" and "best" can differ.
    cfg = TrainConfig(data="d", out="o", recipe="article", batch_size=4, lr=0.05, patience=1)
    result = fit_article(model, train, val, cfg, epochs=4, device=torch.device("cpu"), dtype=torch.float32,
                         callbacks=[snapshots])
    history = result.history
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # no probe candidate, no early stop despite patience 1
    assert all(isinstance(r["lr_reduced"], bool) for r in history)
    assert result.best_epoch == 4 and [r["selected"] for r in history] == [False, False, False, True]
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots.states[-1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots.states[0][k]) for k in final)  # it did train
    strategy = ArticleStrategy()
    optimizer = strategy.optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05
    assert optimizer.param_groups[0]["momentum"] == 0.9
