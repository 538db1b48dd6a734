"""Checkpoints and exact resume: a run killed at random moments ends with the same weights.

The crash test starts `imgclf train --deterministic` as a subprocess, kills it with SIGKILL again
and again (at random moments, and deliberately in the middle of checkpoint writes), resumes it
each time, and checks that every checkpoint on disk always loads and that the final weights are
bit-identical to those of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from safetensors.torch import load_file

from imgclf.training import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[1] / "src"
KILLS = 10  # SIGKILLs per crash test, at least MID_WRITE_KILLS of them inside a checkpoint write
MID_WRITE_KILLS = 3


def train_args(data: Path, out: Path, epochs: int = 3) -> list[str]:
    return [
        "train", str(data), "--out", str(out), "--backbone", TINY_BACKBONE, "--random-init",
        "--recipe", "finetune", "--image-size", "32", "--batch-size", "4", "--epochs", str(epochs),
        "--deterministic", "--checkpoint-minutes", "0", "--keep-checkpoints",  # the tests compare the last ones
    ]


@pytest.fixture
def torch_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Run frozen forwards in PyTorch, here and in subprocesses.

    OpenVINO takes seconds to convert the model for every validation pass, which would dominate
    these tests; in subprocesses a stub package that fails to import turns it off.
    """
    import imgclf.runtime.frozen

    monkeypatch.setattr(imgclf.runtime.frozen, "openvino_available", lambda: False)
    stub = tmp_path / "no_openvino" / "openvino"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('openvino is disabled in this test')\n")
    env = dict(os.environ, PYTHONPATH=f"{stub.parent}{os.pathsep}{SRC}", IMGCLF_OFFLINE="1", IMGCLF_PROGRESS="0")
    env.pop(ckpt.PAUSE_ENV, None)
    return env


@pytest.fixture
def restore_torch_settings():
    """`--deterministic` in this process changes global torch settings; put them back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def newest_seq(out: Path) -> int:
    folders = ckpt.checkpoint_folders(out)
    return int(folders[-1].name[5:]) if folders else 0


def temp_checkpoint(out: Path) -> bool:
    folder = out / ckpt.CHECKPOINTS
    return folder.is_dir() and any(p.name.startswith(ckpt.TEMP_PREFIX + "ckpt-") for p in folder.iterdir())


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll `condition` every 10 ms until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("the training process made no progress in time")


def assert_all_checkpoints_load(out: Path) -> None:
    for folder in ckpt.checkpoint_folders(out):
        ckpt.read_checkpoint(folder)  # raises CheckpointError if any is incomplete or corrupt


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(bundle weights, newest checkpoint's tensors, its loop/result state without timings)."""
    last = ckpt.latest_checkpoint(out)
    assert last is not None
    tensors = {k: v for k, v in last.tensors.items() if not k.startswith("rng.")}
    state = {"loop": dict(last.state["loop"]), "result": last.state["result"], "scheduler": last.state["scheduler"]}
    state["loop"].pop("seconds")
    for record in state["result"]["history"]:
        for key in ("train_seconds", "train_images_per_s", "epoch_seconds"):
            record.pop(key, None)  # epoch 0 (the probe) has no training time
    return load_file(str(out / "model.safetensors")), tensors, state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class SimulatedCrash(Exception):
    """Raised right after a chosen checkpoint write, as if the process had died there."""


