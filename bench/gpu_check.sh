#!/usr/bin/env bash
# The GPU check for a lent GPU machine (docs/benchmarks.md "GPU"): trainer throughput in bf16 on a ≥ 1 B-parameter
# random-init Llama with its MFU (bench/gpu_check.py), then the GPU tests (pytest --run-gpu -m gpu). Never part of
# `make test`. Results go to $OUT (default /tmp/gpu-check): gpu_check.json, gpu_check.md, pytest-gpu.log.
#
#   bench/gpu_check.sh                 # from the repository root; PYTHON defaults to .venv/bin/python, else python3
#
# The machine needs the project's Python packages (make venv, or an image with torch+CUDA, transformers, peft,
# datasets, accelerate, pytest, fastapi, httpx, uvicorn): a missing one is named at once, before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
# Without the editable installs of `make venv`, the checkout's packages are found from their folders.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}trainer_image:chat_image:operator:devkit:."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "datasets", "accelerate", "pytest", "fastapi", "httpx",
                       "uvicorn", "tokenizers", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
"$python" -m bench.gpu_check --json "$out/gpu_check.json" | tee "$out/gpu_check.md"
status=0
"$python" -m pytest --run-gpu -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.log" || status=$?
echo "gpu_check: results in $out (GPU tests exit $status)"
exit "$status"
