"""Table 2 of Zhou et al.: beta-VAE, latent 64, beta in {0.1, 0.5, 1, 2, 10}, incl. Proj-Rec-Error.

Also writes Figure 2 (input, truth, reconstruction, maps) per beta.

    python experiments/table2.py                                   # phantom data
    python experiments/table2.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PREDICTORS = ("rec_error", "elbo_grad", "elbo_grad_sum", "kl_grad", "rec_grad", "combi",
              "proj_rec_error")
BETAS = (0.1, 0.5, 1.0, 2.0, 10.0)


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    args = common.finish_args(ap.parse_args(argv), "table2")
    folds = common.load_folds(args)
    rows = {}
    for beta in args.betas:
        rows[f"beta={beta:g}"] = common.pooled_setting(
            args, folds, latent_dim=64, beta=beta, predictors=PREDICTORS,
            figure=args.out / f"fig2_beta{beta:g}.png")
    paper = {f"beta={float(k):g}": v
             for k, v in common.PAPER.get("table2_beta_vae_latent64", {}).items()}
    common.write_outputs(args, "table2", rows, "Table 2: beta-VAE, latent 64", paper,
                         setting_label="beta")


if __name__ == "__main__":
    main()
