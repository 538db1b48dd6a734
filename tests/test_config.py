from __future__ import annotations

from pathlib import Path

import pytest

from imgclf.config import TrainConfig, load_yaml, resolve_config, save_yaml
from imgclf.errors import ConfigError


def test_flags_override_file_and_defaults() -> None:
    cfg = resolve_config({"epochs": 3, "lr": 0.01}, epochs=7, data="d", out="o", lr=None)
    assert cfg.epochs == 7  # flag beats file
    assert cfg.lr == 0.01  # file beats default; a None flag is ignored
    assert cfg.batch_size == TrainConfig().batch_size


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean epochs"):
        resolve_config({"epoch": 3})


def test_invalid_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="recipe"):
        TrainConfig(recipe="magic")  # type: ignore[arg-type]


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = resolve_config(data="d", out="o", epochs=2, probe_l2=[0.1])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert resolve_config(load_yaml(tmp_path / "c.yaml")) == cfg


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "c.yaml")
