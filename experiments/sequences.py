"""Beyond the paper's 64x64 single sequence: slice size and MR sequences as channels.

Each setting is "<size>:<sequences>" (e.g. 64:flair, 128:flair, 64:flair,t1) and is run
under the same protocol as the tables (folds by case, a validation case per fold for the
checkpoint, the thresholds and the ensembles; l = 64, beta = 1), so the rows compare like
with like. With several sequences the intensity baseline has a row per sequence
("intensity_<seq>") and a combined row ("intensity": the mean of the normalised sequences).

    python experiments/sequences.py --settings 64:t2 64:flair 64:t2,flair       # phantoms
    python experiments/sequences.py --data ../shared/data/brats2018_flair \\
        --settings 64:flair 128:flair 64:flair,t1 --lr 5e-4
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PREDICTORS = ("rec_error", "elbo_grad", "kl_grad", "rec_grad", "combi")


def main(argv=None):
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["64:t2", "64:flair", "64:t2,flair"],
                    help="<size>:<sequences>, e.g. 64:flair 128:flair 64:flair,t1")
    ap.add_argument("--latent-dim", type=int, default=64)
    base = ap.parse_args(argv)
    rows = {}
    for setting in base.settings:
        size, _, seqs = setting.partition(":")
        args = copy.copy(base)
        args.image_size, args.modality = int(size), seqs or None
        args = common.finish_args(args, "sequences")
        rows[f"{args.image_size}px {args.modality}"] = common.pooled_setting(
            args, common.load_folds(args), latent_dim=base.latent_dim, beta=1.0,
            predictors=PREDICTORS)
    args.modality = ", ".join(rows)
    common.write_outputs(args, "sequences", rows, "Slice size and sequences as channels",
                         setting_label="setting")


if __name__ == "__main__":
    main()
