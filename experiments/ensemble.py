"""The logistic-regression ensemble (Zhou et al. §3.3): beta = 10, latent 64.

Features rec_error, kl_grad, rec_grad, fitted on each fold's validation case (never on
test cases; the paper fits on 10 % of its test cases) and scored on the test cases; also
with the input intensity as a fourth feature, and with the maps post-processed as in Baur
et al. 2021 (eroded brain mask, median filter).

    python experiments/ensemble.py
    python experiments/ensemble.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--beta", type=float, default=10.0)
    args = common.finish_args(ap.parse_args(argv), "ensemble")
    folds = common.load_folds(args)
    res = common.pooled_setting(args, folds, latent_dim=64, beta=args.beta,
                                predictors=("rec_error", "kl_grad", "rec_grad"),
                                postprocess=True)
    ref = common.PAPER.get("ensemble_beta10", {})
    paper = {f"beta={args.beta:g}": {"ensemble": ref.get("auroc"),
                                     "rec_grad": ref.get("best_single_rec_grad")}}
    common.write_outputs(args, "ensemble", {f"beta={args.beta:g}": res},
                         "Ensemble of rec_error, kl_grad, rec_grad", paper,
                         setting_label="setting",
                         extra={"weights": {seed: [f["calibration"]["ensemble_weights"]
                                                   for f in r["per_fold"]]
                                            for seed, r in res["seeds"].items()}})


if __name__ == "__main__":
    main()
