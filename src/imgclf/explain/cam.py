"""The Grad-CAM engine: a bundle's PyTorch network, a target layer and one grad-cam method.

pytorch-grad-cam (`grad-cam` on PyPI) does the hard part: the hooks on the target layer, the
backward pass and each method's channel weights. This module only prepares what it needs: a float32
copy of the network in eval mode (its hooks stay off the module that `predict` and `serve` use), the
input normalised as in training, and the logits of the same forward pass, so the class explained and
the probability shown come from one computation.

Gradients exist only in PyTorch: ONNX Runtime and OpenVINO run a frozen graph that cannot
backpropagate, so asking for them here is an error, and `auto` means PyTorch.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from imgclf.bundle import Model
from imgclf.data.pipeline import normalize
from imgclf.explain.layers import ExplainError, TargetLayer, find_target_layer
from imgclf.progress import log

# The method names of the command line -> grad-cam's classes. EigenCAM is class-agnostic: it shows the
# first principal component of the layer's activations, whatever class is asked for.
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "eigencam": "EigenCAM"}
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}
NO_GRADIENT_RUNTIMES = ("onnx", "openvino")  # frozen graphs: no backward pass


def check_runtime(runtime: str) -> None:
    """Raise for a runtime that cannot backpropagate; `auto` and `torch` both mean PyTorch here.

    Raises:
        ExplainError: `runtime` is onnx or openvino (or unknown).

    Example:
        >>> check_runtime("auto")
    """
    if runtime in ("auto", "torch"):
        return
    if runtime in NO_GRADIENT_RUNTIMES:
        raise ExplainError(
            f"the {runtime} runtime cannot backpropagate, so it cannot explain a prediction: it runs a frozen "
            "graph without gradients, and Grad-CAM needs the gradient of the class score",
            expected="runtime auto or torch (explanations always run on the bundle's PyTorch network)",
            fix="drop --runtime (or pass --runtime torch); predictions on the other runtimes are unaffected",
        )
    raise ExplainError(f"unknown runtime {runtime!r}", expected="auto or torch")


def check_method(method: str) -> str:
    """The method name, checked against `METHODS`.

    Example:
        >>> check_method("gradcam++")
        'gradcam++'
    """
    if method not in METHODS:
        raise ExplainError(f"unknown explanation method {method!r}", expected=", ".join(METHODS),
                           fix="pass --method gradcam (the default), gradcam++ or eigencam")
    return method


def _track_gradients_from(network: torch.nn.Module, target: torch.nn.Module) -> None:
    """Let autograd record the graph from the target layer on, and nothing before it.

    Grad-CAM needs only d(class score)/d(target output). With the target's own parameters the only
    ones that require a gradient, the backward pass runs from the logits back to the target layer and
    stops there: no weight gradients for the rest of the network, no pass through the earlier layers
    (the bulk of a CNN's cost). A target without parameters needs every parameter tracked.
    """
    own = list(target.parameters())
    for parameter in network.parameters():
        parameter.requires_grad_(not own)
    for parameter in own:
        parameter.requires_grad_(True)


class Explainer:
    """Grad-CAM (or Grad-CAM++, EigenCAM) maps for a bundle's model, on the CPU in PyTorch.

    Example:
        >>> explainer = Explainer(imgclf.load("runs/pets"))  # doctest: +SKIP
        >>> maps, logits = explainer(uint8_batch, targets=[0, 1])  # doctest: +SKIP
        >>> maps.shape  # N x S x S, each map scaled to 0..1
        (2, 224, 224)
    """

    def __init__(self, model: Model, *, method: str = "gradcam", layer: str | None = None) -> None:
        try:
            import pytorch_grad_cam
        except ImportError as exc:
            raise ExplainError(f"explanations need the grad-cam package ({exc})",
                               fix="pip install 'imgclf[explain]'") from None
        self.method = check_method(method)
        self.model = model
        # A private float32 copy: grad-cam hooks its target layer, and the bundle's module may be
        # predicting on another thread (serve) or be in channels_last/bf16 for the frozen runtime.
        self.network = copy.deepcopy(model.module).float().eval()
        self.target: TargetLayer = find_target_layer(self.network.backbone, model.info.backbone, layer)
        _track_gradients_from(self.network, self.target.module)
        cam_class = getattr(pytorch_grad_cam, METHODS[method])
        self.cam: Any = cam_class(model=self.network, target_layers=[self.target.module],
                                  reshape_transform=self.target.reshape)
        self._checked_grid = False

    @property
    def title(self) -> str:
        return METHOD_TITLES[self.method]

    def __call__(self, batch: torch.Tensor, targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps N x S x S float32 in 0..1, logits N x C) for a uint8 N x 3 x S x S batch.

        `targets` are the class indices to explain, one per image; None explains each image's
        predicted class. Each map is scaled to 0..1 on its own (grad-cam's convention), so maps show
        where, not how strongly, across images.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if targets is not None and len(targets) != len(batch):
            raise ValueError(f"{len(targets)} targets for {len(batch)} images")
        inputs = normalize(batch, self.model.preprocessing).contiguous()
        wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        try:
            with torch.enable_grad():
                maps = self.cam(input_tensor=inputs, targets=wanted)
        except ValueError as exc:  # grad-cam's "Invalid activation shape" for a layer without a spatial map
            raise ExplainError(
                f"layer {self.target.name!r} does not give a feature map Grad-CAM can use ({exc})",
                expected="a layer whose output is N x C x H x W, or ViT tokens N x T x C",
                fix="pass --layer with a convolutional stage (see `imgclf summary DIR --expand`)",
            ) from None
        logits = self.cam.outputs.detach().float().cpu().numpy()
        self._warn_coarse_grid(int(batch.shape[-1]))
        return np.asarray(maps, dtype=np.float32), logits

    def _warn_coarse_grid(self, side: int) -> None:
        """Say once when the layer's grid is too coarse (e.g. 1 x 1 at 32 px) to show where."""
        if self._checked_grid:
            return
        self._checked_grid = True
        activations = self.cam.activations_and_grads.activations
        if activations and activations[0].ndim == 4 and min(activations[0].shape[-2:]) < 2:
            grid = "x".join(str(n) for n in activations[0].shape[-2:])
            log(f"warning: layer {self.target.name!r} is a {grid} grid at {side} px, so the heatmap cannot show "
                "where the model looks; explain at a larger input size or pass an earlier --layer")
