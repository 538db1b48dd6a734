"""`imgclf compare DATA`: the linear probe of several backbones on the same data, side by side.

For each backbone: its probe's val accuracy (the same probe as `--recipe probe`: logistic regression
on frozen features, L2 chosen on val), the frozen forward's images/s, its parameters and the size of
its weights. Features go through the feature cache, so a second comparison, or a later `train` with
a compared backbone at the same size, computes nothing again. The probe is a cheap, honest signal
of which pretrained features suit the data: on CIFAR-10 the probe's ranking of backbones is the
fine-tuned ranking's (Kornblith et al., "Do Better ImageNet Models Transfer Better?", CVPR 2019,
report a rank correlation of 0.99 between logistic-regression and fine-tuned accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import torch
from scipy.optimize import minimize_scalar
from torch import nn

from imgclf.config import DEFAULT_BACKBONE, DEFAULT_PROBE_L2
from imgclf.data.check import preflight
from imgclf.data.dataset import Dataset
from imgclf.data.pipeline import ImageStore, Preprocessing, Store
from imgclf.data.sources import load_dataset
from imgclf.errors import ConfigError
from imgclf.models.backbones import Backbone, create_backbone, list_backbones, offline_status, resolve_backbone
from imgclf.progress import log
from imgclf.runtime import FrozenForward, compute_dtype, pick_device
from imgclf.training.feature_cache import LazyForward, cache_for, cached_features
from imgclf.training.multilabel import fit_multilabel_probe
from imgclf.training.probe import ProbeResult, fit_probe


@dataclass
class Comparison:
    """One backbone's row of the comparison."""

    backbone: str
    image_size: int
    val_accuracy: float
    l2: float
    images_per_second: float | None  # frozen forward; None when every feature came from the cache
    parameters: int
    weights_mb: float
    seconds: float  # wall time of this row, features and fit

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def offline_backbones() -> list[str]:
    """The curated backbones whose weights are available without the internet now."""
    return [entry.name for entry in list_backbones() if offline_status(entry) is not None] or [DEFAULT_BACKBONE]


def compare_backbones(
    data: str,
    backbones: list[str] | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    memory_fraction: float = 0.4,
) -> list[Comparison]:
    """Probe every backbone in `backbones` (default: the curated ones available offline) on `data`.

    Returns the rows best first (val accuracy). `image_size` None means each backbone's pretrained
    size, or less for small images (the rule `train` uses for the probe).

    Example:
        >>> rows = compare_backbones("photos/", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])  # doctest: +SKIP
        >>> rows[0].backbone  # doctest: +SKIP
        'tf_efficientnet_lite2'
    """
    from imgclf.training.run import choose_image_size, median_short_side, memory_budget

    names = backbones or offline_backbones()
    for name in names:
        resolve_backbone(name)  # a typo fails now, with suggestions, before any data is read
    if not names:
        raise ConfigError("no backbone to compare", fix="pass --backbones NAME[,NAME...]")
    device = pick_device("auto")
    dataset: Dataset = load_dataset(data, val_fraction=val_fraction, seed=seed)
    dataset, _ = preflight(dataset, max_bad_fraction=0.05)
    side = median_short_side(dataset.train, seed=seed)
    rows = []
    for name in names:
        start = time.perf_counter()
        backbone = create_backbone(name)
        config = backbone.data_config
        size = image_size or choose_image_size(int(config["input_size"][-1]), side, "probe", device)
        prep = Preprocessing.from_data_config(config, size)
        stores = {}
        for split, images in (("train", dataset.train), ("val", dataset.val)):
            budget = 0 if len(images) > 2000 else memory_budget(memory_fraction)
            stores[split] = ImageStore.decode(images, prep, memory_budget=budget, description=f"decode {split}")
        probed = probe_stores(backbone, stores["train"], stores["val"], device=device, precision=precision,
                              batch_size=batch_size, multilabel=dataset.multilabel, classes=len(dataset.classes))
        parameters = sum(p.numel() for p in backbone.model.parameters())
        row = Comparison(
            backbone=name, image_size=size, val_accuracy=probed.probe.val_accuracy, l2=probed.probe.l2,
            images_per_second=probed.images_per_second, parameters=parameters,
            weights_mb=sum(p.numel() * p.element_size() for p in backbone.model.parameters()) / 2**20,
            seconds=time.perf_counter() - start,
        )
        score = "val mAP" if dataset.multilabel else "val accuracy"
        log(f"{name} at {size} px: probe {score} {row.val_accuracy:.4f} ({row.seconds:.0f} s)")
        rows.append(row)
        del backbone, probed
    return sorted(rows, key=lambda r: -r.val_accuracy)


