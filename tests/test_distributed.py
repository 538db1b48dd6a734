"""torchrun: two CPU processes (gloo) give the results of one, write only from rank 0, and resume after a kill.

Every run here is `python -m torch.distributed.run --standalone --nproc-per-node 2 -m imgclf train ...`
(torchrun as a module: no PATH lookup) on tiny generated images with the tiny test backbone.

Tolerances: one process and two sum the same per-image gradients in a different order, so weights
agree to float rounding, not bit for bit. Fine-tuning: measured 5e-7 (absolute, largest weight
difference) after two epochs on a 2-core machine; the test allows 1e-5 on weights and val logits
and asks for equal accuracies. The fine-tuning runs read the probe's features from one shared
feature cache: features computed in batches of another composition differ in the last bits, and
the head's L-BFGS fit magnifies that to ~1e-4 in the head. The probe test, which computes its
features in two processes, allows 1e-3 on the head (see PROBE_TOLERANCE).

Which process writes what is recorded by an audit hook (`sys.addaudithook`, installed by a
`sitecustomize` on the workers' PYTHONPATH): every open-for-writing, mkdir, rename and delete under
`--out`, with the writer's RANK. Files written by Rust code (safetensors) are not seen by the hook,
but every folder they are written into is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from safetensors.torch import load_file

from imgclf.training import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[1] / "src"
# Absolute, on every weight and on val logits after fine-tuning, per training precision (both are
# forced, whatever the CPU has). fp32: measured ~5e-7. bf16 autocast rounds every product to 8 bits
# of mantissa, and kernels for batches of another size round differently: measured 4.9e-4 on an AMD
# EPYC with AVX512-BF16 (2026-11-30), 10x that allowed.
WEIGHT_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}  # on the per-epoch mean losses
# On the val logits after fine-tuning, relative to the largest |logit|: the weights' differences summed
# over the features. bf16 with the backbone's lr equal to the head's: 6.4e-3 absolute on an AMD EPYC
# (Zen 4, AVX512-BF16; 2026-12-01); 2% of the largest logit allowed (bf16 keeps 8 bits: 0.4% per rounding).
LOGIT_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
PROBE_TOLERANCE = 1e-3  # absolute, on the probe's head; features differ by float rounding (see above)

WRITE_HOOK = '''
import os, sys
_watch = os.environ.get("IMGCLF_TEST_WATCH")
if _watch:
    _watch = os.path.realpath(_watch)
    _who = os.environ.get("RANK", "launcher")
    _fd = os.open(os.environ["IMGCLF_TEST_WRITE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & _WRITE_FLAGS):
                return
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(path))
            if real == _watch or real.startswith(_watch + os.sep):
                os.write(_fd, f"{_who}\\t{event}\\t{real}\\n".encode())

    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data (3 classes x 10 images: 27 train, 3 val) and a PYTHONPATH with the write hook and no OpenVINO.

    OpenVINO would convert the network for every validation pass (seconds each); a stub package
    that fails to import turns it off in the workers, as `runtime.openvino_available` does here.
    """
    root = tmp_path_factory.mktemp("distributed")
    make_image_folder(root / "data", classes=3, per_class=10, size=32)
    stubs = root / "stubs"
    (stubs / "openvino").mkdir(parents=True)
    (stubs / "openvino" / "__init__.py").write_text("raise ImportError('openvino is disabled in this test')\n")
    (stubs / "sitecustomize.py").write_text(WRITE_HOOK)
    return root


def common_args(data: Path, recipe: str) -> list[str]:
    # Batch 4 over 27 images: the last batch of 3 splits unevenly (2 + 1), val's 3 images too.
    return ["--backbone", TINY_BACKBONE, "--random-init", "--recipe", recipe, "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", *(["--epochs", "2"] if recipe == "finetune" else [])]