def test_resume_after_head_fit_mid_epoch_and_epoch_end_is_exact(
    tmp_path: Path, torch_runtime: dict[str, str], restore_torch_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast, in-process variant of the crash test below (which needs `-m slow`)."""
    import imgclf

    data = make_image_folder(tmp_path / "data", classes=3, per_class=6, size=32)  # 15 train: 4 steps/epoch
    options = dict(data=str(data), backbone=TINY_BACKBONE, random_init=True, recipe="finetune", image_size=32,
                   batch_size=4, epochs=2, deterministic=True, checkpoint_minutes=0.0, keep_checkpoints=True)
    imgclf.train(**options, out=str(tmp_path / "reference"))

    # Writes: 1 = after the head fit, 2-5 = after each batch of epoch 1, 6 = end of epoch 1, ...
    crash_after = {1, 3, 6}
    write = ckpt.Checkpointer._write

    def write_then_crash(self: ckpt.Checkpointer, values: dict, tensors: dict) -> None:
        write(self, values, tensors)
        if self.seq in crash_after:
            crash_after.remove(self.seq)
            raise SimulatedCrash(self.seq)

    monkeypatch.setattr(ckpt.Checkpointer, "_write", write_then_crash)
    out = tmp_path / "crashed"
    for _ in range(3):
        with pytest.raises(SimulatedCrash):
            imgclf.train(**options, out=str(out), resume=True)
    imgclf.train(**options, out=str(out), resume=True)
    assert not crash_after
    bundle_a, tensors_a, state_a = final_state(tmp_path / "reference")
    bundle_b, tensors_b, state_b = final_state(out)
    assert_same(bundle_a, bundle_b)
    assert_same(tensors_a, tensors_b)
    assert state_a == state_b


@pytest.mark.slow  # 11 interpreter starts: about 130 s of CPU time
def test_killed_run_resumes_to_identical_weights(
    tmp_path: Path, torch_runtime: dict[str, str], restore_torch_settings: None
) -> None:
    import imgclf
    from imgclf.cli import main

    data = make_image_folder(tmp_path / "data", classes=3, per_class=6, size=32)  # 15 train: 4 steps/epoch
    reference = tmp_path / "reference"
    assert main(train_args(data, reference)) == 0  # in this process: saves one interpreter start
    assert (reference / "metrics.jsonl").read_text().count("\n") == 3

    out = tmp_path / "crashed"
    rng = random.Random(7)
    kills = mid_write = 0
    command = [sys.executable, "-m", "imgclf", *train_args(data, out), "--resume"]
    for attempt in range(40):
        aim_at_write = mid_write < MID_WRITE_KILLS and attempt % 3 == 1
        env = dict(torch_runtime, **{ckpt.PAUSE_ENV: "3"}) if aim_at_write else torch_runtime
        before = newest_seq(out)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills >= KILLS:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
            break
        if attempt == 0:  # anywhere in start-up, data loading or the head fit
            running = True
            time.sleep(rng.uniform(1.0, 4.0))
        elif aim_at_write:
            running = wait_for(lambda: temp_checkpoint(out), proc)
            time.sleep(rng.uniform(0.0, 0.5))  # inside the 3 s pause between the two files
        else:
            running = wait_for(lambda before=before: newest_seq(out) > before, proc)
            time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            mid_write += aim_at_write and temp_checkpoint(out)
        _, err = proc.communicate(timeout=60)
        if not running or proc.returncode == 0:
            assert proc.returncode == 0, err.decode()[-2000:]
            break
        assert_all_checkpoints_load(out)
    assert kills >= KILLS and mid_write >= MID_WRITE_KILLS, (kills, mid_write)
    assert not temp_checkpoint(out), "the last start should have removed the killed writes' temp folders"
    assert_all_checkpoints_load(out)

    bundle_a, tensors_a, state_a = final_state(reference)
    bundle_b, tensors_b, state_b = final_state(out)
    assert_same(bundle_a, bundle_b)
    assert_same(tensors_a, tensors_b)  # last weights, best weights and optimizer moments
    assert state_a == state_b
    # The resumed run's folder explains itself like an uninterrupted one.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert "resuming from ckpt-" in (out / "train.log").read_text()
    assert imgclf.load(out).classes == ["class_0", "class_1", "class_2"]


def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, torch_runtime: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgclf
    from imgclf.training.finetune import NonFiniteLossError

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            PoisonedLoss.calls += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if PoisonedLoss.calls == 7 else loss

    data = make_image_folder(tmp_path / "data", classes=3, per_class=6, size=32)  # 15 train: 4 steps/epoch
    out = tmp_path / "run"
    options = dict(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                   image_size=32, batch_size=4, epochs=2, checkpoint_minutes=0.0)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", PoisonedLoss)
    with pytest.raises(NonFiniteLossError) as caught:
        imgclf.train(**options)
    message = str(caught.value)
    assert "the loss became nan at epoch 2, step 2" in message and "positions [" in message and ".png" in message
    assert PoisonedLoss.calls == 7  # stopped on the first bad step
    last = ckpt.latest_checkpoint(out)
    assert last is not None and (last.state["loop"]["epoch"], last.state["loop"]["step"]) == (2, 2)
    assert_all_checkpoints_load(out)  # nothing written after the bad step, nothing with bad weights
    assert not (out / "model.safetensors").exists()

    # The kept checkpoint is good: the run resumes from it and finishes.
    monkeypatch.undo()
    monkeypatch.setattr("imgclf.runtime.frozen.openvino_available", lambda: False)
    with pytest.raises(imgclf.ImgclfError, match="unfinished run"):
        imgclf.train(**options)  # without --resume the unfinished run is never overwritten
    model = imgclf.train(**options, resume=True)
    assert [r["epoch"] for r in model.meta["history"]] == [0, 1, 2]  # 0: the probe's head


def test_checkpoint_refuses_non_finite_weights(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig
    from imgclf.models.classifier import ImageClassifier
    from imgclf.training.finetune import FitResult, LoopState, NonFiniteLossError

    model = ImageClassifier(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    checkpointer = ckpt.Checkpointer(tmp_path, TrainConfig(data="d", out=str(tmp_path)), None)
    with pytest.raises(NonFiniteLossError, match="NaN or inf"):
        checkpointer.save_fit(model, None, None, LoopState(epoch=1, step=3), FitResult())  # type: ignore[arg-type]
    assert not (tmp_path / ckpt.CHECKPOINTS).exists()


def test_resume_refuses_different_options(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig
    from imgclf.errors import ConfigError

    cfg = TrainConfig(data="d", out=str(tmp_path), lr=1e-3)
    model = torch.nn.Linear(2, 2)
    checkpointer = ckpt.Checkpointer(tmp_path, cfg, None)
    checkpointer._write({"stage": "head"}, ckpt._tensors("model", model.state_dict()))
    with pytest.raises(ConfigError, match="lr: 0.001 then, 0.01 now"):
        ckpt.Checkpointer.open(TrainConfig(data="d", out=str(tmp_path), lr=1e-2, resume=True))
    # Where and how fast it runs may change.
    assert ckpt.Checkpointer.open(TrainConfig(data="d", out=str(tmp_path), lr=1e-3, workers=1, resume=True)).resume_from


def test_stale_temp_folders_are_removed_and_old_checkpoints_pruned(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig

    cfg = TrainConfig(data="d", out=str(tmp_path))
    checkpointer = ckpt.Checkpointer(tmp_path, cfg, None)
    for _ in range(4):
        checkpointer._write({"stage": "head"}, ckpt._tensors("model", torch.nn.Linear(2, 2).state_dict()))
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["ckpt-000003", "ckpt-000004"]
    stale = tmp_path / ckpt.CHECKPOINTS / ".tmp-ckpt-000005-999"
    stale.mkdir()
    (stale / ckpt.TENSORS_FILE).write_bytes(b"half a file")
    resumed = ckpt.Checkpointer.open(TrainConfig(data="d", out=str(tmp_path), resume=True))
    assert not stale.exists() and resumed.resume_from is not None and resumed.resume_from.seq == 4


def test_tensorboard_without_the_package_says_how_to_get_it(tmp_path: Path) -> None:
    import imgclf
    from imgclf.errors import ConfigError
    from imgclf.training.runlog import tensorboard_available

    if tensorboard_available():
        pytest.skip("tensorboard is installed")
    data = make_image_folder(tmp_path / "data", per_class=4, size=32)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        imgclf.train(data=str(data), out=str(tmp_path / "run"), backbone=TINY_BACKBONE, random_init=True,
                     recipe="probe", image_size=32, tensorboard=True)
