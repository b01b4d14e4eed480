"""Train a small VAE on phantom scans, fit its segmenter, then segment a new scan from Python.

    python examples/train_and_score.py --out /tmp/jaxvae-example

Writes phantom volumes in the BraTS layout (healthy cases to train on, lesion cases to
validate and test on), trains a VAE on the healthy slices for a few epochs, fits the
run's segmenter (the ensemble of maps and its best-Dice threshold) on the validation
cases and stores it in the run directory, then calls `jaxvae.volume_maps(run_dir, scan)`
on a test scan, as any script would on a new scan: maps, lesion probability and mask on
the scan's own grid. Under a minute on two CPU cores; the maps of so short a training
are rough, the Dice printed is that of this toy run.
"""

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

import jaxvae
from jaxvae.data import phantom, splits
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.inference import segment
from jaxvae.inference.settings import EvalSettings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (data and run)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier output")
    args = ap.parse_args(argv)

    data = args.out / "data"
    phantom.write_brats(data, n_healthy=6, n_lesion=4, seed=args.seed, modalities=("t2",),
                        overwrite=args.overwrite)
    cases = find_brats_cases(data, "t2")
    slices = load_slices(cases)
    split = splits.make_split(slices, seed=args.seed)  # healthy train, lesion val + test
    train_set, val_set, test_set = split.slices(slices)
    print(f"train on {len(train_set)} healthy slices; validation cases {', '.join(split.val)}")

    cfg = jaxvae.TrainConfig(latent_dim=32, lr=1e-3, batch_size=32, epochs=args.epochs,
                             seed=args.seed, checkpoint_every=args.epochs,
                             data={"source": "phantom", "path": str(data), "modality": "t2",
                                   "split": split.to_dict()})
    run_dir = args.out / "run"
    params, _ = jaxvae.train(cfg, train_set.images, run_dir, overwrite=args.overwrite,
                             progress=False, val_images=val_set.lesion_free().images)
    splits.write_split(split, run_dir / "split.json", overwrite=args.overwrite)

    model = jaxvae.model_from_config(cfg)
    seg = segment.fit(model, params, val_set, beta=cfg.beta, settings=EvalSettings())
    segment.save(run_dir, seg, overwrite=args.overwrite)
    print(f"segmenter {seg['name']}: threshold {seg['threshold']:.3f} (probability), "
          f"validation Dice {seg['val_metrics']['dice_best']:.3f}")

    sick = test_set.case_ids[test_set.lesion.any(axis=(1, 2))]  # test cases with lesions
    case = next(c for c in cases if c.case_id == sick[0])
    # what a script does with a new scan: a run directory and a path (or a nibabel image)
    maps = jaxvae.volume_maps(run_dir, case.image_path,
                              settings=EvalSettings(predictors=("rec_error", "kl_grad")))
    print(f"maps of {case.image_path.name}, shape {nib.load(case.image_path).shape}:")
    for name, m in maps.items():
        print(f"  {name:10s} shape {m.shape} {m.dtype}")
    truth = np.asarray(nib.load(case.seg_path).dataobj) > 0
    mask = maps["mask"] > 0
    dice = 2 * (mask & truth).sum() / max(mask.sum() + truth.sum(), 1)
    print(f"mask Dice with the phantom's lesion: {dice:.3f} "
          f"({int(mask.sum())} voxels called, {int(truth.sum())} lesion voxels)")


if __name__ == "__main__":
    main()
