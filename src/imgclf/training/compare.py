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
import time
from dataclasses import dataclass

from imgclf.config import DEFAULT_BACKBONE, DEFAULT_PROBE_L2
from imgclf.data.check import preflight
from imgclf.data.dataset import Dataset
from imgclf.data.pipeline import ImageStore, Preprocessing
from imgclf.data.sources import load_dataset
from imgclf.errors import ConfigError
from imgclf.models.backbones import create_backbone, list_backbones, offline_status, resolve_backbone
from imgclf.progress import log
from imgclf.runtime import FrozenForward, compute_dtype, pick_device
from imgclf.training.feature_cache import LazyForward, cache_for, cached_features
from imgclf.training.multilabel import fit_multilabel_probe
from imgclf.training.probe import fit_probe


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
        dtype = compute_dtype(device, precision)
        cache = cache_for(backbone_name=backbone.entry.timm_name, module=backbone.model, prep=prep, dtype=dtype)
        forward = LazyForward(functools.partial(FrozenForward, backbone.model, image_size=size, device=device,
                                                precision=precision, keep_converted=True))
        outputs = []
        run_seconds, run_images = 0.0, 0
        for split, images in (("train", dataset.train), ("val", dataset.val)):
            budget = 0 if len(images) > 2000 else memory_budget(memory_fraction)
            store = ImageStore.decode(images, prep, memory_budget=budget, description=f"decode {split}")
            calls, pass_start = forward.calls, time.perf_counter()
            outputs.append(cached_features(forward, store, cache=cache, batch_size=batch_size,
                                           desc=f"{name} {split}"))
            if forward.calls > calls:  # some features were computed: count those batches' images
                run_seconds += time.perf_counter() - pass_start
                run_images += min(len(store), (forward.calls - calls) * batch_size)
        (train_x, train_y, _), (val_x, val_y, _) = outputs
        if dataset.multilabel:  # its probe is scored by val mAP, which `val_accuracy` then holds
            probe = fit_multilabel_probe(train_x, train_y, val_x, val_y, list(DEFAULT_PROBE_L2))
        else:
            probe = fit_probe(train_x, train_y, val_x, val_y, len(dataset.classes), list(DEFAULT_PROBE_L2))
        parameters = sum(p.numel() for p in backbone.model.parameters())
        row = Comparison(
            backbone=name, image_size=size, val_accuracy=probe.val_accuracy, l2=probe.l2,
            images_per_second=run_images / run_seconds if run_images else None, parameters=parameters,
            weights_mb=sum(p.numel() * p.element_size() for p in backbone.model.parameters()) / 2**20,
            seconds=time.perf_counter() - start,
        )
        score = "val mAP" if dataset.multilabel else "val accuracy"
        log(f"{name} at {size} px: probe {score} {row.val_accuracy:.4f} ({row.seconds:.0f} s)")
        rows.append(row)
        del backbone, forward
    return sorted(rows, key=lambda r: -r.val_accuracy)
