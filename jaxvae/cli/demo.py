"""`jaxvae demo`: the whole pipeline on the embedded phantom data, end to end.

Phantom volumes are written in the BraTS layout and read back through the same NIfTI path
as real data; a VAE is trained on the healthy cases; every predictor, Proj-Rec-Error, the
ensemble and the intensity baseline are scored on the lesion cases; results, figures and
NIfTI maps of one test case are written.
"""

import time
from pathlib import Path

import numpy as np

from jaxvae.base.errors import OutputError
from jaxvae.core.model import reconstruct
from jaxvae.data import phantom, splits
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.data.slices import with_channels
from jaxvae.inference import segment
from jaxvae.inference.evaluate import score_dataset
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import scans
from jaxvae.report.figures import map_figure
from jaxvae.report.outputs import overlay_slices, write_evaluation
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.on_split import train_on_split

# (n_healthy, n_lesion, epochs, projection steps): full < 5 min, quick < 1 min on 2 cores
FULL = dict(n_healthy=16, n_lesion=8, epochs=30, proj_steps=50)
QUICK = dict(n_healthy=6, n_lesion=3, epochs=8, proj_steps=20)


def run_demo(out_dir, *, quick=False, overwrite=False, modality="t2", seed=0):
    """Run the demo into out_dir; returns the results dict (also printed and written)."""
    t0 = time.time()
    plan = QUICK if quick else FULL
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir}: exists and is not empty (use --overwrite or another --out)")
    print(f"[1/5] writing phantom volumes ({plan['n_healthy']} healthy, {plan['n_lesion']} with "
          f"lesions) to {out_dir / 'data'}")
    phantom.write_brats(out_dir / "data", n_healthy=plan["n_healthy"], n_lesion=plan["n_lesion"],
                        seed=seed, overwrite=overwrite)
    cases = find_brats_cases(out_dir / "data", modality)
    slices = load_slices(cases)
    split = splits.make_split(slices, seed=seed)
    train_set, val_set, test_set = split.slices(slices)
    sick = set(test_set.case_ids[test_set.lesion.any(axis=(1, 2))].tolist())
    print(f"[2/5] {len(train_set)} healthy training slices; validation cases "
          f"{', '.join(split.val)}; {len(test_set)} test slices of {len(test_set.cases)} "
          f"cases ({len(sick)} with lesions, {len(test_set.cases) - len(sick)} healthy)")

    cfg = TrainConfig(latent_dim=64, beta=1.0, lr=1e-3 if quick else 5e-4, batch_size=64,
                      epochs=plan["epochs"], seed=seed,
                      checkpoint_every=max(1, plan["epochs"] // 2),
                      data={"source": "phantom", "path": str(out_dir / "data"),
                            "modality": modality, "folds": 1, "fold": 0, "split_seed": seed,
                            "split": split.to_dict()})
    print(f"[3/5] training a VAE (latent 64) for {cfg.epochs} epochs")
    params, _ = train_on_split(cfg, train_set, val_set, split, out_dir / "run",
                               overwrite=overwrite)
    model = model_from_config(cfg)

    print("[4/5] scoring every predictor, projection, ensemble and the intensity baseline")
    settings = EvalSettings(proj_steps=plan["proj_steps"], seed=seed)
    results, maps = score_dataset(model, params, test_set, val=val_set, beta=cfg.beta,
                                  settings=settings, progress=True)
    results["demo"] = {"quick": quick, **plan, "lr": cfg.lr}
    shown = overlay_slices(test_set)
    md = write_evaluation(out_dir, results, test_set, {k: m[[i for i, _ in shown]]
                                                       for k, m in maps.items()}, shown,
                          run_dir=out_dir / "run", title="jaxvae demo (phantom data)",
                          overwrite=overwrite)

    print("[5/5] figures, and NIfTI maps, lesion probability and mask of one test case")
    x = with_channels(test_set.images)
    recon = np.asarray(reconstruct(model, params, x))[..., 0]
    panels = {k: maps[k] for k in ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi",
                                  "proj_rec_error", "intensity")}
    map_figure(out_dir / "figures" / "maps.png", test_set.images, test_set.lesion, panels,
               recon=recon, case_ids=test_set.case_ids, overwrite=overwrite,
               title="phantom test slices")
    case = next(c for c in cases if c.case_id == sorted(sick)[0])
    seg = segment.from_calibration(results["calibration"], settings)  # the run segments
    if seg is not None:
        segment.save(out_dir / "run", seg, overwrite=overwrite)
    written = scans.score_volume(model, params, case.image_path, out_dir / "maps",
                                 beta=cfg.beta, settings=settings, overwrite=overwrite,
                                 segmenter=seg)
    print()
    print(md)
    print(f"done in {time.time() - t0:.0f} s: {out_dir / 'report.html'}, results.md, "
          f"results.json, curves.png, overlays/, figures/maps.png, {len(written)} NIfTI maps "
          f"in {out_dir / 'maps'}, run in {out_dir / 'run'}")
    return results
