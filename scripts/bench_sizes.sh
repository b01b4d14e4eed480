#!/usr/bin/env bash
# JAX vs PyTorch at 64x64 and 128x128 (batch 64), one after the other in one session.
cd "$(dirname "$0")/.."
mkdir -p results/bench
for s in 64 128; do
  .venv/bin/python -m jaxvae.bench.harness --batch-sizes 64 --repeats 5 --budget-s 40 \
      --projection-steps 20 --ops grad_maps_fused projection train_step \
      --image-size $s --out results/bench/sizes_$s.json
done
