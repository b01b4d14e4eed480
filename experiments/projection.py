"""Proj-Rec-Error vs Rec-Error (Zhou et al. §3.2): latent 64, beta 1, a sweep of lam and steps.

    python experiments/projection.py
    python experiments/projection.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    args = common.finish_args(ap.parse_args(argv), "projection")
    folds = common.load_folds(args)
    rows = {}
    for steps in args.steps:
        for lam in args.lams:
            args.proj_steps, args.proj_lam = steps, lam
            res = common.pooled_setting(args, folds, latent_dim=64, beta=1.0,
                                        predictors=("rec_error", "rec_grad", "proj_rec_error"))
            res.pop("ensemble", None)
            rows[f"steps={steps},lam={lam:g}"] = res
    paper = {k: common.PAPER.get("projection_latent64") for k in rows}
    common.write_outputs(args, "projection", rows, "Proj-Rec-Error vs Rec-Error (latent 64)",
                         paper, setting_label="projection")


if __name__ == "__main__":
    main()
