"""The frozen runtime: streamed uint8 batches against float calls, per precision, and kept OpenVINO conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from stand_ins import PREP, CountingForward

from imgclf.data.pipeline import normalize

# Largest |difference| allowed between two runs of one network, relative to the largest |output|, per
# precision of the runtime. fp32: float rounding (measured < 1e-6). bf16 keeps 8 bits of mantissa
# (relative step 2^-8 = 0.4%) and OpenVINO runs it only where the CPU has it (elsewhere the hint falls
# back to fp32): measured 0.74% of the largest output (OpenVINO bf16 against torch fp32; in fp32
# 6.7e-7 and 9.6e-7) on an AMD EPYC with AVX512-BF16 (2026-12-01).
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def close(a: torch.Tensor, b: torch.Tensor, precision: str) -> bool:
    """`a` and `b` agree within `precision`'s tolerance, relative to the larger output."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= RELATIVE_TOLERANCE[precision] * scale


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_uint8_batches_match_normalised_float_calls(tmp_path: Path, precision: str) -> None:
    pytest.importorskip("openvino")
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward, stream_outputs

    torch.manual_seed(0)
    net = create_backbone(TINY_BACKBONE, random_init=True).model
    forward = FrozenForward(net, image_size=32, runtime="openvino", precision=precision)
    images = torch.randint(0, 256, (21, 3, 32, 32), dtype=torch.uint8)
    # ImageStore's channels_last batches go in as they are, contiguous ones are laid out first.
    batches = [(np.arange(i, min(i + 8, 21)), images[i : i + 8].contiguous(memory_format=torch.channels_last)
                if i % 16 else images[i : i + 8]) for i in range(0, 21, 8)]
    assert not batches[0][1].is_contiguous(memory_format=torch.channels_last)
    assert batches[1][1].is_contiguous(memory_format=torch.channels_last)
    streamed = list(forward.stream(iter(batches), PREP))
    assert [b[0].tolist() for b in streamed] == [b[0].tolist() for b in batches]  # in order
    expected = forward(normalize(images, PREP))
    assert close(torch.cat([b[1] for b in streamed]), expected, precision)
    with torch.no_grad():
        reference = net(normalize(images, PREP))
    assert close(expected, reference, precision)
    # A plain callable (no `stream`) is fed normalised batches one by one.
    counting = CountingForward()
    plain = torch.cat([out for _, out in stream_outputs(counting, iter(batches), PREP)])
    assert counting.images == 21 and torch.allclose(plain, CountingForward()(normalize(images, PREP)))


def test_a_kept_openvino_conversion_is_read_back_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ov = pytest.importorskip("openvino")
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    net = create_backbone(TINY_BACKBONE, random_init=True).model
    batch = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), PREP)
    FrozenForward(net, image_size=32, runtime="openvino")  # not kept: nothing written
    assert not (tmp_path / "cache" / "openvino").exists()
    first = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    kept = list((tmp_path / "cache" / "openvino").glob("*.xml"))
    assert len(kept) == 1 and kept[0].with_suffix(".bin").is_file()
    real_convert = ov.convert_model

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    again = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    assert torch.allclose(again, first, atol=1e-6)
    # Other weights are another network.
    other = create_backbone(TINY_BACKBONE, random_init=True).model
    with pytest.raises(AssertionError, match="converted again"):
        FrozenForward(other, image_size=32, runtime="openvino", keep_converted=True)
    # A damaged file is reported and replaced.
    monkeypatch.setattr(ov, "convert_model", real_convert)
    kept[0].write_text("<not a network")
    repaired = FrozenForward(net, image_size=32, runtime="openvino", keep_converted=True)(batch)
    assert "ignoring the unreadable converted network" in capsys.readouterr().err
    assert torch.allclose(repaired, first, atol=1e-6)
    assert list((tmp_path / "cache" / "openvino").glob("*.xml")) == kept  # rewritten in place
