"""The model bundle: a folder with `model.safetensors` and `imgclf.json`, and the `Model` it loads.

`imgclf.json` describes everything needed to rebuild and use the model: class names, backbone,
head, preprocessing, the recipe and resolved config, metrics and library versions. Loading reads
JSON and safetensors only, so it never unpickles anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgclf.data.dataset import ImageSet
from imgclf.data.pipeline import ImageStore, Preprocessing, image_to_tensor, normalize
from imgclf.errors import BundleError, check_format
from imgclf.models.classifier import ImageClassifier, build_head, non_finite_tensors, state_dict_mismatch
from imgclf.runtime import FrozenForward, run_frozen
from imgclf.runtime.int8 import INT8_RUNTIMES, gated_int8_forward
from imgclf.version import library_versions

BUNDLE_JSON = "imgclf.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "imgclf-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BackboneInfo:
    """The bundle's backbone: enough to rebuild its architecture without the weights' source."""

    name: str  # as the user named it (a curated name or a timm name)
    timm_name: str  # the timm architecture (or, for kind "conv_base", the VGG it was cut from)
    weights_source: str = ""  # where the pretrained weights came from, for the record
    num_features: int = 0
    kind: str = "timm"  # "timm": a headless timm model; "conv_base": the article recipe's VGG conv layers

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BackboneInfo:
        return cls(name=str(values.get("name", values["timm_name"])), timm_name=str(values["timm_name"]),
                   weights_source=str(values.get("weights_source", "")),
                   num_features=int(values.get("num_features", 0)), kind=str(values.get("kind", "timm")))


@dataclass
class BundleInfo:
    """What a bundle's `imgclf.json` says, typed: read with `BundleInfo.from_dict(model.meta)` or `model.info`.

    The JSON stays the format on disk (`Model.meta` is it, as written); this is how the code reads
    it. Fields a newer or older writer added that are not listed here stay in `extra`.

    Example:
        >>> info = BundleInfo.from_dict({"classes": ["a", "b"], "backbone": {"timm_name": "resnet18"},
        ...                              "head": {"kind": "linear", "in_features": 512, "num_classes": 2},
        ...                              "preprocessing": {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}})
        >>> info.backbone.name, info.temperature, info.recipe
        ('resnet18', 1.0, 'finetune')
    """

    classes: list[str]
    backbone: BackboneInfo
    head: dict[str, Any]  # the head's description for `models.classifier.build_head`
    preprocessing: Preprocessing
    recipe: str = "finetune"
    # "multi-label": a sigmoid per label, predicted when over its threshold (evaluation.multilabel);
    # bundles without the field are single-label (softmax over the classes).
    task: str = "single-label"
    thresholds: list[float] | None = None  # multi-label: one per class, chosen on val for the best F1
    temperature: float = 1.0  # predict divides the logits by it (fitted on val by training)
    calibration: dict[str, Any] | None = None  # how the temperature was fitted; None in bundles before 2026-11-30
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metrics
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig
    data: dict[str, Any] = field(default_factory=dict)  # the data's summary (source, counts)
    probe: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch 0 = the probe's head
    selection: dict[str, Any] | None = None  # which candidate the bundle holds, and every val score
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    wall_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> BundleInfo:
        """Raises KeyError for a missing required field (classes, backbone, head, preprocessing)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("backbone", "preprocessing", "extra")}
        known = {k: v for k, v in meta.items() if k in names}
        extra = {k: v for k, v in meta.items()
                 if k not in names and k not in ("backbone", "preprocessing", "format", "format_version")}
        return cls(**{**known, "backbone": BackboneInfo.from_dict(meta["backbone"]),
                      "preprocessing": Preprocessing.from_dict(meta["preprocessing"]),
                      "temperature": float(meta.get("temperature", 1.0)), "extra": extra})

    @property
    def data_source(self) -> str:
        """Where the training data was (the config's DATA), or "" when the bundle does not say."""
        return str(self.config.get("data") or self.data.get("source") or "")


@dataclass
class Prediction:
    """The top-k classes for one image, best first; `error` is set when the image was unreadable.

    A multi-label model also sets `labels`: every label whose probability reaches its threshold,
    most probable first (empty: none of these). `label` is then the first of them, or None.
    """

    source: str
    top_k: list[tuple[str, float]]
    error: str | None = None
    labels: list[tuple[str, float]] | None = None  # multi-label only

    @property
    def label(self) -> str | None:
        if self.labels is not None:
            return self.labels[0][0] if self.labels else None
        return self.top_k[0][0] if self.top_k else None

    @property
    def probability(self) -> float | None:
        if self.labels is not None:
            return self.labels[0][1] if self.labels else None
        return self.top_k[0][1] if self.top_k else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            **({"labels": [{"label": c, "probability": p} for c, p in self.labels]} if self.labels is not None else {}),
            "top_k": [{"label": c, "probability": p} for c, p in self.top_k],
            "error": self.error,
        }


