"""Where Grad-CAM looks: the target layer of a backbone, and how its output becomes a 2-D map.

The layer is named in the backbone registry (`BackboneEntry.explain_layer`): the last convolutional
stage of a CNN, the last block's first norm of a ViT. A bundle whose backbone is not curated by
name but is a timm model of the same class as a curated one (`efficientnet_b3` is an `EfficientNet`
like `tf_efficientnet_lite0`; `resnet18` a `ResNet` like `resnet50`) uses the same name, since the
module names come from the class. Any other model needs `layer=` (`--layer` on the command line),
and the error says so, with timm's own last feature stage as the likely answer.

Layer names are dotted paths inside the headless backbone (`model.module.backbone`), with negative
indices counting from the end: `bn2`, `layer4`, `stages.-1`, `blocks.-1.norm1`.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from imgclf.bundle import BackboneInfo
from imgclf.errors import ImgclfError
from imgclf.models.backbones import list_backbones


class ExplainError(ImgclfError):
    """An explanation was asked for that cannot be made (unknown class, layer, runtime or method)."""


@dataclass(frozen=True)
class TargetLayer:
    """The module Grad-CAM hooks, its name, and the transform that makes its output N x C x H x W."""

    name: str
    module: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor]
    curated: bool  # named by the registry (True) or by the caller (False)


def architecture(timm_name: str) -> str:
    """The timm architecture of a name with an optional pretrained tag.

    Example:
        >>> architecture("vit_small_patch16_224.augreg_in21k_ft_in1k")
        'vit_small_patch16_224'
    """
    return timm_name.split(".", 1)[0]


@functools.cache
def _curated_class(timm_name: str) -> type | None:
    """The class of a curated backbone, built on the meta device (no memory, milliseconds)."""
    import timm

    try:
        with torch.device("meta"):
            return type(timm.create_model(architecture(timm_name), pretrained=False, num_classes=0))
    except Exception:  # a timm without this model: it simply matches nothing
        return None


def registry_layer(backbone: nn.Module, info: BackboneInfo) -> str | None:
    """The registry's target layer for this backbone: by name, else by timm class; None if neither.

    Example:
        >>> registry_layer(model.module.backbone, model.info.backbone)  # doctest: +SKIP
        'bn2'
    """
    entries = [e for e in list_backbones() if e.explain_layer]
    for entry in entries:
        if entry.name == info.name or architecture(entry.timm_name) == architecture(info.timm_name):
            return entry.explain_layer
    for entry in entries:
        if _curated_class(entry.timm_name) is type(backbone):
            return entry.explain_layer
    return None


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted `path` inside `root`; integer parts index (negative from the end).

    Raises:
        ExplainError: no such module; the message lists the names that exist at that level.

    Example:
        >>> module_at(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "-1")
        ReLU()
    """
    module = root
    walked: list[str] = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module):
            index = int(part)
            if -len(module) <= index < len(module):
                module = module[index]
                walked.append(part)
                continue
        elif part in children:
            module = children[part]
            walked.append(part)
            continue
        where = ".".join(walked) or "the backbone"
        close = difflib.get_close_matches(part, list(children), n=3)
        raise ExplainError(
            f"layer {path!r}: {where} has no module {part!r}",
            expected=f"one of {', '.join(list(children)[:12]) or '(none: it is a leaf)'} at that level"
            + (f" (closest: {', '.join(close)})" if close else ""),
            fix="pass --layer with a dotted path from `imgclf summary DIR --expand`; integers index from 0, "
            "negative ones from the end",
        )
    return module


def token_grid(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reshape transform for grad-cam: ViT tokens N x T x C -> N x C x H x W; 4-D outputs unchanged.

    The prefix tokens (class, register and distillation tokens) are dropped and the patch tokens
    laid back on their square grid. Written by hand because grad-cam leaves this to the caller
    (its tutorial hard-codes 14 x 14 and one class token).
    """
    prefix = int(getattr(backbone, "num_prefix_tokens", 1 if getattr(backbone, "cls_token", None) is not None else 0))

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            return x
        patches = x[:, prefix:, :]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ExplainError(
                f"the layer's {patches.shape[1]} patch tokens do not form a square grid",
                expected="a ViT fed square images (imgclf always does), with its prefix tokens first",
                fix="pass --layer with a layer whose output is a feature map",
            )
        return patches.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)

    return reshape


def find_target_layer(backbone: nn.Module, info: BackboneInfo, layer: str | None = None) -> TargetLayer:
    """The layer to explain: `layer` when given, else the registry's (see the module docstring).

    Raises:
        ExplainError: `layer` is not a module of the backbone, or none was given and the registry
            knows no layer for this architecture (the message names `--layer` and suggests one).

    Example:
        >>> find_target_layer(model.module.backbone, model.info.backbone).name  # doctest: +SKIP
        'bn2'
    """
    name = layer or registry_layer(backbone, info)
    if name is None:
        stages = getattr(backbone, "feature_info", None)
        hint = ""
        if isinstance(stages, list) and stages and isinstance(stages[-1], dict) and stages[-1].get("module"):
            last = stages[-1]["module"]
            hint = f"; timm names {last!r} as this model's last feature stage: --layer {last}"
        raise ExplainError(
            f"imgclf does not know which layer of {info.name!r} ({type(backbone).__name__}) Grad-CAM should use",
            expected="a curated backbone (`imgclf backbones`) or a timm model of the same class (EfficientNet, "
            "ResNet, ConvNeXt, VisionTransformer, MobileNetV3, VGG)",
            fix=f"pass --layer NAME (layer= in Python): a module whose output is a feature map{hint}",
        )
    return TargetLayer(name=name, module=module_at(backbone, name), reshape=token_grid(backbone),
                       curated=layer is None)