@dataclass
class ProbedStores:
    """A probe fitted on one backbone's frozen features of a train and a val store."""

    probe: ProbeResult
    val_logits: torch.Tensor  # the probe's head on the val features
    val_labels: torch.Tensor
    images_per_second: float | None  # the frozen forward's; None when every feature came from the cache

    def val_losses(self, multilabel: bool) -> torch.Tensor:
        """The head's loss on every val image (cross-entropy, or BCE summed over labels), in nats, after
        temperature scaling: the probes' L2 strengths are chosen by accuracy, and a strong one leaves a
        head under-confident, so raw losses would compare confidence more than features. The one
        temperature is fitted on these same images (scipy's bounded scalar search over log T)."""
        def losses(temperature: float) -> torch.Tensor:
            logits = self.val_logits.double() / temperature
            if multilabel:
                return nn.functional.binary_cross_entropy_with_logits(
                    logits, self.val_labels.double(), reduction="none").sum(1)
            return nn.functional.cross_entropy(logits, self.val_labels, reduction="none")

        if not len(self.val_labels):
            return torch.zeros(0)
        fitted = minimize_scalar(lambda log_t: float(losses(math.exp(log_t)).mean()), bounds=(-3.0, 3.0),
                                 method="bounded")
        return losses(math.exp(float(fitted.x))).float()


def probe_stores(
    backbone: Backbone, train: Store, val: Store, *, device: torch.device, precision: str, batch_size: int,
    multilabel: bool, classes: int, feature_cache: bool = True, desc: str | None = None,
) -> ProbedStores:
    """The probe (`--recipe probe`'s: logistic regression on frozen features, L2 chosen on val) of
    `backbone` at the stores' size; features through the feature cache unless `feature_cache` is off."""
    prep = train.prep
    dtype = compute_dtype(device, precision)
    cache = cache_for(backbone_name=backbone.entry.timm_name, module=backbone.model, prep=prep,
                      dtype=dtype) if feature_cache else None
    forward = LazyForward(functools.partial(FrozenForward, backbone.model, image_size=prep.image_size, device=device,
                                            precision=precision, keep_converted=feature_cache))
    outputs = []
    run_seconds, run_images = 0.0, 0
    for split, store in (("train", train), ("val", val)):
        calls, pass_start = forward.calls, time.perf_counter()
        outputs.append(cached_features(forward, store, cache=cache, batch_size=batch_size,
                                       desc=f"{desc or backbone.entry.name} {split}"))
        if forward.calls > calls:  # some features were computed: count those batches' images
            run_seconds += time.perf_counter() - pass_start
            run_images += min(len(store), (forward.calls - calls) * batch_size)
    (train_x, train_y, _), (val_x, val_y, _) = outputs
    if multilabel:  # its probe is scored by val mAP, which `val_accuracy` then holds
        probe = fit_multilabel_probe(train_x, train_y, val_x, val_y, list(DEFAULT_PROBE_L2))
    else:
        probe = fit_probe(train_x, train_y, val_x, val_y, classes, list(DEFAULT_PROBE_L2))
    with torch.no_grad():
        val_logits = probe.head(val_x.float())
    return ProbedStores(probe, val_logits, val_y, run_images / run_seconds if run_images else None)