class Model:
    """A trained classifier with its classes and preprocessing.

    Example:
        >>> model = Model.load("runs/pets")  # doctest: +SKIP
        >>> model.predict(["cat.jpg"], top_k=3)[0].label  # doctest: +SKIP
        'cat'
    """

    def __init__(
        self, module: ImageClassifier, classes: list[str], preprocessing: Preprocessing, meta: dict[str, Any]
    ) -> None:
        self.module = module.eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.meta = meta
        self._forward: FrozenForward | None = None
        self._forward_key: tuple[str, str] | None = None
        self.folder: Path | None = None  # the bundle folder, set by `load`: where int8 models are found

    @property
    def info(self) -> BundleInfo:
        """`meta` read as a `BundleInfo` (the classes and preprocessing are the model's own)."""
        return BundleInfo.from_dict({**self.meta, "classes": self.classes,
                                     "preprocessing": self.preprocessing.to_dict()})

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def multilabel(self) -> bool:
        """True for a multi-label bundle: sigmoid probabilities, per-label thresholds."""
        return self.meta.get("task") == "multi-label"

    def thresholds(self, override: float | None = None) -> np.ndarray:
        """The per-class thresholds a multi-label model predicts with (`override` replaces them all).

        Example:
            >>> model.thresholds().tolist(), model.thresholds(0.3).tolist()  # doctest: +SKIP
            ([0.41, 0.62], [0.3, 0.3])
        """
        stored = self.meta.get("thresholds")
        if override is not None:
            return np.full(len(self.classes), float(override))
        if stored is not None and len(stored) == len(self.classes):
            return np.asarray(stored, dtype=np.float64)
        return np.full(len(self.classes), 0.5)  # a multi-label bundle written without thresholds

    def to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (with the temperature), or a sigmoid per label (multi-label)."""
        if self.multilabel:
            return torch.sigmoid(logits.float())
        return torch.softmax(logits / self.temperature, dim=1)

    # -- persistence -----------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `model.safetensors` and `imgclf.json` into `folder` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        meta = dict(self.meta)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            classes=self.classes,
            preprocessing=self.preprocessing.to_dict(),
        )
        meta.setdefault("versions", library_versions())
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (folder / BUNDLE_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Model:
        """Rebuild a model from a bundle folder alone.

        Raises:
            BundleError: missing or corrupt files, or weights that do not fit the architecture.
        """
        from imgclf.models.backbones import create_backbone

        folder = Path(folder)
        meta = read_bundle_json(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise BundleError(f"{str(folder)!r} has no {WEIGHTS_FILE}", fix="re-run imgclf train --out")
        try:
            info = BundleInfo.from_dict(meta)
            head = build_head(info.head)
        except KeyError as exc:
            raise BundleError(f"{BUNDLE_JSON} in {str(folder)!r} lacks the field {exc}") from None
        if info.backbone.kind == "conv_base":  # the article recipe's flattened VGG conv layers
            from imgclf.models.article import create_conv_base

            backbone = create_conv_base(info.backbone.timm_name, image_size=info.preprocessing.image_size,
                                        pretrained=False)
        else:
            backbone = create_backbone(info.backbone.timm_name, pretrained=False)
        module = ImageClassifier(backbone.model, head)
        load_weights(module, weights)
        model = cls(module, info.classes, info.preprocessing, meta)
        model.folder = folder
        return model

    # -- inference -------------------------------------------------------------------------

    def forward_function(self, runtime: str = "auto", precision: str = "auto") -> FrozenForward:
        key = (runtime, precision)
        if (self._forward is None or self._forward_key != key) and runtime in INT8_RUNTIMES:
            # The bundle's int8 model from `imgclf export --int8`, only if it passed its accuracy gate.
            self._forward, self._forward_key = gated_int8_forward(self.module, self.folder, runtime), key
        if self._forward is None or self._forward_key != key:
            self._forward = FrozenForward(
                self.module, image_size=self.preprocessing.image_size, precision=precision, runtime=runtime,
                keep_converted=True,
            )
            self._forward_key = key
        return self._forward

    def probabilities(self, batch: torch.Tensor, *, runtime: str = "auto") -> torch.Tensor:
        """uint8 N x 3 x S x S (already resized) -> N x C probabilities."""
        logits = self.forward_function(runtime)(normalize(batch, self.preprocessing))
        return self.to_probabilities(logits)

    def predict_store(
        self, store: ImageStore, *, batch_size: int = 64, runtime: str = "auto", desc: str = "predict"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities N x C, labels N) for the readable images of a store."""
        logits, labels, _ = run_frozen(
            self.forward_function(runtime), store, batch_size=batch_size, desc=desc
        )
        if len(logits) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32), labels.numpy()
        return self.to_probabilities(logits).numpy(), labels.numpy()

    def predict(
        self,
        images: list[str | Path | Image.Image] | str | Path | Image.Image,
        *,
        top_k: int = 5,
        batch_size: int = 64,
        runtime: str = "auto",
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Top-k predictions for image files or PIL images. Unreadable files get `error` set.

        A multi-label model also lists every label over its threshold (`Prediction.labels`);
        `threshold` replaces the stored per-label thresholds with one for all labels.

        Example:
            >>> [p.label for p in imgclf.load("runs/pets").predict(["a.jpg", "b.png"])]  # doctest: +SKIP
            ['cat', 'dog']
        """
        if not isinstance(images, list):
            images = [images]
        top_k = max(1, min(top_k, len(self.classes)))
        size = self.preprocessing.image_size
        results: list[Prediction | None] = [None] * len(images)
        files = [(i, str(x)) for i, x in enumerate(images) if isinstance(x, (str, Path))]
        if files:
            # Labels carry each file's position, so results map back even when files are skipped.
            positions = np.arange(len(files), dtype=np.int64)
            image_set = ImageSet(paths=[f for _, f in files], labels=positions)
            store = ImageStore.decode(image_set, self.preprocessing, memory_budget=2**30, description="decode")
            probs, kept = self.predict_store(store, batch_size=batch_size, runtime=runtime)
            for row, position in zip(probs, kept, strict=False):
                i, path = files[int(position)]
                results[i] = self._prediction(path, row, top_k, threshold)
            failed = dict(store.failed)
            for i, path in files:
                if results[i] is None:
                    results[i] = Prediction(path, [], error=failed.get(path, "not decoded"))
        pil = [(i, x) for i, x in enumerate(images) if isinstance(x, Image.Image)]
        if pil:
            from imgclf.data.decode import to_rgb

            interpolation = self.preprocessing.interpolation
            batch = torch.stack([image_to_tensor(to_rgb(x), size, interpolation) for _, x in pil])
            chunks = [batch[j : j + batch_size] for j in range(0, len(batch), batch_size)]
            probs_t = torch.cat([self.probabilities(chunk, runtime=runtime) for chunk in chunks]).numpy()
            for (i, _), row in zip(pil, probs_t, strict=False):
                results[i] = self._prediction(f"<image {i}>", row, top_k, threshold)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise BundleError(
                f"cannot predict on item {missing[0]} of type {type(images[missing[0]]).__name__}",
                expected="file paths or PIL images",
            )
        return [r for r in results if r is not None]

    def _prediction(self, source: str, row: np.ndarray, top_k: int, threshold: float | None) -> Prediction:
        if not self.multilabel:
            return Prediction(source, self.top_classes(row, top_k))
        return Prediction(source, self.top_classes(row, top_k), labels=self.labels_over(row, threshold))

    def labels_over(self, probabilities: np.ndarray, threshold: float | None = None) -> list[tuple[str, float]]:
        """Multi-label: every label whose probability reaches its threshold, most probable first.

        Example:
            >>> model.labels_over(np.array([0.9, 0.2, 0.7]))  # doctest: +SKIP
            [('cat', 0.9), ('fish', 0.7)]
        """
        over = np.flatnonzero(probabilities >= self.thresholds(threshold))
        order = over[np.argsort(-probabilities[over], kind="stable")]
        return [(self.classes[j], float(probabilities[j])) for j in order]

    def top_classes(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The `k` most probable classes (at least one, at most all) of one image, best first.

        Example:
            >>> model.top_classes(np.array([0.1, 0.7, 0.2]), 2)  # doctest: +SKIP
            [('dog', 0.7), ('fish', 0.2)]
        """
        order = np.argsort(-probabilities)[: max(1, min(k, len(self.classes)))]
        return [(self.classes[j], float(probabilities[j])) for j in order]


def read_bundle_json(folder: Path) -> dict[str, Any]:
    path = folder / BUNDLE_JSON
    if not folder.is_dir():
        raise BundleError(f"model folder {str(folder)!r} does not exist", fix="pass the --out folder of imgclf train")
    if not path.is_file():
        raise BundleError(
            f"{str(folder)!r} is not an imgclf model bundle: it has no {BUNDLE_JSON}",
            expected=f"a folder written by `imgclf train --out`, holding {BUNDLE_JSON} and {WEIGHTS_FILE}",
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{str(path)!r} is not valid JSON: {exc}") from None
    check_format(meta, source=str(path), kind="bundle description", format=FORMAT, version=FORMAT_VERSION,
                 error=BundleError)
    return meta


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights strictly; any missing, unexpected or reshaped key is listed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"{str(path)!r} is not a readable safetensors file: {exc}",
            fix="re-export or re-train the model; the file is corrupt or truncated",
        ) from None
    mismatch = state_dict_mismatch(module, state)
    if mismatch:
        raise BundleError(
            f"the weights in {str(path)!r} do not match the architecture in {BUNDLE_JSON}: {mismatch}",
            fix="the bundle was edited or mixed with another; re-train it",
        )
    bad = non_finite_tensors(state)
    if bad:
        raise BundleError(f"{str(path)!r} has NaN or inf values in {', '.join(bad[:5])}")
    module.load_state_dict(state, strict=True)
