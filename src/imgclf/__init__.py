"""imgclf: image classification by transfer learning, from labelled folders to a served model.

Example:
    >>> import imgclf
    >>> model = imgclf.train(data="photos/", out="runs/photos")  # doctest: +SKIP
    >>> imgclf.load("runs/photos").predict(["new.jpg"])[0].label  # doctest: +SKIP
    'cat'
"""

from __future__ import annotations

from imgclf.api import evaluate, explain_images, load
from imgclf.bundle import Model, Prediction
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.models.backbones import list_backbones
from imgclf.version import __version__
from imgclf.workflow import train

__all__ = [
    "ImgclfError",
    "Model",
    "Prediction",
    "TrainConfig",
    "__version__",
    "evaluate",
    "explain_images",
    "list_backbones",
    "load",
    "train",
]
