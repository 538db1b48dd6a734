"""Safe loading: no file read by imgclf can run code, and corrupt or poisoned weights are refused.

The malicious files hold a pickle whose unpickling writes a marker file; the tests check that each
entry point refuses them with a clear error and that the marker is never created.
"""

from __future__ import annotations

import pickle
import resource
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from safetensors.torch import load_file, save_file

from imgclf.bundle import Model
from imgclf.cli import main
from imgclf.errors import BackboneError, BundleError
from imgclf.models.backbones import read_state_dict


class Payload:
    """Unpickling this object runs `exec`, which writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def malicious_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a torch zip checkpoint and as a raw (legacy) pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"conv_stem.weight": torch.zeros(1), "evil": Payload(marker)}
    zipped, raw = folder / "evil_zip.pth", folder / "evil_raw.pth"
    torch.save(state, zipped)
    raw.write_bytes(pickle.dumps(state))
    return {"zip": zipped, "raw": raw}


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Guard for the tests below: plain unpickling of these files does run the payload."""
    ran = tmp_path / "ran"
    files = malicious_files(tmp_path / "files", ran)
    pickle.loads(files["raw"].read_bytes())
    assert ran.read_text() == "payload ran"


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_weights_flag_refuses_a_malicious_pickle(
    tmp_path: Path, marker: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = malicious_files(tmp_path / "files", marker)[kind]
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    code = main(["train", str(data), "--out", str(tmp_path / "out"), "--backbone", TINY_BACKBONE,
                 "--weights", str(evil), "--recipe", "probe", "--image-size", "32"])
    assert code == 2
    assert "refusing to read weights file" in capsys.readouterr().err
    assert not marker.exists()


def test_evaluate_refuses_a_bundle_holding_a_pickle(
    bundle_copy: Path, tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = malicious_files(tmp_path / "files", marker)["zip"]
    shutil.copy(evil, bundle_copy / "model.safetensors")  # a pickle posing as safetensors
    data = make_image_folder(tmp_path / "data", per_class=2, size=32)
    assert main(["evaluate", str(bundle_copy), str(data)]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["pickle named model.safetensors", "model.pth instead of model.safetensors"])
def test_predict_refuses_a_bundle_holding_a_pickle(
    bundle_copy: Path, tmp_path: Path, marker: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = malicious_files(tmp_path / "files", marker)["raw"]
    if layout.startswith("model.pth"):
        (bundle_copy / "model.safetensors").unlink()
        shutil.copy(evil, bundle_copy / "model.pth")
    else:
        shutil.copy(evil, bundle_copy / "model.safetensors")
    image = make_image_folder(tmp_path / "data", classes=1, per_class=1, size=32) / "class_0" / "000.png"
    assert main(["predict", str(bundle_copy), str(image)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "error:" in err
    assert not marker.exists()


def write_corrupt_header(path: Path, header_length: int, header: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", header_length) + header + b"\0" * 64)


@pytest.mark.parametrize(
    "header_length, header",
    [(2**62, b"{"), (2**31, b"{}"), (12, b"not json!!!!"), (40, b'{"w":{"dtype":"F32","shape":[99999999]'
                                                             b',"data_offsets":[0,4]}}')],
    ids=["huge length", "2 GiB length", "garbage JSON", "offsets disagree"],
)
def test_corrupt_safetensors_header_is_a_clear_error_without_runaway_memory(
    bundle_copy: Path, tmp_path: Path, header_length: int, header: bytes
) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    write_corrupt_header(bundle_copy / "model.safetensors", header_length, header)
    with pytest.raises(BundleError, match="is not a readable safetensors file"):
        Model.load(bundle_copy)
    weights = tmp_path / "w.safetensors"
    write_corrupt_header(weights, header_length, header)
    with pytest.raises(BackboneError, match="cannot read weights file"):
        read_state_dict(weights)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB reading a corrupt header"


def test_non_finite_weights_are_refused(bundle_copy: Path, tmp_path: Path) -> None:
    state = load_file(str(bundle_copy / "model.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(bundle_copy / "model.safetensors"))
    with pytest.raises(BundleError, match="NaN or inf values in head.weight"):
        Model.load(bundle_copy)
    weights = tmp_path / "w.pth"
    torch.save({"conv_stem.weight": torch.tensor([1.0, float("inf")])}, weights)
    with pytest.raises(BackboneError, match="NaN or inf"):
        read_state_dict(weights)


def test_class_count_mismatch_lists_the_keys(bundle_copy: Path) -> None:
    import json

    meta = json.loads((bundle_copy / "imgclf.json").read_text())
    meta["head"]["num_classes"] = 5
    (bundle_copy / "imgclf.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"shape differs: head\.bias .*head\.weight"):
        Model.load(bundle_copy)


def test_a_plain_state_dict_pth_still_loads(tmp_path: Path) -> None:
    weights = tmp_path / "ok.pth"
    torch.save({"a": torch.ones(2)}, weights)
    assert torch.equal(read_state_dict(weights)["a"], torch.ones(2))


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig
    from imgclf.training import checkpoint as ckpt

    checkpointer = ckpt.Checkpointer(tmp_path, TrainConfig(data="d", out=str(tmp_path)), None)
    for _ in range(2):
        checkpointer._write({"stage": "head"}, ckpt._tensors("model", torch.nn.Linear(2, 2).state_dict()))
    newest = ckpt.checkpoint_folders(tmp_path)[-1]
    write_corrupt_header(newest / ckpt.TENSORS_FILE, 2**62, b"{")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.read_checkpoint(newest)
    assert ckpt.latest_checkpoint(tmp_path).seq == 1  # type: ignore[union-attr]