def environment(workspace: Path, out: Path, cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The workers' environment; the feature cache is `cache`, else a new one next to `out`."""
    env = dict(os.environ, PYTHONPATH=f"{workspace / 'stubs'}{os.pathsep}{SRC}", IMGCLF_OFFLINE="1",
               IMGCLF_PROGRESS="0", IMGCLF_TEST_WATCH=str(out), IMGCLF_TEST_WRITE_LOG=str(out) + ".writes",
               IMGCLF_CACHE=str(cache or str(out) + ".cache"), **extra)
    env.pop(ckpt.PAUSE_ENV, None)
    return env


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "imgclf", "train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> str:
    out, err = proc.communicate(timeout=900)  # ~10 s on an idle 2-core machine; minutes on a busy one
    assert proc.returncode == 0, err.decode()[-4000:]
    return out.decode()


def train_here(cache: Path, **options: object) -> None:
    """A one-process reference run in this process, with the workers' settings (PyTorch frozen
    forwards, each process's share of the cores), its feature cache in `cache`."""
    import imgclf
    import imgclf.runtime.frozen
    from imgclf.distributed import cpu_cores

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imgclf.runtime.frozen, "openvino_available", lambda: False)
        patch.setenv("IMGCLF_CACHE", str(cache))
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, cpu_cores() // 2))
        try:
            imgclf.train(**options)
        finally:
            torch.set_num_threads(threads)


def writers(out: Path) -> dict[str, list[str]]:
    """{rank: [event path, ...]} of every write under `out` seen by the hook."""
    found: dict[str, list[str]] = {}
    log = Path(str(out) + ".writes")
    for line in log.read_text().splitlines() if log.exists() else []:
        who, event, path = line.split("\t")
        found.setdefault(who, []).append(f"{event} {path}")
    return found


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def val_logits(bundle: Path, data: Path) -> tuple[torch.Tensor, float]:
    """The bundle's logits on the val images (and its val accuracy from the bundle)."""
    import imgclf
    from imgclf.data.pipeline import ImageStore, normalize
    from imgclf.data.sources import load_dataset

    model = imgclf.load(bundle)
    dataset = load_dataset(str(data), val_fraction=0.1, seed=0)
    store = ImageStore.decode(dataset.val, model.preprocessing, memory_budget=2**30)
    _, batch = store.batch(np.arange(len(store)))
    with torch.no_grad():
        logits = model.module.eval()(normalize(batch, model.preprocessing))
    return logits, float(model.meta["metrics"]["val"]["accuracy"])


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def precision(request: pytest.FixtureRequest) -> str:
    """The training precision, forced: both run on every CPU (bf16 is emulated where not native)."""
    return str(request.param)


@pytest.fixture(scope="module")
def one_process_finetune(workspace: Path, precision: str) -> Path:
    """The one-process reference; it leaves the probe's features in `workspace/features`."""
    data, out = workspace / "data", workspace / f"one-{precision}"
    train_here(workspace / "features", data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True,
               recipe="finetune", image_size=32, batch_size=4, epochs=2, device="cpu", precision=precision)
    return out


@pytest.fixture(scope="module")
def two_process_finetune(workspace: Path, one_process_finetune: Path, precision: str) -> tuple[Path, str]:
    """An uninterrupted two-process fine-tuning run, on the reference's features: (its --out, its stdout)."""
    out = workspace / f"two-{precision}"
    data = workspace / "data"
    stdout = finish(torchrun([str(data), "--out", str(out), *common_args(data, "finetune"), "--precision", precision],
                             environment(workspace, out, cache=workspace / "features")))
    return out, stdout


