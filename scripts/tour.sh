#!/usr/bin/env bash
# The README's command-line tour, rerun: every command echoed, then its output.
set -u
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
rm -rf /tmp/tour && mkdir -p /tmp/tour
cat > /tmp/tour/train.yaml <<'YAML'
data: phantom
latent_dim: 64
epochs: 5
augmentation:
  rotation: 0.15
YAML
run() { echo "\$ $*"; "$@" 2>/tmp/tour/stderr; rc=$?; grep -h "error:" /tmp/tour/stderr; echo "[exit $rc]"; }
echo "\$ cat /tmp/tour/train.yaml"; cat /tmp/tour/train.yaml
run jaxvae train --config /tmp/tour/train.yaml --out /tmp/tour/runs/phantom-l64
run jaxvae train --config /tmp/tour/runs/phantom-l64/config.json --out /tmp/tour/runs/again --epochs 10 --print-config
run jaxvae evaluate --run /tmp/tour/runs/phantom-l64 --out /tmp/tour/eval --proj-steps 20
echo "\$ ls /tmp/tour/eval /tmp/tour/eval/overlays"; ls /tmp/tour/eval /tmp/tour/eval/overlays
B=../shared/data/brats2021_t2/BraTS2021_00006/BraTS2021_00006_t2.nii.gz
run jaxvae score --run /tmp/tour/runs/phantom-l64 --input $B --predictors rec_grad,kl_grad --out /tmp/tour/maps --png
echo "\$ ls /tmp/tour/maps"; ls /tmp/tour/maps
run jaxvae score --run /tmp/tour/runs/phantom-l64 --input ../shared/data/brats2021_t2 --predictors rec_grad --out /tmp/tour/maps_folder --segment false
echo "\$ ls /tmp/tour/maps_folder"; ls /tmp/tour/maps_folder
run jaxvae score --run /tmp/tour/runs/phantom-l64 --input ../shared/data/brats2021_t2/BraTS2021_00006/BraTS2021_00006_flair.nii.gz --out /tmp/tour/maps2
echo "latent_dm: 3" >> /tmp/tour/train.yaml
run jaxvae train --config /tmp/tour/train.yaml --out /tmp/tour/x
run jaxvae train --data phantom --modality flair,t2 --image-size 128 --epochs 1 --out /tmp/tour/runs/two-seq-128
run jaxvae score --run /tmp/tour/runs/two-seq-128 --input ../shared/data/brats2021_t2/BraTS2021_00006 --modality flair,t2 --predictors rec_error,rec_grad --out /tmp/tour/maps128
echo "\$ ls /tmp/tour/maps128"; ls /tmp/tour/maps128
