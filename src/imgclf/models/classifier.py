"""The classifier: a headless timm backbone followed by a head that maps features to classes.

Part of the models layer (`imgclf.models`), with the backbone registry and the article's conv base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from imgclf.errors import BundleError


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

    def set_backbone_trainable(self, trainable: bool, *, freeze_bn: bool = True) -> None:
        """Freeze or unfreeze the backbone. With `freeze_bn`, BatchNorm stays in inference mode."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.train()
        if not trainable:
            self.backbone.eval()
        elif freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
