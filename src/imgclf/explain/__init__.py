"""Where the model looks: Grad-CAM explanations of a bundle's predictions (issue 18).

The layer "explain | quantize | review": above the bundle (which it reads), below the report, the
server and the CLI (which show its maps). pytorch-grad-cam does the maps; this package picks the
target layer per backbone (`layers`), runs a private PyTorch copy of the network (`cam`), and turns
the maps into overlays and PNG files (`images`).

Example:
    >>> from imgclf.explain import explain
    >>> e = explain(imgclf.load("runs/pets"), ["cat.jpg"], method="gradcam")[0]  # doctest: +SKIP
    >>> e.predicted, e.heatmap.shape, e.overlay.shape  # doctest: +SKIP
    ('cat', (224, 224), (224, 224, 3))
"""

from __future__ import annotations

from imgclf.explain.cam import METHODS, Explainer
from imgclf.explain.images import Explanation, explain, explain_batch, write_explanations
from imgclf.explain.layers import ExplainError, find_target_layer

__all__ = [
    "METHODS",
    "ExplainError",
    "Explainer",
    "Explanation",
    "explain",
    "explain_batch",
    "find_target_layer",
    "write_explanations",
]
