"""Table 1 of Zhou et al.: a VAE (beta = 1) with latent size 32, 64, 256; every predictor.

Also writes Figure 1 (input, truth, reconstruction, maps) per latent size.

    python experiments/table1.py                                   # phantom data, minutes
    python experiments/table1.py --data ../shared/data/brats2018_flair --modality flair
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PREDICTORS = ("rec_error", "elbo_grad", "kl_grad", "rec_grad", "combi")


def main(argv=None):
    args = common.finish_args(common.parser(__doc__.splitlines()[0]).parse_args(argv), "table1")
    folds = common.load_folds(args)
    rows = {}
    for latent in (32, 64, 256):
        rows[f"l={latent}"] = common.pooled_setting(
            args, folds, latent_dim=latent, beta=1.0, predictors=PREDICTORS,
            figure=args.out / f"fig1_latent{latent}.png")
    paper = {f"l={k}": v for k, v in common.PAPER.get("table1_vae_latent_size", {}).items()}
    common.write_outputs(args, "table1", rows, "Table 1: VAE, latent size", paper,
                         setting_label="latent")


if __name__ == "__main__":
    main()
