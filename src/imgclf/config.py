"""The one place where a training run is configured.

`TrainConfig` is a flat, typed dataclass. A YAML file and CLI flags are merged into it here and
nowhere else (`resolve_config`): defaults < YAML file < flags. The resolved config is written next
to the model (`config.yaml`) and into the bundle's `imgclf.json`, so every run can be repeated.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from imgclf.distributed import is_main
from imgclf.errors import ConfigError

Recipe = Literal["probe", "finetune", "article"]
Precision = Literal["auto", "bf16", "fp32"]
RECIPES: tuple[str, ...] = get_args(Recipe)
# Old recipe names, still accepted: "seed" sat beside the RNG flag --seed and read as one.
RECIPE_ALIASES: dict[str, Recipe] = {"seed": "article"}

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# `backbone: auto` (the default): the recipe's default backbone, except that a fine-tuning run under a time
# budget screens the other offline backbones and may take a larger one (training/choose.py).
AUTO_BACKBONE = "auto"
DEFAULT_PROBE_L2 = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # the probe's L2 strengths, chosen on val

# Per-recipe defaults, between the dataclass defaults and the YAML file: defaults < these < file < flags.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The article (training/article.py): its 70/30 split and VGG19; it names no optimizer, so
    # SGD (momentum 0.9) at lr 0.01 per batch of 64, VGG's own training recipe (paper: 0.01 at 256).
    "article": {"backbone": "vgg19", "val_fraction": 0.3, "lr": 0.01, "batch_size": 64},
}


@dataclass
class TrainConfig:
    """Everything that decides what a training run does.

    Example:
        >>> cfg = TrainConfig(data="photos/", out="runs/photos", recipe="probe")
        >>> cfg.backbone, default_backbone(cfg.recipe)
        ('auto', 'tf_efficientnet_lite0')
    """

    data: str = ""  # folder, split folder, CSV manifest, or "cifar10"/"cifar100"
    out: str = ""  # bundle folder to write
    # any timm name (curated ones know their offline weights); auto: chosen on evidence (training/choose.py)
    backbone: str = AUTO_BACKBONE
    weights: str | None = None  # local weights file; None = offline package, then the hub
    random_init: bool = False  # train from scratch; must be asked for explicitly
    recipe: Recipe = "finetune"
    epochs: int | None = None  # fine-tuning epochs after the head fit; None = the time budget plans them
    image_size: int | None = None  # square input side in px; None = see data.choose_image_size
    batch_size: int = 64  # images per optimizer step and per inference batch
    seed: int = 0
    val_fraction: float = 0.1  # share of train held out when no val split is given (stratified)
    max_bad_fraction: float = 0.05  # stop before training when more than this share of files is unreadable

    # finetune: stage 1 fits the head on frozen features (a linear probe), stage 2 unfreezes.
    # AdamW peak learning rate of the head, per batch of `batch_size`. AdamW moves every weight by about
    # lr per step whatever its gradient, so a head that the probe already fitted is knocked off its
    # optimum by a large one: at 1e-3 the digits' first-epoch loss jumped from 0.64 to 2.09 and val fell
    # to 0.888 (probe 0.930); at 3e-4 it stayed at 0.58-0.71 and val reached 0.923-0.937 in 2 epochs,
    # while one epoch on 5,000 CIFAR-10 images scored 0.811 against 0.817 at 1e-3 and 0.789 at 1e-4
    # (2,000 val images, +-0.9 points; benchmarks in BENCHMARKS.md, 2026-11-30).
    lr: float = 3e-4
    # backbone lr = lr * ratio (discriminative learning rates). 1: one rate, as LP-FT (Kumar et al. 2022)
    # uses; on a CPU the frozen early stages take the part of a lower rate there. 9,000 CIFAR-10 images,
    # 2 epochs at 96 px: val 0.869 / test 0.856 at 1, 0.842 / 0.832 at 0.3; with the head at 6e-4 too,
    # 0.863 / 0.852 (BENCHMARKS.md, 2026-12-01).
    backbone_lr_ratio: float = 1.0
    weight_decay: float = 0.05  # AdamW decoupled weight decay; not applied to norms and biases
    label_smoothing: float = 0.1
    # Share of all fine-tuning steps spent warming the lr up from 0, and at least
    # training.finetune.MIN_WARMUP_STEPS (a 2-epoch run on 1,437 digits has 46 steps: 5% is 2).
    warmup_fraction: float = 0.05
    patience: int = 3  # fine-tuned epochs improving neither val accuracy nor val loss before stopping early
    freeze_bn: bool = True  # keep BatchNorm statistics frozen while fine-tuning (Keras guide)
    # Keep the stem and this many early stages frozen while fine-tuning (0: none). None (auto): on a CPU
    # the stages at output stride <= 4 (models.classifier.high_resolution_stages: 2 for lite0), whose
    # backward pass is most of a step's cost; none on a GPU.
    freeze_stages: int | None = None
    # Batched random-resized crops: light 80-100% of the area, standard 35-100%. auto: light for images
    # smaller than the training input (training/run.py `_augmentation`), standard otherwise.
    augment: Literal["auto", "none", "light", "standard"] = "auto"
    flip: bool = True  # random horizontal flips; turn off for text, digits, left/right classes
    head_fit_images: int = 10000  # at most this many train images are used to fit the first head
    balance: bool = False  # weight the loss by 1 / class frequency (probe and fine-tuning) for skewed classes
    max_minutes: float | None = None  # wall-time limit in min; after epoch 1 none starts that would pass it
    # Whole-run wall-clock budget in min: picks recipe, size and epochs (training/budget.py).
    # finetune with neither epochs nor a time limit gets DEFAULT_TIME_BUDGET_MINUTES.
    time_budget_minutes: float | None = None
    feature_cache: bool = True  # keep frozen features on disk ($IMGCLF_CACHE/features) for the next run
    scan_cache: bool = True  # skip the pre-flight decode of files unchanged since a scan ($IMGCLF_CACHE/scans)
    # finetune with standard augmentation: score val at the training size and ~1.15x / 1.3x above
    # it, keep the best as the bundle's input size (training/eval_size.py; FixRes, Touvron 2019).
    test_time_size_search: bool = True
    # finetune below the probe's input size (the backbone's own, e.g. 224 px, where CPU fine-tuning
    # runs at 96-160): a linear probe at that size on the pretrained backbone competes for the bundle
    # on val (10,000 multi-label mosaics in 5 min: fine-tuned at 96 px, val mAP 0.772; probe at 224 px 0.786).
    full_size_probe: bool = True

    # probe: a multinomial logistic regression on frozen features; L2 strength picked on val.
    probe_l2: list[float] = field(default_factory=lambda: list(DEFAULT_PROBE_L2))

    precision: Precision = "auto"  # auto = bf16 where the CPU/GPU runs it natively
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    workers: int = 0  # decode threads; 0 = one per core
    # torch.compile the network for fine-tuning steps. Off by default: compiling costs about a
    # minute on a GPU and several minutes on a 2-core CPU, which only long runs win back.
    compile: bool = False
    memory_fraction: float = 0.4  # decoded images stay in RAM while they fit in this share of it

    # run safety (training/checkpoint.py): a checkpoint after the head fit, every epoch, and
    # every `checkpoint_minutes` within an epoch; `resume` continues from the newest one in `out`.
    checkpoint_minutes: float = 10.0  # minutes of training between checkpoints; 0 = after every batch
    resume: bool = False
    keep_checkpoints: bool = False  # keep out/checkpoints after a run that ended well (deleted by default)
    deterministic: bool = False  # deterministic kernels, fixed threads: same seed, same bits (slower)
    tensorboard: bool = False  # also write TensorBoard event files to out/tensorboard
    # `imgclf review`'s decisions (data/decisions.py), applied in memory; the user's files are not touched.
    exclude: str | None = None  # CSV: its `remove` rows (or every row of a label_issues.csv) are left out
    relabel: str | None = None  # CSV: its `relabel` rows (or a label_issues.csv's suggested labels) are applied

    def __post_init__(self) -> None:
        self.recipe = canonical_recipe(self.recipe)  # type: ignore[assignment]  # validate rejects unknown ones
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_backbone(recipe: str) -> str:
    """The backbone `auto` starts from: the recipe's own (the article's VGG19), else `DEFAULT_BACKBONE`."""
    return str(RECIPE_DEFAULTS.get(recipe, {}).get("backbone", DEFAULT_BACKBONE))


# `finetune` without --epochs, --time-budget or --max-minutes is planned for this budget: what
# users ask is how good a model they can have in a quarter of an hour, and on a small set the plan's
# epoch cap (20) and early stopping end the run much sooner.
DEFAULT_TIME_BUDGET_MINUTES = 15.0


def with_default_budget(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the default time budget when fine-tuning has no epochs and no time limit.

    Example:
        >>> with_default_budget(TrainConfig(data="d", out="o", recipe="finetune")).time_budget_minutes
        15.0
        >>> with_default_budget(TrainConfig(data="d", out="o", recipe="finetune", epochs=3)).time_budget_minutes
    """
    if cfg.recipe != "finetune" or cfg.epochs is not None or cfg.time_budget_minutes or cfg.max_minutes:
        return cfg
    return dataclasses.replace(cfg, time_budget_minutes=DEFAULT_TIME_BUDGET_MINUTES)


