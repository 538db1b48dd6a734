"""The `article` recipe: the Keras tutorial this project grew out of, reproduced faithfully.

It was called `seed` until the name was freed for the RNG flag `--seed`; `--recipe seed` still
works (see config.canonical_recipe), and the `seed_*` names below are from that time.

The article ("Multi-class image classification with transfer learning") builds, for CIFAR-10:

- `VGG19(include_top=False, weights='imagenet', input_shape=(32, 32, 3))`, flattened to 512;
- Dense 1024 relu, Dense 512 relu, Dense 256 relu, Dropout 0.3, Dense 128 relu, Dense 10 softmax;
- `ImageDataGenerator(rotation_range=2, horizontal_flip=True, zoom_range=.1)`;
- `ReduceLROnPlateau(monitor='val_acc', factor=.01, patience=3, min_lr=1e-5)`;
- `train_test_split(x_train, y_train, test_size=.3)`.

It never compiles or fits the model, so it names no optimizer, learning rate, batch size or epoch
count; the choices here are in `SEED_DEFAULTS` (config.RECIPE_DEFAULTS) and `DEFAULT_SEED_EPOCHS`,
with their reasons. Everything else follows the article, and where the article is broken
(docs/article.md lists how) this does what it evidently meant:

- the whole network trains (Keras layers are trainable unless frozen; the article freezes none);
- the plateau scheduler really watches validation accuracy (Keras >= 2.3 names it `val_accuracy`,
  so the article's `val_acc` never fires) and is really used;
- augmentation touches training images only;
- like `model.fit` without a checkpoint callback, the weights of the last epoch are kept.

It trains in the same loop as the default recipe (`finetune.FitLoop`), as a strategy of it
(`ArticleStrategy`): only the optimizer, schedule, loss, augmentation and what to keep differ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from imgclf.config import TrainConfig
from imgclf.data.pipeline import Preprocessing, Store
from imgclf.models.article import KIND as CONV_BASE_KIND
from imgclf.models.article import create_conv_base
from imgclf.models.backbones import Backbone
from imgclf.models.classifier import ImageClassifier, build_head
from imgclf.progress import log
from imgclf.training.finetune import FitResult, WarmupCosine, fit

DEFAULT_SEED_EPOCHS = 30  # room for the plateau scheduler to act twice (see PLATEAU); Keras' fit
# has no early stopping, and the article adds none.
SEED_MIN_IMAGE_SIZE = 32  # VGG halves the input five times; 32 px gives the article's 1x1x512
SEED_MAX_IMAGE_SIZE = 224  # VGG's own training size; larger native images are reduced to it
SGD_MOMENTUM = 0.9  # the VGG paper's setting (Simonyan & Zisserman 2015, sec. 3.1)

# The article's head, as stored in the bundle (model.build_head); the final Dense 10 softmax is
# the head's output layer: softmax is applied by the loss and by predict.
SEED_HEAD_LAYERS: list[dict[str, Any]] = [
    {"type": "dense", "units": 1024, "activation": "relu"},
    {"type": "dense", "units": 512, "activation": "relu"},
    {"type": "dense", "units": 256, "activation": "relu"},
    {"type": "dropout", "rate": 0.3},
    {"type": "dense", "units": 128, "activation": "relu"},
]

# ReduceLROnPlateau(monitor='val_acc', factor=.01, patience=3, min_lr=1e-5), Keras semantics.
PLATEAU = {"factor": 0.01, "patience": 3, "min_lr": 1e-5, "min_delta": 1e-4}


def seed_head_spec(in_features: int, num_classes: int) -> dict[str, Any]:
    """The bundle description of the article's dense head.

    Example:
        >>> seed_head_spec(512, 10)["layers"][0]
        {'type': 'dense', 'units': 1024, 'activation': 'relu'}
    """
    return {"kind": "mlp", "in_features": in_features, "num_classes": num_classes,
            "layers": [dict(layer) for layer in SEED_HEAD_LAYERS]}


def build_seed_head(in_features: int, num_classes: int) -> nn.Module:
    """The article's head, initialised as Keras initialises Dense layers (Glorot uniform, zero bias).

    Example:
        >>> sum(p.numel() for p in build_seed_head(512, 10).parameters())
        1215626
    """
    head = build_head(seed_head_spec(in_features, num_classes))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


def seed_image_size(median_side: int | None) -> int:
    """The data's native size: its median shorter side, kept within what VGG can take.

    Example:
        >>> seed_image_size(32), seed_image_size(20), seed_image_size(500), seed_image_size(None)
        (32, 32, 224, 32)
    """
    if median_side is None:
        return SEED_MIN_IMAGE_SIZE
    return int(min(max(median_side, SEED_MIN_IMAGE_SIZE), SEED_MAX_IMAGE_SIZE))


class SeedAugmentation:
    """Keras' `ImageDataGenerator(rotation_range=2, horizontal_flip=True, zoom_range=.1)`, batched.

    Per image: a rotation uniform in [-2, 2] degrees, zoom factors for x and y drawn independently
    in [0.9, 1.1] (as Keras does for a float `zoom_range`), and a horizontal flip with probability
    0.5. Pixels from outside the image take the nearest edge value (Keras' `fill_mode='nearest'`).
    One `affine_grid` + `grid_sample` call transforms the whole batch.

    Example:
        >>> out = SeedAugmentation()(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.Generator())
        >>> out.shape, out.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
    """

    def __init__(self, *, rotation_degrees: float = 2.0, zoom: float = 0.1, flip: bool = True) -> None:
        self.rotation_degrees = rotation_degrees
        self.zoom = zoom
        self.flip = flip

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 or float N x 3 x H x W -> float 0..255 of the same size."""
        n = batch.shape[0]
        angle = torch.empty(n).uniform_(-self.rotation_degrees, self.rotation_degrees, generator=generator)
        angle = angle * (math.pi / 180.0)
        # Keras: zx, zy in [1 - zoom, 1 + zoom] scale the sampling grid (zx > 1 shows more of the image).
        zoom_x = torch.empty(n).uniform_(1 - self.zoom, 1 + self.zoom, generator=generator)
        zoom_y = torch.empty(n).uniform_(1 - self.zoom, 1 + self.zoom, generator=generator)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * zoom_x, -sin * zoom_y
        theta[:, 1, 0], theta[:, 1, 1] = sin * zoom_x, cos * zoom_y
        if self.flip:
            flipped = torch.rand(n, generator=generator) < 0.5
            theta[:, 0, :2] *= torch.where(flipped, -1.0, 1.0).view(n, 1)
        images = batch.float()
        grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class PlateauScheduler:
    """Keras' `ReduceLROnPlateau` for a metric to maximise, stepped once per epoch.

    After `patience` epochs in a row without an improvement of more than `min_delta`, every
    learning rate is multiplied by `factor`, but never set below `min_lr`; the count then restarts.
    (PyTorch's own ReduceLROnPlateau reduces one epoch later, after `patience + 1` bad epochs, and
    measures improvement relative to the best; this keeps Keras' behaviour, which the article used.)

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
        >>> plateau = PlateauScheduler(opt, factor=0.01, patience=3, min_lr=1e-5)
        >>> [plateau.step(acc) for acc in (0.5, 0.5, 0.5, 0.5)][-1]
        True
        >>> opt.param_groups[0]["lr"]
        0.0001
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, factor: float, patience: int, min_lr: float,
        min_delta: float = 1e-4,
    ) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.patience = patience
        self.min_lr = min_lr
        self.min_delta = min_delta
        self.best = -math.inf
        self.wait = 0

    def step(self, value: float) -> bool:
        """Record this epoch's metric; returns True when the learning rate was reduced."""
        if value > self.best + self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        self.wait = 0
        reduced = False
        for group in self.optimizer.param_groups:
            old = float(group["lr"])
            if old > self.min_lr:
                group["lr"] = max(old * self.factor, self.min_lr)
                reduced = True
        return reduced


def seed_setup(cfg: TrainConfig, median_side: int | None) -> tuple[Preprocessing, Backbone]:
    """The input (the data's native size, the weights' mean and std) and the VGG conv base."""
    size = cfg.image_size or seed_image_size(median_side)
    backbone = create_conv_base(cfg.backbone, image_size=size, weights=cfg.weights, random_init=cfg.random_init)
    if cfg.random_init:
        log("warning: random init (--random-init); the article starts from ImageNet weights")
    return Preprocessing.from_data_config(backbone.data_config, size), backbone


def seed_meta(backbone: Backbone, num_classes: int) -> dict[str, Any]:
    """The bundle's `backbone` and `head` entries for the article's network (read by bundle.Model.load)."""
    return {
        "backbone": {
            "kind": CONV_BASE_KIND,
            "name": backbone.entry.name,
            "timm_name": backbone.entry.timm_name,
            "weights_source": backbone.weights_source,
            "num_features": backbone.num_features,
        },
        "head": seed_head_spec(backbone.num_features, num_classes),
    }


def build_seed_model(base: nn.Module, num_features: int, num_classes: int) -> ImageClassifier:
    """The article's full network: conv base, then the dense head."""
    return ImageClassifier(base, build_seed_head(num_features, num_classes))


class ArticleStrategy:
    """The article's (intended) `model.fit`, as a strategy of the one fine-tuning loop (`finetune.FitLoop`).

    SGD with momentum 0.9 at `cfg.lr` (the article recipe's default 0.01, see config.RECIPE_DEFAULTS),
    no weight decay; plain cross-entropy; `SeedAugmentation`; the plateau scheduler stepped with
    validation accuracy after every epoch; the last epoch's weights kept, no early stopping.
    """

    keeps_best = False  # like model.fit without a checkpoint callback

    def __init__(self) -> None:
        self.plateau: PlateauScheduler | None = None

    def optimizer(self, model: ImageClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=SGD_MOMENTUM)
        self.plateau = PlateauScheduler(optimizer, **PLATEAU)  # type: ignore[arg-type]
        return optimizer

    def scheduler(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> Any:
        # The loop steps a scheduler after every batch; this one leaves the lr alone, so that only
        # the plateau scheduler changes it.
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)

    def criterion(self, model: ImageClassifier, train_store: Store, cfg: TrainConfig,
                  device: torch.device) -> nn.Module:
        return nn.CrossEntropyLoss()

    def augmentation(self, cfg: TrainConfig) -> SeedAugmentation:
        return SeedAugmentation(flip=cfg.flip)

    def after_validation(self, record: dict[str, Any], optimizer: torch.optim.Optimizer) -> str:
        if self.plateau is None:
            raise RuntimeError("ArticleStrategy.optimizer() builds the plateau scheduler; the loop calls it first")
        record["lr_reduced"] = self.plateau.step(record["val_accuracy"])
        after = f" -> {optimizer.param_groups[0]['lr']:g}" if record["lr_reduced"] else ""
        return f" | lr {record['lr']:g}{after}"


def fit_article(
    model: ImageClassifier, train_store: Store, val_store: Store, cfg: TrainConfig, **options: Any
) -> FitResult:
    """Train the whole network like the article's (intended) `model.fit` (see `ArticleStrategy`).

    `options` are `finetune.fit`'s (`epochs`, `device`, `dtype`, `deadline`, `callbacks`, `clock`);
    the article's run has no checkpoints and no baseline.

    Training stops early only when `deadline` (a `clock()` value) would be passed by another epoch;
    under a time budget (`cfg.time_budget_minutes`) the deadline is hard: the epoch stops mid-way
    when it passes and that partial epoch is scored on val (one epoch of VGG19 at 32 px over 35,000
    images takes longer than a 15-minute budget on 2 cores).

    Example:
        >>> result = fit_article(model, train, val, cfg, epochs=30, device=torch.device("cpu"),
        ...                      dtype=torch.float32)  # doctest: +SKIP
        >>> result.history[-1]["val_accuracy"]  # doctest: +SKIP
    """
    return fit(model, train_store, val_store, cfg, strategy=ArticleStrategy(), **options)
