"""`imgclf summary`: a Keras-style table of a model's layers, output shapes and parameter counts.

It works on a trained bundle, or on the network a recipe would build before any training (random
weights, nothing downloaded). Rows follow Keras' `model.summary()` so that the seed article's
printed summary can be compared line by line: the backbone is one row (Keras shows a nested base
model as one row), a Dense layer's activation is part of its row (the last one's softmax lives in the
loss and in predict), and shapes are PyTorch's
N x C x H x W with the batch dimension shown as None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import ConfigError
from imgclf.models.article import ConvBase
from imgclf.models.classifier import ImageClassifier


@dataclass
class LayerRow:
    """One row of the table."""

    name: str  # Keras-style name: dense, dense_1, dropout, ...
    kind: str  # layer type as printed in brackets
    output_shape: tuple[int | None, ...]
    params: int
    trainable_params: int


@dataclass
class ModelSummary:
    """The rows and totals of one model.

    Example:
        >>> s = summarize_recipe("article", backbone="vgg19", num_classes=10, image_size=32)  # doctest: +SKIP
        >>> s.total_params
        21240010
    """

    title: str
    rows: list[LayerRow]

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable_params for r in self.rows)

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    def table(self) -> str:
        """The Keras-style text table."""
        header = ("Layer (type)", "Output Shape", "Param #")
        cells = [(f"{r.name} ({r.kind})", _shape(r.output_shape), f"{r.params:,}") for r in self.rows]
        widths = [max(len(header[i]), *(len(c[i]) for c in cells)) + 3 for i in range(3)]
        width = sum(widths)
        lines = [f'Model: "{self.title}"', "_" * width, _line(header, widths), "=" * width]
        for i, cell in enumerate(cells):
            lines.append(_line(cell, widths))
            lines.append("_" * width if i < len(cells) - 1 else "=" * width)
        lines += [
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            "_" * width,
        ]
        return "\n".join(lines)


def _shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _line(cells: tuple[str, str, str], widths: list[int]) -> str:
    return " " + cells[0].ljust(widths[0]) + cells[1].ljust(widths[1]) + cells[2].rjust(widths[2] - 3)


def _blocks(
    model: ImageClassifier, backbone_name: str, expand: bool
) -> list[tuple[str, str, nn.Module, list[nn.Module], bool]]:
    """(name, kind, module whose output is shown, modules whose params count, is_backbone) per row."""
    rows: list[tuple[str, str, nn.Module, list[nn.Module], bool]] = []
    backbone = model.backbone
    if expand:
        for path, m in backbone.named_modules():
            if not list(m.children()):
                rows.append((path, type(m).__name__, m, [m], True))
    elif isinstance(backbone, ConvBase):
        # Keras shows `VGG19(include_top=False)` as one row, then its Flatten.
        rows.append((backbone_name, "Functional", backbone.features, [backbone.features], True))
        rows.append(("flatten", "Flatten", backbone.flatten, [backbone.flatten], True))
    else:
        rows.append((backbone_name, type(backbone).__name__, backbone, [backbone], True))
    head_layers = list(model.head.children()) if isinstance(model.head, nn.Sequential) else [model.head]
    counts: dict[str, int] = {}
    for layer in head_layers:
        if isinstance(layer, nn.ReLU) and rows and rows[-1][1].startswith("Dense"):
            name, kind, shown, counted, _ = rows[-1]
            rows[-1] = (name, kind + ", relu", shown, counted + [layer], False)
            continue
        base = {nn.Linear: "dense", nn.Dropout: "dropout"}.get(type(layer), type(layer).__name__.lower())
        name = base if base not in counts else f"{base}_{counts[base]}"
        counts[base] = counts.get(base, 0) + 1
        if isinstance(layer, nn.Linear):
            kind = "Dense"
        elif isinstance(layer, nn.Dropout):
            kind = f"Dropout {layer.p:g}"
        else:
            kind = type(layer).__name__
        rows.append((name, kind, layer, [layer], False))
    # The last Dense gives the class scores; softmax is applied by the loss and by predict.
    if len(rows) > 1 and rows[-1][1] == "Dense":
        rows[-1] = (rows[-1][0], "Dense, softmax", *rows[-1][2:])
    return rows


def summarize(
    model: ImageClassifier,
    *,
    image_size: int,
    backbone_name: str = "backbone",
    title: str = "model",
    frozen_backbone: bool = False,
    expand: bool = False,
) -> ModelSummary:
    """Summarise `model` by running one zero image of `image_size` px through it.

    Args:
        model: the classifier (backbone + head).
        image_size: input side in px; output shapes depend on it.
        backbone_name: the backbone row's name.
        title: printed on the first line.
        frozen_backbone: count the backbone as non-trainable (the probe recipe never trains it).
        expand: one row per backbone layer instead of one row for the whole backbone.

    Example:
        >>> from imgclf.models.classifier import build_head
        >>> from imgclf.models.article import create_conv_base
        >>> base = create_conv_base("vgg19", image_size=32, pretrained=False)
        >>> head = build_head({"kind": "linear", "in_features": 512, "num_classes": 10})
        >>> summarize(ImageClassifier(base.model, head), image_size=32).total_params
        20029514
    """
    blocks = _blocks(model, backbone_name, expand)
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = []
    for i, (_, _, shown, _, _) in enumerate(blocks):

        def record(_m: nn.Module, _inputs: object, output: torch.Tensor, i: int = i) -> None:
            shapes[i] = tuple(output.shape)

        hooks.append(shown.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    rows = []
    for i, (name, kind, _, counted, in_backbone) in enumerate(blocks):
        params = [p for m in counted for p in m.parameters()]
        total = sum(p.numel() for p in params)
        trainable = 0 if (frozen_backbone and in_backbone) else sum(p.numel() for p in params if p.requires_grad)
        shape = shapes.get(i, ())
        rows.append(LayerRow(name, kind, (None, *shape[1:]) if shape else (), total, trainable))
    return ModelSummary(title, rows)


def summarize_bundle(folder: str | Path, *, expand: bool = False) -> ModelSummary:
    """Summarise the model in a bundle folder.

    Example:
        >>> print(summarize_bundle("runs/cifar-article").table())  # doctest: +SKIP
    """
    from imgclf.bundle import Model
    from imgclf.config import RECIPE_ALIASES

    model = Model.load(folder)
    info = model.info
    name, recipe = info.backbone.name, info.recipe
    recipe = RECIPE_ALIASES.get(recipe, recipe)  # bundles written before a rename keep the old name
    return summarize(
        model.module, image_size=model.preprocessing.image_size, backbone_name=name,
        title=f"{Path(folder).name}: recipe {recipe}, {name}, {model.preprocessing.image_size} px",
        frozen_backbone=recipe == "probe", expand=expand,
    )


def summarize_recipe(
    recipe: str, *, backbone: str | None = None, num_classes: int, image_size: int | None = None,
    expand: bool = False,
) -> ModelSummary:
    """Summarise the network `recipe` would train, before training (random weights, no download).

    Example:
        >>> summarize_recipe("article", num_classes=10, image_size=32).rows[0].params
        20024384
    """
    from imgclf.config import AUTO_BACKBONE, RECIPES, canonical_recipe, default_backbone
    from imgclf.models.backbones import create_backbone
    from imgclf.models.classifier import build_head

    recipe = canonical_recipe(recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}", expected=f"one of {', '.join(RECIPES)}")
    if num_classes < 2:
        raise ConfigError(f"--num-classes {num_classes} is too few", expected="2 or more classes")
    name = backbone if backbone and backbone != AUTO_BACKBONE else default_backbone(recipe)
    if recipe == "article":
        from imgclf.models.article import create_conv_base
        from imgclf.training.article import SEED_MIN_IMAGE_SIZE, build_seed_model

        size = image_size or SEED_MIN_IMAGE_SIZE
        base = create_conv_base(name, image_size=size, pretrained=False)
        model = build_seed_model(base.model, base.num_features, num_classes)
    else:
        built = create_backbone(name, pretrained=False)
        size = image_size or int(built.data_config["input_size"][-1])
        head = build_head({"kind": "linear", "in_features": built.num_features, "num_classes": num_classes})
        model = ImageClassifier(built.model, head)
    return summarize(
        model, image_size=size, backbone_name=name, title=f"recipe {recipe}, {name}, {size} px",
        frozen_backbone=recipe == "probe", expand=expand,
    )