def canonical_recipe(name: str) -> str:
    """The current name of recipe `name`: an old name (`RECIPE_ALIASES`) is replaced, with a note in the log.

    Any other name is returned as it is, for `validate` to accept or reject.

    Example:
        >>> canonical_recipe("seed")
        'article'
        >>> canonical_recipe("probe")
        'probe'
    """
    if name not in RECIPE_ALIASES:
        return name
    new = RECIPE_ALIASES[name]
    if is_main():  # under torchrun every rank resolves the config; one note is enough
        # The standard logger by name: the config layer sits below imgclf.progress, which sets it up.
        logging.getLogger("imgclf").warning(
            f"note: the recipe {name!r} is now called {new!r}; --recipe {name} still works but is deprecated")
    return new


def validate(cfg: TrainConfig) -> None:
    """Raise `ConfigError` for values that cannot work, before any data is read."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(
            f"unknown recipe {cfg.recipe!r}",
            expected=f"one of {', '.join(RECIPES)}",
            fix="pass --recipe probe, --recipe finetune or --recipe article",
        )
    checks: list[tuple[bool, str, str]] = [
        (cfg.epochs is None or cfg.epochs >= 0, "epochs", "an integer >= 0"),
        (cfg.image_size is None or 16 <= cfg.image_size <= 1024, "image_size", "16..1024 px"),
        (cfg.batch_size >= 1, "batch_size", "an integer >= 1"),
        (0.0 < cfg.val_fraction < 0.9, "val_fraction", "a fraction between 0 and 0.9"),
        (cfg.lr > 0, "lr", "a positive number"),
        (0 < cfg.backbone_lr_ratio <= 10, "backbone_lr_ratio", "a number in (0, 10]"),
        (cfg.weight_decay >= 0, "weight_decay", "a number >= 0"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing", "a number in [0, 1)"),
        (0 <= cfg.warmup_fraction < 1, "warmup_fraction", "a number in [0, 1)"),
        (cfg.patience >= 1, "patience", "an integer >= 1"),
        (cfg.freeze_stages is None or cfg.freeze_stages >= 0, "freeze_stages", "an integer >= 0"),
        (cfg.head_fit_images >= 10, "head_fit_images", "an integer >= 10"),
        (cfg.max_minutes is None or cfg.max_minutes > 0, "max_minutes", "a positive number of minutes"),
        (cfg.time_budget_minutes is None or cfg.time_budget_minutes > 0, "time_budget_minutes",
         "a positive number of minutes"),
        (bool(cfg.probe_l2) and all(v >= 0 for v in cfg.probe_l2), "probe_l2", "a list of numbers >= 0"),
        (cfg.precision in ("auto", "bf16", "fp32"), "precision", "auto, bf16 or fp32"),
        (cfg.augment in ("auto", "none", "light", "standard"), "augment", "auto, none, light or standard"),
        (cfg.workers >= 0, "workers", "an integer >= 0"),
        (0 < cfg.memory_fraction <= 0.9, "memory_fraction", "a fraction in (0, 0.9]"),
        (0 <= cfg.max_bad_fraction <= 1, "max_bad_fraction", "a fraction in [0, 1]"),
        (cfg.checkpoint_minutes >= 0, "checkpoint_minutes", "a number of minutes >= 0"),
    ]
    for name in ("exclude", "relabel"):  # the files are read with the data; a wrong path fails before that
        value = getattr(cfg, name)
        if value is not None and not Path(value).expanduser().is_file():
            raise ConfigError(f"the --{name} file {value!r} does not exist",
                              expected="a CSV exported from imgclf review's page, or its label_issues.csv",
                              fix=f"check the --{name} path")
    if cfg.recipe == "article" and cfg.freeze_stages:
        raise ConfigError(f"--freeze-stages {cfg.freeze_stages} with --recipe article: the article trains its "
                          "whole network (Keras layers are trainable unless frozen)",
                          expected="--freeze-stages 0 or no --freeze-stages with --recipe article",
                          fix="drop --freeze-stages, or use the default recipe (finetune)")
    for ok, name, expected in checks:
        if not ok:
            raise ConfigError(
                f"invalid {name}: {getattr(cfg, name)!r}",
                expected=expected,
                fix=f"change {name} in the config file or pass --{name.replace('_', '-')}",
            )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run description; unknown keys are an error so typos don't pass silently."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", fix="check the --config path")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {str(path)!r} holds a {type(values).__name__}",
            expected="a mapping of option names to values, e.g. 'epochs: 5'",
        )
    return values


def resolve_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Merge defaults < file values < overrides (None overrides are ignored) into a TrainConfig.

    Example:
        >>> resolve_config({"epochs": 3}, epochs=5, data="d", out="o").epochs
        5
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = overrides.get("recipe") or (file_values or {}).get("recipe")
    if recipe is not None:
        recipe = canonical_recipe(str(recipe))
        overrides = {**overrides, "recipe": recipe}  # flags win over the file, so this name wins too
    merged: dict[str, Any] = dict(RECIPE_DEFAULTS.get(str(recipe), {}))
    for source, values in (("config file", file_values or {}), ("arguments", overrides)):
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, sorted(known), n=3)
                raise ConfigError(
                    f"unknown option {key!r} in the {source}",
                    expected=f"one of {', '.join(sorted(known))}",
                    fix=f"did you mean {', '.join(close)}?" if close else "remove it",
                )
            if value is not None:
                merged[key] = value
    try:
        return TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
