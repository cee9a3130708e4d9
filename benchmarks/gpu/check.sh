#!/usr/bin/env bash
# Issue 3's GPU checks in one call of the device machine (points 3 and 8): the CUDA runtimes'
# parity tests, nvJPEG decoding, and bench-feature on the GPU. Prepared so that a session lent a
# GPU spends its minutes measuring, not installing. Run it from the repository root there:
#
#   make gpu-wheels                      # here, once: .whl/ for the GPU machine's Python 3.12
#   run(command="bash benchmarks/gpu/check.sh", carry=[".whl"], timeout_s=600)
#
# Results land in $OUT (tests.log, bench-gpu.md, bench.log, gpu.txt).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/gpu.txt"

# The runtimes' parity against fp32 (fp16/bf16 on CUDA) and nvJPEG decoding; the CPU tests of
# these files run too, as a check that the carried packages work there.
timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/services/feature/test_runtimes.py tests/services/feature/test_device_decoding.py \
    -k "cuda or nvjpeg or device or bf16 or onnx_export_and_runtime" 2>&1 | tee "$OUT/tests.log"

# Point 8: ViT-B/32 in fp16 from JPEG bytes to vectors, against the tutorial's loop on the GPU.
timeout 300 python3 -m benchmarks.feature --device cuda --models vit-b32 --clients 1,16 \
    --seconds 10 --warmup 3 --out "$OUT/bench-gpu.md" 2>&1 | tee "$OUT/bench.log"
