#!/usr/bin/env bash
# Every GPU check of the project in one short run, for a session that is lent a device.
#
# On the device machine (its python3 already holds torch, numba, scipy, pandas, ...):
#     bash benchmarks/gpu_check.sh          # results under $OUT (or /tmp/gpu-check)
# Budget: about 6-8 minutes on an H100 (first numba compiles included). The shared data
# does not travel with the repo, so tests that need it skip there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, numba, scipy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numba', numba.__version__, 'scipy', scipy.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# 1. the CUDA tests (they skip on CPU-only machines) and the CPU suite's device-generic parts
timeout 240 $PY -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt"
timeout 240 $PY -m pytest -q tests/test_reduce.py tests/test_ace.py -k "cuda or torch" 2>&1 \
    | tee -a "$OUT/gpu_tests.txt"

# 2. ACE throughput on the GPU against the numba CPU engine (target: >= 100x acepack)
timeout 240 $PY benchmarks/bench_ace.py --skip-r --repeats 2 2>&1 | tee "$OUT/bench_ace.txt"

# 3. the pipeline ratio on the GPU (target: rank / bare forward <= 1.5)
timeout 300 $PY benchmarks/bench_pipeline.py resnet18 --images 300 --device cuda 2>&1 \
    | tee "$OUT/bench_pipeline_cuda.txt"

# 4. the sampled basis (issue 24) and binned ACE (issue 25) with the model on the GPU: a
#    default run on 3,000 random 64 px images (the sampled route takes the maps to the CPU
#    for its pass; the null shared by all layers and the split halves run the numba engine)
timeout 300 $PY - <<'PY' 2>&1 | tee "$OUT/sampled_cuda.txt"
import time, torch, torchvision, pcace
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
x = torch.randn(3000, 3, 64, 64)
t = time.perf_counter()
res = pcace.rank(model, x, 0, layers=["layer1.0.conv1", "layer4.1.conv2"], device="cuda",
                 batch_size=250, progress=False)
print({"seconds": round(time.perf_counter() - t, 1), "basis": res.manifest["basis"],
       "null": res.manifest["null"], "nulls": res.manifest["nulls"],
       "routes": {k: v["route"] for k, v in res.manifest["routes"].items()},
       "stages": res.manifest["timings"]["stages"]})
PY
