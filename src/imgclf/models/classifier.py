"""The classifier: a headless timm backbone followed by a head that maps features to classes.

Part of the models layer (`imgclf.models`), with the backbone registry and the article's conv base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from imgclf.errors import BundleError, ImgclfError


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (weights that must not be used).

    Example:
        >>> non_finite_tensors({"a": torch.ones(2), "b": torch.tensor([float("nan")])})
        ['b']
    """
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def state_dict_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why `state` would not load strictly into `module`, or None when it would.

    Lists up to 8 missing, unexpected and reshaped keys each (a reshaped key with its shape in
    `state`, then the one `module` expects), for an error message that names the mismatch.

    Example:
        >>> state_dict_mismatch(nn.Linear(2, 3), {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}) is None
        True
        >>> state_dict_mismatch(nn.Linear(2, 3), {"weight": torch.zeros(4, 2)})
        'missing: bias; shape differs: weight (4, 2) vs (3, 2)'
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                for k in sorted(set(expected) & set(state)) if expected[k].shape != state[k].shape]
    parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
             for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped))
             if keys]
    return "; ".join(parts) or None


def build_head(spec: dict[str, Any]) -> nn.Module:
    """Build a head from its JSON description (stored in the bundle).

    `{"kind": "linear", "in_features": F, "num_classes": C}` is a single nn.Linear;
    `{"kind": "mlp", "in_features": F, "num_classes": C, "layers": [...]}` is a stack where each
    layer is `{"type": "dense", "units": N, "activation": "relu"}` or `{"type": "dropout", "rate": p}`.

    Example:
        >>> build_head({"kind": "linear", "in_features": 8, "num_classes": 3})
        Linear(in_features=8, out_features=3, bias=True)
    """
    kind = spec.get("kind")
    in_features, num_classes = int(spec["in_features"]), int(spec["num_classes"])
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "mlp":
        layers: list[nn.Module] = []
        width = in_features
        for layer in spec.get("layers", []):
            if layer["type"] == "dense":
                layers.append(nn.Linear(width, int(layer["units"])))
                if layer.get("activation") == "relu":
                    layers.append(nn.ReLU(inplace=True))
                width = int(layer["units"])
            elif layer["type"] == "dropout":
                layers.append(nn.Dropout(float(layer["rate"])))
            else:
                raise BundleError(f"unknown head layer type {layer['type']!r}")
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    raise BundleError(f"unknown head kind {kind!r}", expected="'linear' or 'mlp'")


class ImageClassifier(nn.Module):
    """`head(backbone(x))`, where the backbone returns pooled features (timm, num_classes=0)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def num_classes(self) -> int:
        """Outputs of the head's last linear layer."""
        linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features)

    def set_backbone_trainable(self, trainable: bool, *, freeze_bn: bool = True, frozen_stages: int = 0) -> None:
        """Freeze or unfreeze the backbone. With `freeze_bn`, BatchNorm stays in inference mode.

        `frozen_stages` > 0 keeps the stem and that many early stages frozen while the rest trains
        (`early_stage_parameters`): their weights get no gradient, their BatchNorm stays in inference mode,
        and no backward pass runs through them.
        """
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.train()
        if not trainable:
            self.backbone.eval()
            return
        frozen = early_stage_parameters(self.backbone, frozen_stages)
        for name, p in self.backbone.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        for name, m in self.backbone.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in frozen:
                m.eval()
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def early_stage_parameters(backbone: nn.Module, count: int) -> set[str]:
    """Names of the parameters of `backbone`'s stem and its first `count` stages, in timm's coarse grouping.

    timm models name their stem and stages with `group_matcher(coarse=True)` (what timm's layer-wise
    learning-rate decay uses): for tf_efficientnet_lite0 the stem, then `blocks.0` ... `blocks.6`; for a
    ResNet the stem, then `layer1` ... `layer4`; for a ViT the patch embedding, then each block.

    Raises:
        ImgclfError: `count` > 0 for a backbone without timm's grouping, or not below its stage count.

    Example:
        >>> import timm
        >>> sorted(early_stage_parameters(timm.create_model("resnet18", num_classes=0), 1))[:4]
        ['bn1.bias', 'bn1.weight', 'conv1.weight', 'layer1.0.bn1.bias']
    """
    if count <= 0:
        return set()
    ordered = _coarse_groups(backbone)
    if ordered is None:
        raise ImgclfError(
            f"cannot freeze early stages of {type(backbone).__name__}: it does not name its stages "
            "(timm's group_matcher)", expected="a timm backbone", fix="leave --freeze-stages at 0")
    stages = len(ordered) - 1  # the first group is the stem
    if count >= stages:
        raise ImgclfError(
            f"--freeze-stages {count} would freeze all of {type(backbone).__name__}'s {stages} stages",
            expected=f"0 to {stages - 1}", fix="use --recipe probe to train only the head on a frozen backbone")
    return {name for group in ordered[: count + 1] for name in group}


def _coarse_groups(backbone: nn.Module) -> list[list[str]] | None:
    """Parameter names per group of timm's `group_matcher(coarse=True)`, the stem first; None without one."""
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return None
    from timm.models import group_parameters

    groups = group_parameters(backbone, matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


HIGH_RESOLUTION_STRIDE = 4  # stages whose output is at most 4x smaller than the input


def high_resolution_stages(backbone: nn.Module) -> int:
    """How many stages after the stem end at an output stride <= `HIGH_RESOLUTION_STRIDE` (timm's
    `feature_info`): 2 for tf_efficientnet_lite0 (`blocks.0`, `blocks.1`), 1 for a ResNet (`layer1`)
    and a ConvNeXt, 0 for a ViT (stride 16 from its patch embedding) or a backbone without timm's naming.

    These stages see the most pixels: on a CPU their backward pass is most of a fine-tuning step's
    cost (lite0 at 96 px, batch 64: 124 img/s training everything, 200 with the stem and both frozen).

    Example:
        >>> import timm
        >>> high_resolution_stages(timm.create_model("resnet18", num_classes=0))
        1
    """
    info = getattr(backbone, "feature_info", None)
    if info is None:
        return 0
    entries = list(getattr(info, "info", info))
    high = [entry["module"] for entry in entries if entry.get("reduction", 99) <= HIGH_RESOLUTION_STRIDE]
    ordered = _coarse_groups(backbone) if high else None
    if ordered is None:
        return 0
    last = high[-1] + "."
    owning = [index for index, names in enumerate(ordered) if any(name.startswith(last) for name in names)]
    count = max(owning, default=0)
    return count if count < len(ordered) - 1 else 0