def test_two_processes_fine_tune_like_one(
    workspace: Path, one_process_finetune: Path, two_process_finetune: tuple[Path, str], precision: str
) -> None:
    data = workspace / "data"
    one = one_process_finetune
    two, _ = two_process_finetune
    # The same head to start from: both read the features from the cache (each rank its block).
    assert "features train: 27 from the feature cache, 0 computed" in (two / "train.log").read_text()

    tolerance = WEIGHT_TOLERANCE[precision]
    assert max_difference(load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))) \
        < tolerance
    logits_one, accuracy_one = val_logits(one, data)
    logits_two, accuracy_two = val_logits(two, data)
    assert accuracy_one == accuracy_two
    scale = float(logits_one.abs().max())
    assert float((logits_one - logits_two).abs().max()) < LOGIT_TOLERANCE[precision] * scale, scale
    # Per-epoch training loss and accuracy are reduced over the ranks: the global batch's numbers.
    history_one = json.loads((one / "history.json").read_text())
    history_two = json.loads((two / "history.json").read_text())
    assert history_one[0] == history_two[0] and history_one[0]["epoch"] == 0  # the probe's head, same features
    for a, b in zip(history_one[1:], history_two[1:], strict=True):
        assert a["images"] == b["images"] == 27
        assert a["train_accuracy"] == b["train_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["selected"] == b["selected"]
        assert abs(a["train_loss"] - b["train_loss"]) < LOSS_TOLERANCE[precision]
        assert abs(a["val_loss"] - b["val_loss"]) < LOSS_TOLERANCE[precision]
    meta = json.loads((two / "imgclf.json").read_text())
    assert meta["hardware"]["processes"] == 2 and meta["hardware"]["backend"] == "gloo"


def test_only_rank_0_writes_and_logs(two_process_finetune: tuple[Path, str]) -> None:
    out, stdout = two_process_finetune
    seen = writers(out)
    assert seen.get("0"), "the hook saw no write at all: it is not installed"
    assert set(seen) == {"0"}, {who: paths[:3] for who, paths in seen.items() if who != "0"}
    assert any(p.endswith(f"{out}/imgclf.json") for p in seen["0"])
    assert any("/checkpoints/" in p for p in seen["0"])
    assert {"model.safetensors", "imgclf.json", "config.yaml", "history.json", "metrics.jsonl", "train.log",
            "report"} <= {p.name for p in out.iterdir()}
    # Each line of the run's story once: one process logged it.
    log = (out / "train.log").read_text()
    assert log.count("distributed: 2 processes") == 1
    for line in ("epoch 1/2:", "epoch 2/2:", "linear probe:", "test-time size:", "done in"):
        assert log.count(line) == 1, line
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert stdout.count("bundle:") == 1


def newest_fit_step(out: Path) -> int:
    """Batches trained according to the newest checkpoint (0 before fine-tuning began)."""
    found = ckpt.latest_checkpoint(out)
    if found is None or found.state["stage"] != "fit":
        return 0
    return (found.state["loop"]["epoch"] - 1) * 7 + found.state["loop"]["step"]  # 7 batches per epoch


def kill_launch(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL torchrun and its workers, as a crashed machine would stop them.

    The workers run in their own sessions (torchrun starts them so), so killing torchrun's process
    group would leave them running: each is killed by its process id.
    """
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    proc.send_signal(signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker and anything it started
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


def test_resume_after_killing_every_process(
    workspace: Path, two_process_finetune: tuple[Path, str], precision: str
) -> None:
    data = workspace / "data"
    out = workspace / f"killed-{precision}"
    args = [str(data), "--out", str(out), *common_args(data, "finetune"), "--precision", precision,
            "--checkpoint-minutes", "0"]
    # A pause inside every checkpoint write keeps fine-tuning slow enough to be killed in the middle.
    features = workspace / "features"  # the uninterrupted run's head, to compare the final weights
    proc = torchrun(args, environment(workspace, out, cache=features, **{ckpt.PAUSE_ENV: "0.3"}))
    deadline = time.monotonic() + 600
    while newest_fit_step(out) < 3:
        assert proc.poll() is None, proc.communicate()[1].decode()[-4000:]
        assert time.monotonic() < deadline, "fine-tuning did not start in time"
        time.sleep(0.05)
    kill_launch(proc)
    killed_at = newest_fit_step(out)
    assert 3 <= killed_at < 14 and not (out / "model.safetensors").exists()

    # --checkpoint-minutes may change on resume: fewer writes make the rest of the run faster.
    resume = [*args[:-1], "10", "--resume"]
    finish(torchrun(resume, environment(workspace, out, cache=features)))
    log = (out / "train.log").read_text()
    assert log.count("resuming from ckpt-") == 1
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert set(writers(out)) == {"0"}
    # It continued at the checkpoint's batch and ends where the uninterrupted run ended.
    uninterrupted, _ = two_process_finetune
    assert max_difference(load_file(str(out / "model.safetensors")),
                          load_file(str(uninterrupted / "model.safetensors"))) < WEIGHT_TOLERANCE[precision]
    import imgclf

    assert imgclf.load(out).classes == ["class_0", "class_1", "class_2"]


def test_two_processes_probe_like_one(workspace: Path) -> None:
    data = workspace / "data"
    one, two = workspace / "probe-one", workspace / "probe-two"
    proc = torchrun([str(data), "--out", str(two), *common_args(data, "probe")], environment(workspace, two))
    train_here(workspace / "probe-features", data=str(data), out=str(one), backbone=TINY_BACKBONE,
               random_init=True, recipe="probe", image_size=32, batch_size=4, device="cpu", feature_cache=False)
    finish(proc)
    meta_one = json.loads((one / "imgclf.json").read_text())
    meta_two = json.loads((two / "imgclf.json").read_text())
    assert meta_two["probe"]["images"] == 27  # every rank's features were gathered
    assert meta_one["probe"]["l2"] == meta_two["probe"]["l2"]
    assert meta_one["probe"]["scores"] == meta_two["probe"]["scores"]
    assert meta_one["metrics"]["val"]["accuracy"] == meta_two["metrics"]["val"]["accuracy"]
    assert max_difference(load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))) \
        < PROBE_TOLERANCE
    assert set(writers(two)) == {"0"}
    assert (two / "train.log").read_text().count("features train: 0 from the feature cache, 27 computed") == 1
    # Rank 0 put every image's features in the cache (outside --out) once, those the other rank computed too.
    shards = [s for s in Path(str(two) + ".cache").rglob("*.safetensors") if s.parent.name != "heads"]
    keys = torch.cat([load_file(str(s))["keys"] for s in shards])
    assert len(keys) == 27 + 3 == len({bytes(k.numpy()) for k in keys})


def test_helpers_do_nothing_without_torchrun() -> None:
    from imgclf import distributed

    assert distributed.launch() is None and not distributed.active() and distributed.is_main()
    assert distributed.shard_range(5).tolist() == [0, 1, 2, 3, 4]
    assert distributed.batch_slice(4) == slice(None)
    rows = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(rows) is rows
    assert distributed.agree("mine") == "mine" and distributed.rank0_result(lambda: 7) == 7
    assert distributed.all_sum([1, torch.tensor(2.5)]) == [1.0, 2.5]  # summed over one rank


def _gather_worker(rank: int, store_file: str, results: str) -> None:
    """One of two gloo processes: uneven and empty blocks, and an error on rank 0 reaching rank 1."""
    from imgclf import distributed

    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        block = distributed.shard_range(1).tolist()  # rank 0 gets the one row, rank 1 none
        local = torch.full((len(block), 3), float(rank + 1)) if block else torch.zeros(0, 0)
        gathered = distributed.gather_rows(local)
        uneven = distributed.gather_rows(torch.arange(3 if rank == 0 else 2) + 10 * rank)
        try:
            distributed.rank0_result(lambda: 1 / 0)
            failure = ""
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            failure = type(exc).__name__
        Path(results, f"{rank}.json").write_text(json.dumps({
            "block": block, "gathered": gathered.tolist(), "uneven": uneven.tolist(), "failure": failure,
            "slice": [0, 1, 2][distributed.batch_slice(3)],
        }))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_handles_uneven_and_empty_blocks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["block"] for r in results] == [[0], []]
    assert [r["slice"] for r in results] == [[0, 2], [1]]
    for r in results:  # every rank sees the same rows, in rank order
        assert r["gathered"] == [[1.0, 1.0, 1.0]]
        assert r["uneven"] == [0, 1, 2, 10, 11]
    assert [r["failure"] for r in results] == ["ZeroDivisionError", "RankFailedError"]
