"""Beyond the paper: smoothing strength and Monte-Carlo z, on the latent-64 beta-1 VAE.

Each variant is scored as its own row set (rec_grad, kl_grad, elbo_grad; the intensity
baseline alongside). Post-processing (Baur et al. 2021) and the ensemble with the input
intensity are in experiments/ensemble.py.

    python experiments/variants.py
    python experiments/variants.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PREDICTORS = ("rec_error", "rec_grad", "kl_grad", "elbo_grad")


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    ap.add_argument("--samples", type=int, nargs="+", default=[8])
    args = common.finish_args(ap.parse_args(argv), "variants")
    folds = common.load_folds(args)
    rows = {}
    for sigma in args.sigmas:
        rows[f"sigma={sigma:g}"] = common.pooled_setting(
            args, folds, latent_dim=64, beta=1.0, predictors=PREDICTORS, smooth_sigma=sigma,
            ensemble=False)
    for n in args.samples:
        rows[f"sigma=3,mc={n}"] = common.pooled_setting(
            args, folds, latent_dim=64, beta=1.0, predictors=PREDICTORS, n_samples=n,
            ensemble=False)
    common.write_outputs(args, "variants", rows, "Smoothing and Monte-Carlo z (latent 64)",
                         setting_label="variant")


if __name__ == "__main__":
    main()
