"""The GPU fast path, checked on a CPU: batch-size fallback on injected out-of-memory errors, the
data-placement decision with injected free-memory figures, CPU no-ops, --compile plumbing, and the
GPU benchmark's packer (images and weights round-trip)."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from PIL import Image
from stand_ins import PREP, tiny_fit_inputs
from torch import nn

from imgclf.config import TrainConfig
from imgclf.data.pipeline import DeviceStore, ImageStore, to_device
from imgclf.data.sources import load_dataset
from imgclf.errors import ImgclfError
from imgclf.training import gpu
from imgclf.training.gpu import choose_placement, place_store, run_with_batch_fallback

CUDA = torch.device("cuda")
GIB = 2**30


def oom_above(limit: int, calls: list[int]):  # noqa: ANN201
    def step(batch_size: int) -> str:
        calls.append(batch_size)
        if batch_size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    return step


# --------------------------------------------------------------------------------------------
# Automatic batch size


def test_batch_size_halves_on_out_of_memory_until_a_step_fits(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []
    assert run_with_batch_fallback(oom_above(64, calls), 256) == ("done", 64)
    assert calls == [256, 128, 64]
    err = capsys.readouterr().err
    assert "out of memory at batch size 256: retrying at 128" in err
    assert "out of memory at batch size 128: retrying at 64" in err


def test_below_the_floor_it_stops_with_a_fix() -> None:
    calls: list[int] = []
    with pytest.raises(ImgclfError) as info:
        run_with_batch_fallback(oom_above(4, calls), 32, floor=8)
    assert calls == [32, 16, 8]
    assert "batch size 8" in str(info.value) and "fix:" in str(info.value)


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def step(batch_size: int) -> None:
        calls.append(batch_size)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_batch_fallback(step, 256)
    assert calls == [256]


def _tiny_fit(tmp_path: Path, cfg: TrainConfig):  # noqa: ANN202
    from imgclf.training.finetune import fit

    model, train, val = tiny_fit_inputs(make_image_folder(tmp_path / "data", per_class=8))
    return fit(model, train, val, cfg, epochs=2, device=torch.device("cpu"), dtype=torch.float32), len(train)


def test_fit_restarts_the_epoch_at_half_the_batch_after_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import imgclf.runtime.frozen
    from imgclf.training import finetune

    monkeypatch.setattr(imgclf.runtime.frozen, "openvino_available", lambda: False)

    def forward_that_fits_8(model: nn.Module, *, compile_model: bool):  # noqa: ANN202
        def forward(x: torch.Tensor) -> torch.Tensor:
            if len(x) > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return model(x)

        return forward

    monkeypatch.setattr(finetune, "training_forward", forward_that_fits_8)
    cfg = TrainConfig(data="d", out="o", batch_size=32, augment="light", patience=5)
    result, train_images = _tiny_fit(tmp_path, cfg)
    assert [h["batch_size"] for h in result.history] == [8, 8]
    assert all(h["images"] == train_images for h in result.history)  # the failed epoch started over
    err = capsys.readouterr().err
    assert "out of memory at batch size 32: retrying at 16" in err
    assert "out of memory at batch size 16: retrying at 8" in err


# --------------------------------------------------------------------------------------------
# Where the images live


def test_placement_uses_the_gpu_only_when_the_images_fit_the_share() -> None:
    seven_gib = 7 * GIB
    assert choose_placement(seven_gib, device=CUDA, in_memory=True, free_bytes=78 * GIB) == "device"
    assert choose_placement(seven_gib, device=CUDA, in_memory=True, free_bytes=10 * GIB) == "pinned"
    assert choose_placement(seven_gib, device=CUDA, in_memory=False, free_bytes=78 * GIB) == "pinned"
    share = gpu.GPU_DATA_SHARE
    assert choose_placement(int(share * 20 * GIB), device=CUDA, in_memory=True, free_bytes=20 * GIB) == "device"
    assert choose_placement(int(share * 20 * GIB) + 1, device=CUDA, in_memory=True, free_bytes=20 * GIB) == "pinned"
    assert choose_placement(1, device=torch.device("cpu"), in_memory=True, free_bytes=None) == "host"


def test_on_a_cpu_stores_and_batches_are_left_as_they_are(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    train = load_dataset(str(root), val_fraction=0.25, seed=0).train
    store = ImageStore.decode(train, PREP, memory_budget=GIB, workers=1)
    assert place_store(store, torch.device("cpu"), name="train") is store
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert to_device(batch, torch.device("cpu")) is batch  # no pinning, no copy


@pytest.mark.parametrize("placement", ["device", "pinned"])
def test_a_device_store_yields_the_same_batches_as_its_parent(tmp_path: Path, placement: str) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    train = load_dataset(str(root), val_fraction=0.25, seed=0).train
    store = ImageStore.decode(train, PREP, memory_budget=GIB, workers=1)
    placed = DeviceStore(store, torch.device("cpu"), resident=placement == "device")
    order = np.random.default_rng(0).permutation(len(store))
    expected = list(store.batches(order, 3))
    got = list(placed.batches(order, 3))
    assert len(placed) == len(store) and torch.equal(placed.labels, store.labels)
    assert len(got) == len(expected)
    for (i1, b1), (i2, b2) in zip(expected, got, strict=True):
        assert np.array_equal(i1, i2) and torch.equal(b1, b2)


def test_place_store_logs_the_chosen_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    train = load_dataset(str(root), val_fraction=0.25, seed=0).train
    store = ImageStore.decode(train, PREP, memory_budget=GIB, workers=1)
    # Pretend to be on CUDA; the "device" copy itself stays on the CPU.
    monkeypatch.setattr(ImageStore, "to", lambda self, device, *, resident: SimpleNamespace(resident=resident))
    assert place_store(store, CUDA, name="train", free_bytes=78 * GIB).resident is True  # type: ignore[attr-defined]
    assert place_store(store, CUDA, name="train", free_bytes=1000).resident is False  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert "copied to cuda once" in err and "pinned and copied as uint8" in err


# --------------------------------------------------------------------------------------------
# --compile


def test_compile_flag_reaches_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgclf.runtime.frozen
    from imgclf.cli import main

    captured: dict[str, object] = {}

    def fake_train(cfg: TrainConfig) -> SimpleNamespace:
        captured["cfg"] = cfg
        return SimpleNamespace(meta={"metrics": {}}, info=SimpleNamespace(metrics={}))

    monkeypatch.setattr("imgclf.workflow.train", fake_train)
    assert main(["train", "data", "--out", str(tmp_path / "o"), "--compile"]) == 0
    assert captured["cfg"].compile is True  # type: ignore[attr-defined]
    assert TrainConfig().compile is False

    # In fit, the compiled module is what the training step calls (compiling itself is not run here:
    # it takes minutes on 2 CPU cores).
    monkeypatch.setattr(imgclf.runtime.frozen, "openvino_available", lambda: False)
    compiled: list[nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    result, _ = _tiny_fit(tmp_path, TrainConfig(data="d", out="o", batch_size=8, compile=True, augment="none"))
    assert len(compiled) == 1 and len(result.history) == 2


# --------------------------------------------------------------------------------------------
# The GPU benchmark's packer


def _gpu_pack():  # noqa: ANN202
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_pack.py"
    spec = importlib.util.spec_from_file_location("gpu_pack", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_pack"] = module
    spec.loader.exec_module(module)
    return module


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_packed_images_unpack_byte_identical(tmp_path: Path) -> None:
    pack = _gpu_pack()
    items = [
        (split, cls, f"{i:04d}.jpg", _jpeg((i * 40, 0 if cls == "cat" else 200, 50)))
        for split in ("train", "test") for cls in ("cat", "dog") for i in range(3)
    ]
    pack.pack_images(items, tmp_path / "packed.npz")
    root = pack.unpack_images(tmp_path / "packed.npz", tmp_path / "out")
    for split, cls, name, data in items:
        assert (root / split / cls / name).read_bytes() == data
    some = pack.unpack_images(tmp_path / "packed.npz", tmp_path / "some", per_class={"train": 2, "test": 1})
    assert len(list((some / "train" / "cat").iterdir())) == 2 and len(list((some / "test" / "dog").iterdir())) == 1
    dataset = load_dataset(str(root), val_fraction=0.25, seed=0)  # what imgclf reads on the GPU machine
    assert dataset.classes == ["cat", "dog"] and dataset.test is not None and len(dataset.test) == 6


def test_fp16_weights_load_back_into_fp32_close_to_the_original(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from imgclf.models.backbones import create_backbone, load_into, read_state_dict

    pack = _gpu_pack()
    torch.manual_seed(0)
    model = create_backbone(TINY_BACKBONE, random_init=True).model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["huge"] = torch.tensor([1e6, 1.0])  # beyond fp16's range: must stay fp32
    packed, kept = pack.to_fp16(state)
    assert kept == ["huge"] and packed["huge"].dtype == torch.float32
    assert all(packed[k].dtype == torch.float16 for k, v in state.items() if v.is_floating_point() and k != "huge")
    assert all(packed[k].dtype == v.dtype for k, v in state.items() if not v.is_floating_point())
    del packed["huge"], state["huge"]
    save_file(packed, str(tmp_path / "w.safetensors"))
    fresh = create_backbone(TINY_BACKBONE, random_init=True).model.eval()
    load_into(fresh, read_state_dict(tmp_path / "w.safetensors"), by_position=False, source="test")
    for key, value in fresh.state_dict().items():
        assert value.dtype == state[key].dtype  # fp32 parameters, loaded from fp16
        if value.is_floating_point():
            scale = float(state[key].abs().max()) or 1.0
            assert float((value - state[key]).abs().max()) <= 2.0**-10 * scale
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), rtol=1e-2, atol=1e-2)
