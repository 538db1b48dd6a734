from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgclf.errors import BackboneError
from imgclf.models.backbones import (
    BackboneEntry,
    create_backbone,
    list_backbones,
    load_into,
    read_state_dict,
    register,
    resolve_backbone,
)


@pytest.mark.parametrize("entry", list_backbones(), ids=lambda e: e.name)
def test_every_curated_backbone_honours_the_contract(entry: BackboneEntry) -> None:
    """Headless: returns num_features pooled features; preprocessing comes from its config."""
    backbone = create_backbone(entry.name, pretrained=False)
    size = 224 if "vit" in entry.name else 64
    with torch.no_grad():
        features = backbone.model.eval()(torch.zeros(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)
    assert len(backbone.data_config["mean"]) == 3 and backbone.data_config["input_size"][0] == 3


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(BackboneError, match="did you mean.*tf_efficientnet_lite0"):
        resolve_backbone("tf_efficientnet_lit0")


def test_any_timm_name_is_accepted() -> None:
    assert resolve_backbone("resnet18").timm_name == "resnet18"


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(BackboneEntry(name="resnet50", timm_name="resnet50", summary="dup"))


def test_list_backbones_filters_with_patterns() -> None:
    names = [e.name for e in list_backbones("tf_*", exclude="*lite2")]
    assert names == ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]


def test_weights_file_round_trip_and_positional_mapping(tmp_path: Path) -> None:
    source = create_backbone("test_efficientnet", random_init=True).model
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    loaded = create_backbone("test_efficientnet", weights=tmp_path / "w.safetensors").model
    assert all(torch.equal(a, b) for a, b in zip(state.values(), loaded.state_dict().values(), strict=True))
    # Other key names, same order and shapes, plus a classifier at the end: matched by position.
    renamed = {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}
    renamed["_fc.weight"] = torch.zeros(1000, 32)
    target = create_backbone("test_efficientnet", random_init=True).model
    load_into(target, renamed, by_position=False, source="test")
    assert all(torch.equal(a, b) for a, b in zip(state.values(), target.state_dict().values(), strict=True))


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    other = create_backbone("test_resnet", random_init=True).model
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone("test_efficientnet", weights=tmp_path / "w.safetensors")


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    save_file({"a": torch.tensor([1.0, float("nan")])}, str(tmp_path / "w.safetensors"))
    with pytest.raises(BackboneError, match="NaN or inf"):
        read_state_dict(tmp_path / "w.safetensors")


def test_no_offline_weights_lists_the_sources_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCLF_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert "Hugging Face hub" in message and "--weights PATH" in message and "--random-init" in message
