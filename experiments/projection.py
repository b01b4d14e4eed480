"""Proj-Rec-Error vs Rec-Error (Zhou et al. §3.2): latent 64, beta 1, a sweep of lam and steps.

The setting is chosen on the validation cases (the mean over folds of Proj-Rec-Error's
AUPRC on each fold's validation case), never on the test cases; every setting's test numbers
are shown, the chosen one marked.

    python experiments/projection.py
    python experiments/projection.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def val_auprc(res) -> float:
    """Proj-Rec-Error's AUPRC on the validation cases, mean over seeds and folds."""
    return float(np.mean([f["calibration"]["val_pooled"]["proj_rec_error"]["auprc"]
                          for r in res["seeds"].values() for f in r["per_fold"]]))


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    args = common.finish_args(ap.parse_args(argv), "projection")
    folds = common.load_folds(args)
    rows, val = {}, {}
    for steps in args.steps:
        for lam in args.lams:
            args.proj_steps, args.proj_lam = steps, lam
            key = f"steps={steps},lam={lam:g}"
            rows[key] = common.pooled_setting(args, folds, latent_dim=64, beta=1.0,
                                              predictors=("rec_error", "rec_grad",
                                                          "proj_rec_error"), ensemble=False)
            val[key] = val_auprc(rows[key])
    chosen = max(val, key=val.get)
    rows = {(f"{k} (chosen on val.)" if k == chosen else k): v for k, v in rows.items()}
    paper = {k: common.PAPER.get("projection_latent64") for k in rows}
    common.write_outputs(args, "projection", rows, "Proj-Rec-Error vs Rec-Error (latent 64)",
                         paper, setting_label="projection",
                         extra={"val_auprc_proj_rec_error": val, "chosen": chosen})


if __name__ == "__main__":
    main()
