#!/usr/bin/env bash
# JAX vs PyTorch throughput on an NVIDIA GPU, batch 64/256/1024: jaxvae/bench/gpu.sh OUT_DIR
# Makes a venv (default .venv-gpu; VENV=... to change) with the CUDA builds of jax and
# torch plus this project, then writes OUT_DIR/bench_gpu.json and .md, and the JAX-only
# bench_gpu_s2d.json / .md with the CPU's convolution form. A few minutes.
set -euo pipefail
OUT=${1:?usage: jaxvae/bench/gpu.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$ROOT/.venv-gpu}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || { echo "gpu.sh: nvidia-smi failed: this script needs an NVIDIA GPU and driver" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q)
"${PIP[@]}" --upgrade pip
# jax 0.10 ships CUDA 13 and CUDA 12 plugins; take 13, fall back to 12 for older drivers
"${PIP[@]}" "jax[cuda13]>=0.10,<0.11" || "${PIP[@]}" "jax[cuda12]>=0.10,<0.11"
"${PIP[@]}" "torch==2.13.0" -e "$ROOT"  # PyPI's Linux torch wheel is the CUDA build
mkdir -p "$OUT"
cd "$ROOT"
# no 75% preallocation: JAX and torch share the GPU, and peak memory stays meaningful
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$VENV/bin/python" - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"jax sees no GPU: {jax.devices()}"
assert torch.cuda.is_available(), "torch sees no GPU (a CPU-only wheel?)"
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      torch.cuda.get_device_name(0))
PY
"$VENV/bin/python" -m jaxvae.bench.harness --batch-sizes 64 256 1024 --repeats 10 \
  --out "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md"
# the CPU's space-to-depth convolutions on the GPU, JAX only: is "auto" = lax right there?
"$VENV/bin/python" -m jaxvae.bench.harness --batch-sizes 64 256 1024 --repeats 10 \
  --frameworks jax --conv-impl s2d --ops grad_maps_fused projection train_step \
  --projection-steps 20 --out "$OUT/bench_gpu_s2d.json" --md "$OUT/bench_gpu_s2d.md"
