"""The article's backbone: a VGG's convolutional layers, flattened, as Keras'
`VGG19(include_top=False)` followed by `Flatten()`. Part of the models layer, above `backbones`.

timm's headless VGG (`num_classes=0`) still carries a `pre_logits` ConvMlp (a 7x7 conv to 4096
channels, ~120M parameters) and global pooling. The seed article's base has neither: at 32 px its
output is the last max pool, 512 x 1 x 1, flattened to 512 values, and VGG19's part of it holds
exactly 20,024,384 parameters. `ConvBase` is that: timm's `features` Sequential plus a Flatten.

The architecture is built on the meta device, so the ConvMlp is never allocated; only the conv
layers are materialised (in ~0.1 s instead of ~4 s) and initialised as timm initialises them.
Weights load by name from a timm or torchvision VGG state dict (`features.N.weight` keys in both),
or from a file holding only the conv layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.errors import BackboneError
from imgclf.models.backbones import Backbone, create_backbone, load_into, read_state_dict, resolve_backbone

KIND = "conv_base"  # the value of meta["backbone"]["kind"] in a bundle that holds a ConvBase
DOWNSAMPLING = 32  # VGG's five 2x2 max pools: a side of S px becomes S // 32


class ConvBase(nn.Module):
    """`flatten(features(x))`: a CNN's conv layers without pooling or pre-logits.

    Example:
        >>> base = create_conv_base("vgg19", image_size=32, pretrained=False).model
        >>> base(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 512])
    """

    def __init__(self, features: nn.Sequential, *, channels: int, image_size: int) -> None:
        super().__init__()
        self.features = features
        self.flatten = nn.Flatten(1)
        side = image_size // DOWNSAMPLING
        self.num_features = channels * side * side  # Keras' Flatten of (side, side, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.features(x))


def _init_like_timm(module: nn.Module) -> None:
    """timm's VGG initialisation (`VGG._initialize_weights`), for layers materialised from meta."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_conv_base(
    name: str,
    *,
    image_size: int,
    weights: str | Path | None = None,
    random_init: bool = False,
    pretrained: bool = True,
) -> Backbone:
    """Build the flattened conv base of the VGG `name` for `image_size` px inputs.

    Args:
        name: a curated name ('vgg19') or a timm VGG name ('vgg16', 'vgg19_bn.tv_in1k', ...).
        image_size: input side in px; at least 32, since VGG halves it five times.
        weights: a local weights file (timm or torchvision VGG state dict, or conv layers only).
        random_init: start from random weights (must be asked for explicitly).
        pretrained: False builds the architecture only, for loading a bundle's own weights.

    Raises:
        BackboneError: not a VGG, input too small, or no weight source worked.

    Example:
        >>> bb = create_conv_base("vgg19", image_size=32, random_init=True)
        >>> sum(p.numel() for p in bb.model.parameters()), bb.num_features
        (20024384, 512)
    """
    import timm

    entry = resolve_backbone(name)
    if image_size < DOWNSAMPLING:
        raise BackboneError(
            f"image size {image_size} px is too small for {name!r}",
            expected=f"at least {DOWNSAMPLING} px: VGG halves the input five times",
            fix=f"pass --image-size {DOWNSAMPLING} or more",
        )
    with torch.device("meta"):
        skeleton = timm.create_model(entry.timm_name, pretrained=False, num_classes=0)
    features = getattr(skeleton, "features", None)
    if not isinstance(features, nn.Sequential):
        raise BackboneError(
            f"backbone {name!r} has no VGG-style `features` layers",
            expected="a VGG (vgg11 ... vgg19, with or without _bn), as in the seed article",
            fix="pass --backbone vgg19, or use --recipe finetune for other backbones",
        )
    data_config: dict[str, Any] = timm.data.resolve_model_data_config(skeleton)
    channels = int(skeleton.num_features)  # type: ignore[arg-type]
    source = "random init"
    if pretrained and not random_init and weights is None:
        # The hub (or its cache): timm builds the full model, and its conv layers are kept.
        full = create_backbone(name)
        features, source = full.model.features, full.weights_source
    else:
        features = features.to_empty(device="cpu")
        _init_like_timm(features)
    base = ConvBase(features, channels=channels, image_size=image_size)  # type: ignore[arg-type]
    if pretrained and not random_init and weights is not None:
        load_into(base, read_state_dict(weights), by_position=False, source=f"file {str(weights)!r}")
        source = f"file {weights}"
    return Backbone(model=base, entry=entry, weights_source=source, data_config=data_config)
